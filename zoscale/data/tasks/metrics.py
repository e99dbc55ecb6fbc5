"""SQuAD's answer metrics: exact match and token F1 after normalisation, best over the gold answers.

Normalisation (SQuAD v1.1's official script): lower-case, drop punctuation, drop the articles
``a``/``an``/``the``, squeeze whitespace. MeZO reports the same F1 for DROP (not DROP's numeric
metric), and so does zoscale.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["normalize_answer", "exact_match", "f1", "best_em_f1"]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings (both empty: 1; one empty: 0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_em_f1(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``{"em", "f1"}``, each the maximum over the gold answers."""
    if not answers:
        raise ValueError("no gold answers to score against")
    return {"em": max(exact_match(prediction, a) for a in answers), "f1": max(f1(prediction, a) for a in answers)}
