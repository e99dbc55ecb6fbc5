"""The DeepSpeed JSON as zoscale reads it: checks and the settings it carries, before any model loads.

Both sharding engines take the ZO settings from this schema (``"optimizer"``,
``train_micro_batch_size_per_gpu``, ``bf16``/``fp16``): :func:`load_ds_config` reads and checks a
file, :func:`check_optimizer_section` its ``"optimizer"`` section, :func:`ds_dtype` its compute
dtype. What DeepSpeed itself is given (no optimizer, stages 1-2 as 0) is engine code:
``zoscale.engines.deepspeed.prepare_ds_config``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_ds_config", "check_optimizer_section", "ds_dtype"]


def check_optimizer_section(section: Any) -> tuple[str, dict[str, Any]]:
    """Validate a DeepSpeed JSON ``"optimizer"`` section without touching the model.

    The type, the names and the values of its params are checked by building the optimizer on
    a one-element dummy parameter, so errors surface before DeepSpeed partitions the model.

    Returns:
        ``(type, params)``.

    Raises:
        ValueError: not a dict, an unknown key in the section, no ``"type"``, ``"params"`` not a
            dict, an unknown optimizer type or parameter, or an invalid value (named).
    """
    from zoscale.optim import build_optimizer, get_optimizer_class

    if not isinstance(section, dict):
        raise ValueError(f"Invalid 'optimizer' section: expected a dict, got {type(section).__name__}")
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in the 'optimizer' section; accepted: ['params', 'type']")
    if "type" not in section:
        raise ValueError("The 'optimizer' section has no 'type' (e.g. \"MeZO\")")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"Invalid 'optimizer.params': expected a dict, got {type(params).__name__}")
    cls = get_optimizer_class(section["type"])
    if hasattr(cls, "check_options"):
        # Options that refer to the model's parameters (e.g. the hybrid's FO name patterns)
        # cannot be checked on a probe; such classes validate everything else themselves.
        cls.check_options(dict(params))
    else:
        build_optimizer(section["type"], [("probe", torch.nn.Parameter(torch.zeros(1)))], params)
    return section["type"], dict(params)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON for zoscale, before any model is loaded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, no ``train_micro_batch_size_per_gpu`` (or not a positive int), a
            ``zero_optimization.stage`` other than 0-3, or a bad ``"optimizer"`` section (see :func:`check_optimizer_section`); named.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {p} must be a JSON object")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    if micro is None:
        raise ValueError(f"DeepSpeed config {p} has no 'train_micro_batch_size_per_gpu' (the per-rank micro-batch)")
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise ValueError(f"DeepSpeed config {p}: 'train_micro_batch_size_per_gpu' must be a positive integer, got {micro!r}")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"DeepSpeed config {p}: 'zero_optimization' must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"DeepSpeed config {p}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    if "optimizer" not in cfg:
        raise ValueError(f"DeepSpeed config {p} has no 'optimizer' section naming the zoscale optimizer "
                         "(e.g. {\"type\": \"MeZO\", \"params\": {\"lr\": 1e-6, \"eps\": 1e-3}})")
    try:
        check_optimizer_section(cfg["optimizer"])
    except ValueError as e:
        raise ValueError(f"DeepSpeed config {p}: {e}") from None
    return cfg


def ds_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The compute dtype a DeepSpeed config asks for (``bf16`` / ``fp16`` sections)."""
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32
