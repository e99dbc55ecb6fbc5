"""Multiple choice (COPA, ReCoRD, WinoGrande): candidates that differ per example.

Evaluation scores each candidate by the mean log-probability of its option tokens and predicts the
best (a hit if it is any right candidate: ReCoRD may have several). Training, by default, is
MeZO's ``only_train_option``: the teacher-forced language-model loss of the first right
candidate's option tokens, wrong options never contrasted. ``objective="cross_entropy"`` trains
as classification instead (cross-entropy over all candidates' scores, one row per candidate).

The loss is the mean over examples of each example's mean token negative log-likelihood, not the
mean over all option tokens of the batch: a per-example mean averages over ranks to the one-process
value whatever the ranks' token counts, which keeps sharded runs on the single-process trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from zoscale.data.tasks.classification import choice_batch, choice_scores
from zoscale.data.tasks.encoding import Encoder, Example
from zoscale.data.tasks.forward import option_logprobs

__all__ = ["MultipleChoice", "OBJECTIVES"]

OBJECTIVES = ("correct_option", "cross_entropy")
Sync = Callable[[bool], bool]


class MultipleChoice:
    """Candidates per example, accuracy; trained on the right option (or across candidates).

    Args:
        objective: ``"correct_option"`` (default, MeZO) or ``"cross_entropy"``.
    """

    name = "multiple_choice"
    metrics = ("accuracy",)

    def __init__(self, objective: str = "correct_option") -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Invalid multiple-choice objective {objective!r}; expected one of {list(OBJECTIVES)}")
        self.objective = objective

    def train_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, torch.Tensor]:
        if self.objective == "cross_entropy":
            return choice_batch(examples, encoder, fast=False)
        return encoder.options([(ex, ex.candidates[ex.label]) for ex in examples])

    def eval_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, torch.Tensor]:
        return choice_batch(examples, encoder, fast=False)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], sync: Sync | None = None) -> torch.Tensor:
        if "groups" in batch:
            scores = choice_scores(model, batch)
            return F.cross_entropy(scores, batch["labels"].to(scores.device))
        return -option_logprobs(model, batch).mean()

    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], encoder: Encoder,
                sync: Sync | None = None) -> list[int]:
        return choice_scores(model, batch).argmax(-1).tolist()

    def score(self, prediction: int, example: Example) -> dict[str, float]:
        return {"accuracy": float(prediction in example.correct)}
