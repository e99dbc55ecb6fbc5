"""Name -> optimizer class, so a DeepSpeed JSON or a CLI flag can select a ZO optimizer.

An optimizer registers itself with ``@register("name")`` in its own module; every module of
``zoscale.optim`` is imported by the package, so a new optimizer is one new file.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

__all__ = ["OPTIMIZERS", "register", "get_optimizer_class", "build_optimizer"]

OPTIMIZERS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make the optimizer selectable as ``name`` (lower case, unique)."""

    def add(cls: T) -> T:
        key = name.lower()
        if key in OPTIMIZERS and OPTIMIZERS[key] is not cls:
            raise ValueError(f"optimizer name {key!r} is registered twice: {OPTIMIZERS[key].__qualname__} and "
                             f"{cls.__qualname__}")
        OPTIMIZERS[key] = cls
        cls.name = key  # type: ignore[attr-defined]
        return cls

    return add


def get_optimizer_class(name: str) -> type:
    """Look up an optimizer by case-insensitive name; ``ValueError`` lists the known names."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Unknown optimizer type {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    return cls


def build_optimizer(name: str, params: Any, options: dict[str, Any] | None = None, *,
                    module: torch.nn.Module | None = None, **extra: Any) -> Any:
    """Construct a registered optimizer, rejecting unknown options by name before touching params.

    Args:
        name: registered name (case-insensitive).
        params: ``named_parameters()``, parameters or param groups.
        options: the optimizer's options from a config.
        module: the (wrapped) model; handed to optimizers that need it (forward-mode AD swaps
            parameters), ignored by the others.
        **extra: further engine-supplied arguments (``shards``).
    """
    cls = get_optimizer_class(name)
    options = dict(options or {})
    accepted = cls.accepted_options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for optimizer {name!r}; accepted: {accepted}")
    if getattr(cls, "NEEDS_MODULE", False):
        extra["module"] = module
    return cls(params, **options, **extra)
