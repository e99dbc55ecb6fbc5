"""From command-line arguments to a running job: config, process group, engine, train.

Used by ``launch/train.py`` under ``python``, ``deepspeed``, ``torchrun``, ``accelerate launch`` and
the SLURM scripts in ``launch/slurm/``, on one node or several.
Engines: ``local`` (one process or replicas), ``deepspeed`` (``--ds_config``), ``fsdp`` (FSDP2,
``--hsdp R,S`` for a replicate x shard mesh). The ZO settings come from the DeepSpeed JSON schema
(``"optimizer"``, ``train_micro_batch_size_per_gpu``, ``bf16``/``fp16``) for both sharding
engines; FSDP ignores the JSON's ``zero_optimization`` section.

With several ranks, collectives time out after ``--dist_timeout`` seconds and a heartbeat
watchdog (:mod:`zoscale.train.watchdog`, ``--heartbeat_timeout``) names a rank that died or hangs;
the survivors then exit with :data:`~zoscale.train.watchdog.EXIT_PEER_LOST` instead of waiting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

from zoscale.engines.registry import get_engine, make_builder
from zoscale.train.config import OptimConfig, TrainConfig, load_config, validate
from zoscale.train.ds_config import ds_dtype, load_ds_config
from zoscale.train.trainer import train
from zoscale.train.preemption import Preempted
from zoscale.train.watchdog import EXIT_PEER_LOST, Watchdog, is_communication_error

__all__ = ["make_builder", "engine_name", "run_cli", "run_from_args", "resolve_config", "ds_config_path",
           "DIST_TIMEOUT_S", "HEARTBEAT_TIMEOUT_S"]

DIST_TIMEOUT_S = 600.0
"""Default collective timeout: long enough for rank 0 to prepare a model while the others wait at
a barrier, far shorter than torch's (30 min on gloo)."""
HEARTBEAT_TIMEOUT_S = 60.0
"""Default silence after which a rank counts as dead: far above a busy machine's scheduling hiccups."""

_FLAG_KEYS = {"model": "model.name", "data": "data.path", "steps": "steps", "eval_every": "eval_every",
              "checkpoint_every": "checkpoint_every", "seed": "seed", "output_dir": "output_dir",
              "report_to": "report_to"}
# Settings a DeepSpeed JSON owns; setting them elsewhere too would silently have no effect.
_DS_OWNED = ("optimizer", "batch_size", "gradient_accumulation_steps", "model.dtype")


def ds_config_path(args: argparse.Namespace) -> str | None:
    """``--ds_config``, or the DeepSpeed config file that ``accelerate launch`` hands over."""
    if getattr(args, "ds_config", None):
        return args.ds_config
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            raise ValueError("accelerate launch with DeepSpeed needs 'deepspeed_config_file' in its config "
                             "(zoscale reads the optimizer and micro-batch from that DeepSpeed JSON)")
        return path
    return None


def engine_name(args: argparse.Namespace, ds_path: str | None) -> str:
    """``--engine``, else ``deepspeed`` with a DeepSpeed JSON, else ``local``; ValueError if unknown."""
    name = getattr(args, "engine", None) or ("deepspeed" if ds_path else "local")
    get_engine(name)
    return name


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run config (file, flags, overrides, DeepSpeed JSON), all checked before any model loads."""
    overrides = list(args.overrides or [])
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    ds_path = ds_config_path(args)
    engine = engine_name(args, ds_path)
    if engine == "deepspeed" and not ds_path:
        raise ValueError("--engine deepspeed needs --ds_config PATH")
    if engine == "local" and ds_path:
        raise ValueError("--ds_config needs --engine deepspeed or fsdp")
    if getattr(args, "hsdp", None) and engine != "fsdp":
        raise ValueError("--hsdp needs --engine fsdp")
    ds_config = None
    if ds_path:
        clash = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].startswith(_DS_OWNED)]
        if clash:
            raise ValueError(f"{clash} come from the DeepSpeed JSON ({ds_path}): set them there, not on the command line")
        in_file = _owned_in_file(getattr(args, "config", None))
        if in_file:
            raise ValueError(f"{in_file} in --config {args.config} come from the DeepSpeed JSON ({ds_path}): "
                             "set them in one place, the DeepSpeed JSON")
    cfg = load_config(args.config, overrides)
    if ds_path:
        ds_config = load_ds_config(ds_path)
        cfg.batch_size = ds_config["train_micro_batch_size_per_gpu"]
        cfg.gradient_accumulation_steps = _accumulation(ds_config, ds_path)
        section = ds_config["optimizer"]
        cfg.optimizer = OptimConfig(type=section["type"], params=dict(section.get("params", {})))
        cfg.model.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(ds_dtype(ds_config), "float32")
        validate(cfg)
    return cfg, ds_config


def _owned_in_file(path: str | None) -> list[str]:
    """The DeepSpeed-owned keys (``optimizer``, ``batch_size``, ...) a ``--config`` file sets."""
    if not path or not os.path.isfile(path):
        return []  # a missing or malformed file is reported by load_config
    import json

    try:
        values = json.loads(open(path).read())
    except (ValueError, OSError):
        return []
    if not isinstance(values, dict):
        return []
    flat = [k for k in values if k != "model"] + [f"model.{k}" for k in (values.get("model") or {})]
    return [k for k in flat if k in _DS_OWNED]


def _accumulation(ds_config: dict[str, Any], ds_path: str) -> int:
    """``gradient_accumulation_steps`` of a DeepSpeed JSON, checked against ``train_batch_size``.

    DeepSpeed's rule: ``train_batch_size = micro-batch x accumulation x world size``; a JSON that
    gives ``train_batch_size`` alone has its accumulation derived from it.
    """
    micro = ds_config["train_micro_batch_size_per_gpu"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulate = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    for key, value in (("gradient_accumulation_steps", accumulate), ("train_batch_size", total)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"DeepSpeed config {ds_path}: {key!r} must be a positive integer, got {value!r}")
    if accumulate is None:
        if total is None:
            return 1
        if total % (micro * world):
            raise ValueError(f"DeepSpeed config {ds_path}: train_batch_size {total} is not a multiple of "
                             f"train_micro_batch_size_per_gpu {micro} x {world} ranks")
        return total // (micro * world)
    if total is not None and total != micro * accumulate * world:
        raise ValueError(f"DeepSpeed config {ds_path}: train_batch_size {total} != train_micro_batch_size_per_gpu "
                         f"{micro} x gradient_accumulation_steps {accumulate} x {world} ranks")
    return accumulate


def _init_distributed(engine: str, timeout_s: float = DIST_TIMEOUT_S) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized() or (world <= 1 and engine == "local"):
        return
    if world <= 1:  # a one-process run of a sharding engine: a process group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if engine == "deepspeed":
        import deepspeed

        from zoscale.engines.deepspeed import disable_shm_comm_build

        disable_shm_comm_build()
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_hsdp(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        r, s = (int(v) for v in value.lower().replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--hsdp must look like REPLICAS,SHARDS (e.g. 2,2), got {value!r}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if r < 1 or s < 1 or r * s != world:
        raise ValueError(f"--hsdp {r},{s} needs {r * s} ranks, this job has {world}")
    return r, s


def _start_watchdog(heartbeat_timeout: float) -> Watchdog | None:
    if heartbeat_timeout <= 0 or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    interval = min(1.0, heartbeat_timeout / 4)
    return Watchdog.from_env(timeout=heartbeat_timeout, interval=interval).start()


def _on_failure(error: BaseException, watchdog: Watchdog | None) -> None:
    """A collective failed because another rank stopped: name it and exit; else publish our own error."""
    if watchdog is None:
        return
    if is_communication_error(error):
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        # A hard bound on the diagnosis, should the store stop answering too.
        grace = watchdog.quick + 2 * watchdog.interval
        bound = threading.Timer(grace + 30.0, _give_up, args=(watchdog.rank, first, grace + 30.0))
        bound.daemon = True
        bound.start()
        lost = watchdog.diagnose(grace)
        if lost is not None:
            watchdog.exit(lost, context=f"this rank's collective failed ({first}); ")
        bound.cancel()
    watchdog.failed(error)


def _give_up(rank: int, first: str, seconds: float) -> None:
    message = (f"[zoscale rank {rank}] this rank's collective failed ({first}) and no other rank could be named "
               f"within {seconds:.0f} s (the rendezvous store does not answer); rank {rank} exits with code "
               f"{EXIT_PEER_LOST}\n")
    os.write(2, message.encode())
    os._exit(EXIT_PEER_LOST)


def _check_timeouts(args: argparse.Namespace) -> tuple[float, float]:
    dist_timeout = getattr(args, "dist_timeout", None)
    heartbeat = getattr(args, "heartbeat_timeout", None)
    dist_timeout = DIST_TIMEOUT_S if dist_timeout is None else float(dist_timeout)
    heartbeat = HEARTBEAT_TIMEOUT_S if heartbeat is None else float(heartbeat)
    if dist_timeout <= 0:
        raise ValueError(f"--dist_timeout must be > 0 seconds, got {dist_timeout}")
    if heartbeat < 0:
        raise ValueError(f"--heartbeat_timeout must be >= 0 seconds (0: no watchdog), got {heartbeat}")
    return dist_timeout, heartbeat


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace,
            job: Callable[..., dict[str, Any]] | None = None) -> int:
    """A command's body: run ``job`` (default: train), print rank 0's summary as JSON.

    A user error (a bad config key or value, a missing file) exits with code 2 and one line.
    """
    try:
        summary = run_from_args(args, job or train)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def run_from_args(args: argparse.Namespace, job: Callable[..., dict[str, Any]] = train) -> dict[str, Any] | None:
    """Resolve the config, start the process group, build the engine, run ``job`` (default: train).

    ``job(cfg, progress=, builder=)`` returns a summary, which rank 0 returns.
    """
    cfg, ds_config = resolve_config(args)
    engine = engine_name(args, ds_config_path(args))
    hsdp = _parse_hsdp(getattr(args, "hsdp", None))
    dist_timeout, heartbeat = _check_timeouts(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _init_distributed(engine, dist_timeout)
    watchdog = _start_watchdog(heartbeat)
    builder = make_builder(engine, cfg, ds_config, hsdp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        summary = job(cfg, progress=not args.no_progress and rank == 0, builder=builder)
    except Preempted:  # every rank stops at the same step, checkpointed: not a failure to publish
        if watchdog is not None:
            watchdog.stop()
        raise
    except BaseException as e:
        _on_failure(e, watchdog)  # does not return when another rank caused the failure
        raise
    else:
        if watchdog is not None:
            watchdog.stop()
    finally:
        if dist.is_initialized():
            # Drop engine objects first: FSDP2 teardown after destroy_process_group
            # occasionally aborted the process ("terminate called without an active exception").
            import gc

            gc.collect()
            dist.destroy_process_group()
    return summary if rank == 0 else None
