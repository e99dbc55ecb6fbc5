"""Engine integrations: shard providers and builders for DeepSpeed and FSDP2.

Importing this package imports neither DeepSpeed nor FSDP2/DTensor; they are imported when a
builder or provider is used.
"""

from zoscale.engines.deepspeed import DeepSpeedShards, check_optimizer_section, prepare_ds_config, zero3_engine
from zoscale.engines.fsdp import FSDPBuilder, FSDPEngine, FSDPShards, apply_fsdp, build_mesh

__all__ = ["DeepSpeedShards", "check_optimizer_section", "prepare_ds_config", "zero3_engine",
           "FSDPShards", "FSDPEngine", "FSDPBuilder", "apply_fsdp", "build_mesh"]
