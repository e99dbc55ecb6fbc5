"""The local engine: one process, or data-parallel replicas (every rank holds the whole model)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zoscale.engines.saving import save_pretrained
from zoscale.shards import LocalShards, ShardProvider

__all__ = ["LocalEngine", "LocalBuilder"]


class LocalEngine:
    """Every rank holds the whole model (one process, or data-parallel replicas).

    With ``torch.distributed`` initialised, each rank runs its own micro-batch and the optimizer
    averages the loss pair over the world; the replicas stay identical because they apply the
    same seeded update. No gradient or parameter traffic at all.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        self.shards: ShardProvider = LocalShards()
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world_size = dist.get_world_size() if initialised else 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def save_pretrained(self, path: Path, tokenizer: Any) -> None:
        """Write the model (whole on every rank: nothing to consolidate) on rank 0."""
        save_pretrained(self, path, tokenizer, lambda: None)


class LocalBuilder:
    """Builds a :class:`LocalEngine`; the model is loaded plainly."""

    name = "local"
    load_dtype = None

    def loading(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model is constructed (nothing special for replicas)."""
        return contextlib.nullcontext()

    def build(self, model: torch.nn.Module) -> LocalEngine:
        return LocalEngine(model)
