"""Which zoscale optimizer a ``ZOTrainer`` runs, with which options, from its two possible sources.

The optimizer is named either by the trainer's ``zo_config`` argument or by the ``"optimizer"``
section of the DeepSpeed JSON in ``TrainingArguments(deepspeed=...)`` (resolved through zoscale's
registry, ``zoscale.optim.OPTIMIZERS``), never by both; with neither, MeZO. Missing options come
from the ``TrainingArguments``: ``lr`` from ``learning_rate``, ``seed`` from ``seed``; ``"auto"``
is resolved the way transformers resolves it for DeepSpeed's own optimizers (``lr``,
``weight_decay``, ZO-Adam's ``betas`` and ``adam_eps``), except ``eps``: for a ZO optimizer that is
the perturbation scale, which no training argument holds (transformers would put Adam's epsilon
there), so ``"eps": "auto"`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["resolve_zo_config", "original_ds_config"]

#: ``"auto"`` in a zoscale optimizer's params: the TrainingArguments value it stands for.
_AUTO = {
    "lr": lambda a: a.learning_rate,
    "weight_decay": lambda a: a.weight_decay,
    "betas": lambda a: [a.adam_beta1, a.adam_beta2],
    "adam_eps": lambda a: a.adam_epsilon,
    "seed": lambda a: a.seed,
}


def original_ds_config(args: Any) -> dict[str, Any] | None:
    """The user's DeepSpeed config, before transformers filled in its ``"auto"`` values: as given
    to ``TrainingArguments(deepspeed=...)`` (a dict or a JSON path), or, under ``accelerate launch``
    with a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``), the JSON accelerate's plugin read from
    its ``deepspeed_config_file``. None without DeepSpeed."""
    ds = getattr(args, "deepspeed", None)
    if not ds:
        plugin = getattr(args, "deepspeed_plugin", None)  # built from accelerate launch's environment
        return getattr(plugin, "deepspeed_config", None) if plugin is not None else None
    if isinstance(ds, dict):
        return ds
    path = Path(ds)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    return json.loads(path.read_text())


def _first_order_error(name: Any) -> ValueError:
    from zoscale.optim import OPTIMIZERS

    return ValueError(
        f"The DeepSpeed config's 'optimizer' section names {name!r}, which is not a zoscale optimizer: ZOTrainer "
        "trains with a zeroth-order optimizer and never creates DeepSpeed's (first-order) one. Name a zoscale "
        f"optimizer there (known: {', '.join(sorted(OPTIMIZERS))}), or remove the section and pass "
        "ZOTrainer(zo_config={'type': 'MeZO', 'params': {...}}); for first-order training use transformers.Trainer"
    )


def resolve_zo_config(zo_config: dict[str, Any] | None, args: Any) -> tuple[str, dict[str, Any], str]:
    """``(optimizer type, options, where they came from)`` for a ZOTrainer.

    Raises:
        ValueError: both sources name an optimizer; the JSON names one zoscale does not have (a
            first-order optimizer); ``"eps": "auto"`` or another ``"auto"`` with no training
            argument behind it; a malformed section or an invalid option (named).
    """
    from zoscale.optim import OPTIMIZERS
    from zoscale.train.ds_config import check_optimizer_section

    ds = original_ds_config(args)
    section = ds.get("optimizer") if ds else None
    if section is not None:
        if not isinstance(section, dict) or str(section.get("type", "")).lower() not in OPTIMIZERS:
            raise _first_order_error(section.get("type") if isinstance(section, dict) else section)
        if zo_config is not None:
            raise ValueError("ZOTrainer got zo_config and the DeepSpeed config names an optimizer too "
                             f"({section['type']!r}): give the optimizer in one place only")
        chosen, source = section, "the DeepSpeed config's 'optimizer' section"
    elif zo_config is not None:
        if not isinstance(zo_config, dict):
            raise ValueError(f"zo_config must be a dict like {{'type': 'MeZO', 'params': {{...}}}}, got "
                             f"{type(zo_config).__name__}")
        chosen, source = zo_config, "zo_config"
    else:
        chosen, source = {"type": "MeZO", "params": {}}, "the default (MeZO)"
    params = chosen.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"Invalid 'params' in {source}: expected a dict, got {type(params).__name__}")
    resolved = {}
    for key, value in params.items():
        if value == "auto":
            if key == "eps":
                raise ValueError(f"'eps': 'auto' in {source}: a zeroth-order optimizer's eps is its perturbation "
                                 "scale (MeZO: 1e-3), which no TrainingArguments field holds (transformers would "
                                 "fill in adam_epsilon); give a number")
            if key not in _AUTO:
                raise ValueError(f"{key!r}: 'auto' in {source}: no TrainingArguments field stands for it; 'auto' "
                                 f"is resolved for {sorted(_AUTO)}")
            value = _AUTO[key](args)
        resolved[key] = value
    resolved.setdefault("lr", args.learning_rate)
    resolved.setdefault("seed", args.seed)
    name, options = check_optimizer_section({**chosen, "params": resolved})
    return name, options, source
