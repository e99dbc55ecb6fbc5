"""Configuration and the training loop."""

from zoscale.train.config import TrainConfig, load_config
from zoscale.train.trainer import train

__all__ = ["TrainConfig", "load_config", "train"]
