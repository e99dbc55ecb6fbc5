"""Name -> optimizer class, so a DeepSpeed JSON or a CLI flag can select a ZO optimizer."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from zoscale.optim.base import ZOOptimizer
from zoscale.optim.blockwise import BlockwiseZO
from zoscale.optim.forward_grad import ForwardGrad
from zoscale.optim.hybrid import HybridZOFO
from zoscale.optim.lezo import LeZO
from zoscale.optim.lozo import LOZO, LOZOM
from zoscale.optim.mezo import MeZO
from zoscale.optim.sparse_mezo import SparseMeZO
from zoscale.optim.zo_bench import ZOAdam, ZOSGDCons, ZOSGDMMT, ZOSGDSign

__all__ = ["OPTIMIZERS", "get_optimizer_class", "build_optimizer"]

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "mezo": MeZO,
    "lezo": LeZO,
    "hybrid": HybridZOFO,
    "lozo": LOZO,
    "lozo_m": LOZOM,
    "blockwise": BlockwiseZO,
    "forward_grad": ForwardGrad,
    "sparse_mezo": SparseMeZO,
    "zo_sgd_sign": ZOSGDSign,
    "zo_sgd_mmt": ZOSGDMMT,
    "zo_sgd_cons": ZOSGDCons,
    "zo_adam": ZOAdam,
}


def get_optimizer_class(name: str) -> type[ZOOptimizer]:
    """Look up an optimizer by case-insensitive name; ``ValueError`` lists the known names."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Unknown optimizer type {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    return cls


# Constructor arguments that the engine supplies, never a config.
_ENGINE_ARGS = frozenset({"self", "params", "shards", "module"})


def build_optimizer(name: str, params: Any, options: dict[str, Any] | None = None, *,
                    module: torch.nn.Module | None = None, **extra: Any) -> ZOOptimizer:
    """Construct a registered optimizer, rejecting unknown options by name before touching params.

    Args:
        name: registered name (case-insensitive).
        params: ``named_parameters()``, parameters or param groups.
        options: the optimizer's keyword arguments from a config.
        module: the (wrapped) model; handed to optimizers whose constructor takes ``module``
            (forward-mode AD needs to swap parameters), ignored by the others.
        **extra: further engine-supplied arguments (``shards``).
    """
    cls = get_optimizer_class(name)
    options = dict(options or {})
    signature = inspect.signature(cls.__init__).parameters
    accepted = set(signature) - _ENGINE_ARGS
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for optimizer {name!r}; accepted: {sorted(accepted)}")
    if "module" in signature:
        extra["module"] = module
    return cls(params, **options, **extra)
