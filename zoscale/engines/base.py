"""What the training loop needs from an engine: the :class:`Engine` and :class:`EngineBuilder` contracts.

An engine owns the wrapped model and knows how its parameters are laid out. The loop calls
``module`` for forwards, builds the optimizer on the trainable named parameters of ``module``
(``trainable_parameters()`` of ``zoscale.train.trainer``; with ``model.peft``, the adapters'
``adapter_parameters()`` of ``zoscale.peft``), read after wrapping, with ``shards`` as the shard
provider, and uses the rest for data-parallel bookkeeping and saving. Engines:
:class:`~zoscale.engines.local.LocalEngine` (one process, or every rank a full replica under
torchrun); DeepSpeed in ``zoscale.engines.deepspeed``; FSDP2 / HSDP in ``zoscale.engines.fsdp``.
``--engine NAME`` picks a builder through ``zoscale.engines.registry``; every engine's
``save_pretrained`` is ``zoscale.engines.saving.save_pretrained`` with its own way of
consolidating the weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch

from zoscale.shards import ShardProvider

__all__ = ["Engine", "EngineBuilder"]


class Engine(Protocol):
    """The engine interface the trainer uses."""

    module: torch.nn.Module
    """The model to call for forwards (already wrapped / partitioned)."""
    shards: ShardProvider
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the data-parallel group in place and return it."""
        ...

    def save_pretrained(self, path: Path, tokenizer: Any) -> None:
        """Write the full (consolidated) model as a Hugging Face folder, or a peft model as its
        adapter folder; collective, rank 0 writes."""
        ...


class EngineBuilder(Protocol):
    """Makes an engine: a context to construct the model in, then the wrapping."""

    name: str
    load_dtype: torch.dtype | None
    """The dtype to load the model in when the engine keeps its own precision (FSDP2's fp32
    shards under bf16 compute); None: the run's ``model.dtype``."""

    def loading(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model is constructed (e.g. partitioned at load for ZeRO-3)."""
        ...

    def build(self, model: torch.nn.Module) -> Engine:
        """Wrap the loaded model."""
        ...
