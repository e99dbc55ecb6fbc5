"""zoscale inside the Hugging Face stack: ``ZOTrainer``, a ``transformers.Trainer`` whose step is a
zoscale zeroth-order step (``zoscale.hf.trainer``; optimizer resolution: ``zoscale.hf.config``)."""

from zoscale.hf.config import resolve_zo_config
from zoscale.hf.trainer import ZO_CHECKPOINT_DIR, LoopOptimizer, ZOTrainer

__all__ = ["ZOTrainer", "LoopOptimizer", "ZO_CHECKPOINT_DIR", "resolve_zo_config"]
