"""Zeroth-order optimizers (``torch.optim.Optimizer`` subclasses)."""

from zoscale.optim.base import NonFiniteLossError, ZOOptimizer
from zoscale.optim.blockwise import BlockwiseZO
from zoscale.optim.forward_grad import ForwardGrad
from zoscale.optim.hybrid import HybridZOFO
from zoscale.optim.lezo import LeZO
from zoscale.optim.lozo import LOZO, LOZOM
from zoscale.optim.mezo import MeZO
from zoscale.optim.sparse_mezo import SparseMeZO
from zoscale.optim.zo_bench import ZOAdam, ZOSGDCons, ZOSGDMMT, ZOSGDSign
from zoscale.optim.registry import OPTIMIZERS, build_optimizer, get_optimizer_class

__all__ = ["MeZO", "LeZO", "LOZO", "LOZOM", "HybridZOFO", "BlockwiseZO", "ForwardGrad", "SparseMeZO",
           "ZOSGDSign", "ZOSGDMMT", "ZOSGDCons", "ZOAdam", "ZOOptimizer", "NonFiniteLossError", "OPTIMIZERS", "build_optimizer", "get_optimizer_class"]
