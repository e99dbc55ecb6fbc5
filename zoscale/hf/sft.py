"""``ZOSFTTrainer``: trl's ``SFTTrainer`` with a zoscale zeroth-order step (``ZOTrainer``'s).

``class ZOSFTTrainer(ZOTrainer, SFTTrainer)``: SFTTrainer prepares the data (tokenising, chat
templates, completion-only labels) and computes the loss and its metrics; ZOTrainer's step,
engines and checkpoints run it. Two adjustments, both to trl's bookkeeping:

* trl files its metrics (entropy, mean token accuracy, tokens) under ``"train"`` or ``"eval"`` by
  ``self.model.training``. The ZO closure runs the model in eval mode (no dropout, see
  ``zoscale.hf.trainer``), so while it runs the top module alone reports ``training = True``
  (its submodules, where dropout lives, stay in eval mode).
* The closure runs every micro-batch ``2 q`` times per step (the SPSA pairs), so trl would count
  each token ``2 q`` times: the step's count is divided by the closure calls. The entropy and
  accuracy logged are means over those forwards (at ``theta +- eps z``), not at ``theta``.

Needs ``trl`` (``pip install zoscale[trl]``); importing this module without it raises ImportError.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from trl import SFTTrainer

from zoscale.hf.trainer import ZOTrainer

__all__ = ["ZOSFTTrainer"]


@contextlib.contextmanager
def _reports_training(module: torch.nn.Module) -> Iterator[None]:
    was = module.training
    module.training = True  # the flag alone: no submodule changes mode
    try:
        yield
    finally:
        module.training = was


class ZOSFTTrainer(ZOTrainer, SFTTrainer):
    """trl's ``SFTTrainer`` whose optimizer step is a zoscale ZO step; arguments as ``SFTTrainer``'s
    plus ``zo_config`` (see :class:`~zoscale.hf.trainer.ZOTrainer`)."""

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not self._zo_in_step:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with _reports_training(self.model):  # inside a ZO step: trl's metrics are training metrics
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        tokens = self._total_train_tokens
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._zo_closure_calls:  # a step ran: count each token once, not once per forward
            self._total_train_tokens = tokens + (self._total_train_tokens - tokens) // self._zo_closure_calls
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]  # what trl logs
            self._zo_closure_calls = 0
        self.model.train()  # as Trainer leaves it: trl's log() keys its metrics by the mode
        return loss
