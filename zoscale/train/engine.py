"""What the training loop needs from an engine, and the local (single process / replicas) engine.

An engine owns the wrapped model and knows how its parameters are laid out. The loop calls
``module`` for forwards, builds the optimizer on the trainable named parameters of ``module``
(``trainable_parameters()`` of ``zoscale.train.trainer``; with ``model.peft``, the adapters'
``adapter_parameters()`` of ``zoscale.peft``), read after wrapping, with ``shards`` as the shard
provider, and uses the rest for data-parallel bookkeeping and saving. Engines:
:class:`LocalEngine` here (one process, or every rank a full replica under torchrun); DeepSpeed
in ``zoscale.engines.deepspeed``; FSDP2 / HSDP in ``zoscale.engines.fsdp``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from zoscale.shards import LocalShards, ShardProvider

__all__ = ["Engine", "EngineBuilder", "LocalEngine", "LocalBuilder"]


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
        """Write the full (consolidated) model as a Hugging Face folder; rank 0 writes."""
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
        if self.rank == 0:
            self.module.save_pretrained(path)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
        if self.world_size > 1:
            dist.barrier()


class LocalBuilder:
    """Builds a :class:`LocalEngine`; the model is loaded plainly."""

    name = "local"
    load_dtype = None

    def loading(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model is constructed (nothing special for replicas)."""
        return contextlib.nullcontext()

    def build(self, model: torch.nn.Module) -> LocalEngine:
        return LocalEngine(model)
