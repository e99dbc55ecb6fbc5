"""Zeroth-order optimizers (``torch.optim.Optimizer`` subclasses), one module each.

Every module of this package is imported here, so an optimizer registered with
``@register`` (``zoscale.optim.registry``) in a new file is selectable by name at once.
"""

import importlib
import pkgutil

from zoscale.optim.base import NonFiniteLossError, ZOOptimizer
from zoscale.optim.registry import OPTIMIZERS, build_optimizer, get_optimizer_class, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The optimizers by class name (MeZO, LeZO, ...), as ``from zoscale.optim import MeZO``.
globals().update({cls.__name__: cls for cls in OPTIMIZERS.values()})

__all__ = ["ZOOptimizer", "NonFiniteLossError", "OPTIMIZERS", "build_optimizer", "get_optimizer_class", "register",
           *sorted(cls.__name__ for cls in OPTIMIZERS.values())]
