"""Engine integrations: shard providers and builders for DeepSpeed (and, later, FSDP2).

Importing this package does not import DeepSpeed; the builders import it when called.
"""

from zoscale.engines.deepspeed import DeepSpeedShards, check_optimizer_section, prepare_ds_config, zero3_engine

__all__ = ["DeepSpeedShards", "check_optimizer_section", "prepare_ds_config", "zero3_engine"]
