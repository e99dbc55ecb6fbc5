"""The engine registry: ``--engine NAME`` -> a factory of that engine's builder.

A factory takes the run's config, the DeepSpeed JSON (None without ``--ds_config``) and the HSDP
mesh shape (None without ``--hsdp``) and returns an :class:`~zoscale.engines.base.EngineBuilder`.
It imports its engine's module itself, so importing the registry imports neither DeepSpeed nor
FSDP2. ``launch/train.py`` and ``launch/evaluate.py`` take their ``--engine`` choices from
:func:`engine_names`; an unknown name is refused by :func:`get_engine`, listing the known ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from zoscale.engines.base import EngineBuilder
from zoscale.engines.local import LocalBuilder

if TYPE_CHECKING:
    from zoscale.train.config import TrainConfig

__all__ = ["ENGINES", "BuilderFactory", "register_engine", "engine_names", "get_engine", "make_builder"]

BuilderFactory = Callable[["TrainConfig", "dict[str, Any] | None", "tuple[int, int] | None"], EngineBuilder]
ENGINES: dict[str, BuilderFactory] = {}
"""Engine name -> builder factory, in registration order (``local``, ``deepspeed``, ``fsdp``)."""


def register_engine(name: str) -> Callable[[BuilderFactory], BuilderFactory]:
    """Decorator registering a builder factory under ``name``; ValueError if the name is taken."""
    def add(factory: BuilderFactory) -> BuilderFactory:
        if name in ENGINES:
            raise ValueError(f"engine {name!r} is already registered")
        ENGINES[name] = factory
        return factory

    return add


def engine_names() -> list[str]:
    """The registered engine names, in registration order."""
    return list(ENGINES)


def get_engine(name: str) -> BuilderFactory:
    """The factory registered as ``name``; ValueError naming the known engines otherwise."""
    factory = ENGINES.get(name)
    if factory is None:
        raise ValueError(f"unknown engine {name!r}; known engines: {engine_names()}")
    return factory


def make_builder(engine: str, cfg: TrainConfig, ds_config: dict[str, Any] | None,
                 hsdp: tuple[int, int] | None = None) -> EngineBuilder:
    """The engine builder ``--engine`` names. ``cfg.model.dtype`` stays the compute dtype the run
    asked for (what its config.json records); FSDP2 loads fp32 and keeps fp32 shards under it."""
    return get_engine(engine)(cfg, ds_config, hsdp)


@register_engine("local")
def _local(cfg: TrainConfig, ds_config: dict[str, Any] | None, hsdp: tuple[int, int] | None) -> EngineBuilder:
    return LocalBuilder()


@register_engine("deepspeed")
def _deepspeed(cfg: TrainConfig, ds_config: dict[str, Any] | None, hsdp: tuple[int, int] | None) -> EngineBuilder:
    from zoscale.engines.deepspeed import DeepSpeedBuilder

    return DeepSpeedBuilder(ds_config)


@register_engine("fsdp")
def _fsdp(cfg: TrainConfig, ds_config: dict[str, Any] | None, hsdp: tuple[int, int] | None) -> EngineBuilder:
    from zoscale.engines.fsdp import FSDPBuilder

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype)
    return FSDPBuilder(hsdp=hsdp, param_dtype=compute)
