"""Name -> optimizer class, so a DeepSpeed JSON or a CLI flag can select a ZO optimizer."""

from __future__ import annotations

import inspect
from typing import Any

from zoscale.optim.base import ZOOptimizer
from zoscale.optim.lezo import LeZO
from zoscale.optim.mezo import MeZO

__all__ = ["OPTIMIZERS", "get_optimizer_class", "build_optimizer"]

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "mezo": MeZO,
    "lezo": LeZO,
}


def get_optimizer_class(name: str) -> type[ZOOptimizer]:
    """Look up an optimizer by case-insensitive name; ``ValueError`` lists the known names."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Unknown optimizer type {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    return cls


def build_optimizer(name: str, params: Any, options: dict[str, Any] | None = None, **extra: Any) -> ZOOptimizer:
    """Construct a registered optimizer, rejecting unknown options by name before touching params."""
    cls = get_optimizer_class(name)
    options = dict(options or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "shards"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for optimizer {name!r}; accepted: {sorted(accepted)}")
    return cls(params, **options, **extra)
