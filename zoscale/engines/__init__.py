"""Engines: the :class:`Engine` contract, the local engine, DeepSpeed and FSDP2, and their registry.

Importing this package imports neither DeepSpeed nor FSDP2/DTensor; they are imported when a
builder or provider is used.
"""

from zoscale.engines.base import Engine, EngineBuilder
from zoscale.engines.deepspeed import DeepSpeedShards, prepare_ds_config, zero3_engine
from zoscale.engines.fsdp import FSDPBuilder, FSDPEngine, FSDPShards, apply_fsdp, build_mesh
from zoscale.engines.local import LocalBuilder, LocalEngine
from zoscale.engines.registry import engine_names, make_builder, register_engine

__all__ = ["Engine", "EngineBuilder", "LocalEngine", "LocalBuilder", "DeepSpeedShards", "prepare_ds_config",
           "zero3_engine", "FSDPShards", "FSDPEngine", "FSDPBuilder", "apply_fsdp", "build_mesh",
           "engine_names", "make_builder", "register_engine"]
