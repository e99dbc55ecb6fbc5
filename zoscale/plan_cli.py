"""``zoscale plan`` (and ``launch/plan.py``): the memory planner's command line.

    zoscale plan --model opt-66b --engine zero3 --world 8 16 --dtype bf16
    zoscale plan --model all --engine hsdp --world 16 --gpu-memory 80 --json
    zoscale plan --model path/to/hf_folder --ds_config ds_configs/zero3_mezo_bf16.json --world 8

``--model`` takes a built-in name (``zoscale.model_configs``: OPT-1.3B..66B, Llama-2 7B..70B,
Llama-3 8B/70B, written out from their public configs: nothing is downloaded), ``all`` for every
built-in, or a folder holding a Hugging Face ``config.json``. ``--ds_config`` reads from a
DeepSpeed config what it sets (dtype, ZeRO-3's prefetch bucket, live-parameter limit and
persistence threshold, the optimizer and its ``master_weights``, the micro-batch); flags given
explicitly win. ``--gpu-memory`` (GiB) marks which plans fit and names the largest model that does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zoscale.plan import ENGINES, GIB, OPTIMIZERS, PEFT_TYPES, ModelShape, PlanConfig, format_plan, model_shape, plan

__all__ = ["main", "console", "load_shapes", "ds_config_values"]


def load_shapes(spec: str) -> list[ModelShape]:
    """The model shapes ``--model`` names (a built-in, ``all``, or a Hugging Face folder).

    Raises:
        ValueError: an unknown name, or a folder without ``config.json`` (named).
    """
    from zoscale.model_configs import BUILTIN_CONFIGS, builtin_config

    if spec == "all":
        return [model_shape(builtin_config(n), n) for n in BUILTIN_CONFIGS]
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec}: the folder has no config.json")
        from transformers import AutoConfig

        return [model_shape(AutoConfig.from_pretrained(path), path.name)]
    return [model_shape(builtin_config(spec), spec.lower())]


def ds_config_values(path: str) -> dict[str, Any]:
    """The :class:`PlanConfig` fields a DeepSpeed config sets.

    Raises:
        ValueError: a missing or malformed file, or an optimizer the planner does not know (named).
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--ds_config {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--ds_config {path}: not JSON ({err})") from None
    out: dict[str, Any] = {"dtype": "bf16" if cfg.get("bf16", {}).get("enabled") else
                           "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"}
    zero = cfg.get("zero_optimization", {})
    for key, field in (("stage3_prefetch_bucket_size", "prefetch_bucket"), ("stage3_max_live_parameters", "max_live"),
                       ("stage3_param_persistence_threshold", "persistence_threshold")):
        if key in zero:
            out[field] = int(float(zero[key]))
    if "train_micro_batch_size_per_gpu" in cfg:
        out["micro_batch"] = int(cfg["train_micro_batch_size_per_gpu"])
    opt = cfg.get("optimizer", {})
    if opt:
        name = str(opt.get("type", "")).lower().replace("-", "_")
        if name not in OPTIMIZERS:
            raise ValueError(f"--ds_config {path}: optimizer.type {opt.get('type')!r} is not one the planner "
                             f"knows ({', '.join(OPTIMIZERS)})")
        out["optimizer"] = name
        out["master_weights"] = bool(opt.get("params", {}).get("master_weights", False))
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zoscale plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, help="built-in name, 'all', or a Hugging Face folder")
    ap.add_argument("--engine", nargs="+", choices=ENGINES, default=["zero3"])
    ap.add_argument("--world", nargs="+", type=int, default=[8], help="total ranks (GPUs)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--ds_config", "--ds-config", dest="ds_config", help="read dtype, ZeRO-3 limits, optimizer")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--master-weights", action="store_true", default=None, help="fp32 master shards")
    ap.add_argument("--peft", choices=PEFT_TYPES)
    ap.add_argument("--optimizer", choices=OPTIMIZERS)
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gpu-memory", type=float, help="GiB per GPU: mark what fits, name the largest")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    return ap


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = ds_config_values(args.ds_config) if args.ds_config else {}
    for key in ("dtype", "master_weights", "peft", "optimizer", "micro_batch"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    fields.setdefault("dtype", "bf16")
    return {**fields, "seq_len": args.seq_len, "gpus_per_node": args.gpus_per_node}


def _summary_row(p: Any, gpu_bytes: float | None) -> str:
    c = p.config
    cells = " ".join(f"{v / GIB:>8.2f}" for v in p.parts.values())
    fits = "" if gpu_bytes is None else ("  fits" if p.peak <= gpu_bytes else "  does not fit")
    return f"{p.model:<13}{c.engine:<9}{c.world:>5} {cells} {p.peak / GIB:>8.2f}{fits}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        shapes = load_shapes(args.model)
        base = _fields(args)
        plans = [plan(m, PlanConfig(engine=e, world=w, **base)) for m in shapes for e in args.engine for w in args.world]
    except ValueError as err:
        print(f"zoscale plan: {err}", file=sys.stderr)
        return 2
    gpu = None if args.gpu_memory is None else args.gpu_memory * GIB
    fitting = [p for p in plans if gpu is not None and p.peak <= gpu]
    largest = max(fitting, key=lambda p: p.params, default=None)
    if args.json:
        print(json.dumps({"plans": [p.as_dict() for p in plans], "gpu_memory_gib": args.gpu_memory,
                          "largest_fitting": None if largest is None else largest.model}, indent=1))
        return 0
    if len(plans) == 1:
        print(format_plan(plans[0]))
    else:
        print(f"{'model':<13}{'engine':<9}{'world':>5} " + " ".join(f"{k[:8]:>8}" for k in plans[0].parts)
              + f" {'peak':>8}   (GiB per rank)")
        for p in plans:
            print(_summary_row(p, gpu))
    if gpu is not None:
        print(f"largest that fits {args.gpu_memory:g} GiB: "
              + (f"{largest.model} ({largest.config.engine}, {largest.config.world} ranks, "
                 f"{largest.peak / GIB:.2f} GiB)" if largest else "none of these"))
    return 0


def console() -> int:
    """The ``zoscale`` console script: ``zoscale plan ...``."""
    argv = sys.argv[1:]
    if not argv or argv[0] != "plan":
        print("usage: zoscale plan --model NAME [options]   (zoscale plan --help)", file=sys.stderr)
        return 2
    return main(argv[1:])
