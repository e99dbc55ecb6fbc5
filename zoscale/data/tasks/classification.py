"""Classification: one prompt, one verbalised candidate per class (MeZO's ``train_as_classification``).

A candidate's score is the mean log-probability of its option tokens after the prompt; the
prediction is the best-scoring candidate and the training loss the cross-entropy over the
candidates' scores. When every candidate of a batch is one token (SST-2's `` terrible`` /
`` great``), the batch holds the prompts alone and the scores are the label words' logits at the
last position: one forward of the prompt instead of one per candidate, and the same loss and
prediction (a row's log-softmax differs from its logits by a constant, which cross-entropy and
argmax ignore) as long as no prompt is truncated: the fast path keeps ``max_length`` prompt tokens
(as zoscale's SST-2 task always did), the general path ``max_length`` minus the option's.

The functions here serve multiple choice too (:mod:`zoscale.data.tasks.multiple_choice`), which
scores candidates the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from zoscale.data.tasks.encoding import Encoder, Example
from zoscale.data.tasks.forward import label_logits, option_logprobs

__all__ = ["Classification", "choice_batch", "choice_scores", "single_token_ids"]

Sync = Callable[[bool], bool]


def single_token_ids(examples: Sequence[Example], encoder: Encoder) -> list[int] | None:
    """The label words' token ids if the batch shares one candidate list of distinct single tokens."""
    candidates = examples[0].candidates
    if any(ex.candidates != candidates for ex in examples):
        return None
    ids = [encoder.ids(c) for c in candidates]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        return None
    return [i[0] for i in ids]


def choice_batch(examples: Sequence[Example], encoder: Encoder, fast: bool = True) -> dict[str, torch.Tensor]:
    """A batch that scores every candidate of every example, with ``labels`` (the first right one).

    Single-token candidates (``fast``) give a batch of prompts plus ``label_ids``; otherwise one
    row per (example, candidate) plus ``groups`` (candidates per example).
    """
    if not examples:
        raise ValueError("Cannot collate an empty batch")
    ids = single_token_ids(examples, encoder) if fast else None
    if ids is not None:
        batch = encoder.prompts(examples)
        batch["label_ids"] = torch.tensor(ids)
    else:
        batch = encoder.options([(ex, c) for ex in examples for c in ex.candidates])
        batch["groups"] = torch.tensor([len(ex.candidates) for ex in examples])
    batch["labels"] = torch.tensor([ex.label for ex in examples])
    return batch


def choice_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, k]`` candidate scores (float32); rows with fewer candidates are padded with ``-inf``."""
    if "label_ids" in batch:
        return label_logits(model, batch, batch["label_ids"].tolist()).float()
    flat = option_logprobs(model, batch)
    groups = batch["groups"].tolist()
    scores = torch.full((len(groups), max(groups)), float("-inf"), device=flat.device)
    for row, part in enumerate(torch.split(flat, groups)):
        scores[row, : len(part)] = part
    return scores


class Classification:
    """k >= 2 classes, each a candidate string; trained by cross-entropy over the candidates."""

    name = "classification"
    metrics = ("accuracy",)

    def train_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, torch.Tensor]:
        return choice_batch(examples, encoder)

    def eval_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, torch.Tensor]:
        return choice_batch(examples, encoder)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], sync: Sync | None = None) -> torch.Tensor:
        """Mean cross-entropy over the candidates' scores (MeZO's classification loss), float32."""
        scores = choice_scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device))

    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], encoder: Encoder,
                sync: Sync | None = None) -> list[int]:
        """The best-scoring candidate of each example."""
        return choice_scores(model, batch).argmax(-1).tolist()

    def score(self, prediction: int, example: Example) -> dict[str, float]:
        return {"accuracy": float(prediction in example.correct)}
