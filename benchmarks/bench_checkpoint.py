"""What checkpoints cost: the step log against a full checkpoint, on SmolLM2-135M, 1 and 2 ranks.

Measured, for each ``--world`` (1: one process; 2: FSDP2 on 2 gloo ranks, fresh processes):
``--steps`` MeZO steps of the real SmolLM2-135M (fp32, every weight trainable, a fixed global
8 x 32 batch) writing ``steps.jsonl`` as the trainer does
(``zoscale.train.step_log_file``); then a full checkpoint of the same run
(``zoscale.train.checkpoint``, DCP: each rank's shards plus the optimizer state); then two resumes on
fresh base weights, by loading that checkpoint and by replaying the log, timed, each checked to
give the run's weights bit for bit. Printed as JSON: log bytes (header, per step), checkpoint
bytes and save seconds, the two resume times, and the extrapolation to a large run::

    replay seconds per step ~= passes x 2 x shard bytes / memory bandwidth     (passes: 3 per two-sided
                                                                              query, 2 with two_pass)
    log bytes ~= header + steps x bytes per step                             (a few hundred bytes a step)
    full checkpoint bytes = P x bytes per weight (+ 4 P with fp32 master weights, + optimizer state)

for ``--extrapolate-params`` parameters sharded over ``--extrapolate-ranks`` GPUs with
``--extrapolate-bandwidth`` GB/s of device memory bandwidth each (defaults: OPT-66B, 64 GPUs,
2000 GB/s, 20k steps; assumptions, not measurements)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_checkpoint.py --steps 10 --world 1 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import free_port, progress, spawn_records  # noqa: E402

from zoscale.models import load_smollm2  # noqa: E402
from zoscale.optim import MeZO  # noqa: E402
from zoscale.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from zoscale.train.fingerprint import weights_fingerprint  # noqa: E402
from zoscale.train.step_log_file import StepLogWriter, read_step_log  # noqa: E402

log = progress("bench_checkpoint")


class _Rank:
    """One rank's model, engine and optimizer (one process, or FSDP2 on ``world`` gloo ranks)."""

    def __init__(self, world: int, args: argparse.Namespace) -> None:
        model, _ = load_smollm2()
        if world == 1:
            self.module, shards = model, None
        else:
            from zoscale.engines import FSDPEngine

            engine = FSDPEngine(model)
            self.module, shards = engine.module, engine.shards
        self.opt = MeZO(self.module.named_parameters(), lr=1e-6, eps=1e-3, seed=0, noise=args.noise,
                        **({"shards": shards} if shards is not None else {}))

    def shards(self) -> list[torch.Tensor]:
        return [e.view.local.detach().clone() for e in self.opt.shard_entries()]


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def measure(rank: int, world: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One rank's figures: train and log, checkpoint, resume by loading and by replaying."""
    run = _Rank(world, args)
    ids = torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = ids[rank * 8 // world:(rank + 1) * 8 // world]
    fingerprint = weights_fingerprint(run.opt)
    writer = StepLogWriter(tmp / "steps.jsonl", {"noise": args.noise, "base": fingerprint}) if rank == 0 else None
    header_bytes = (tmp / "steps.jsonl").stat().st_size if rank == 0 else 0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        first = len(run.opt.step_log)
        run.opt.step(lambda: run.module(input_ids=ids, labels=ids).loss)
        if writer is not None:
            writer.append(step, run.opt.step_log[first:])
    train_s = time.perf_counter() - t0
    if writer is not None:
        writer.close()
    trained = run.shards()
    t0 = time.perf_counter()
    ckpt = save_checkpoint(tmp / "checkpoints", args.steps, run.opt, rank, world, keep=1)
    save_s = time.perf_counter() - t0
    log_bytes = (tmp / "steps.jsonl").stat().st_size
    del run
    gc.collect()

    fresh = _Rank(world, args)
    t0 = time.perf_counter()
    load_checkpoint(ckpt, fresh.opt, rank, world)
    load_s = time.perf_counter() - t0
    loaded_ok = all(torch.equal(a, b) for a, b in zip(fresh.shards(), trained))
    del fresh
    gc.collect()
    fresh = _Rank(world, args)
    records = [r for _, recs in read_step_log(tmp / "steps.jsonl")[1] for r in recs]
    t0 = time.perf_counter()
    fresh.opt.replay(records)
    replay_s = time.perf_counter() - t0
    replayed_ok = all(torch.equal(a, b) for a, b in zip(fresh.shards(), trained))
    del fresh
    gc.collect()
    own = sum(f.stat().st_size for f in ckpt.glob(f"__{rank}_*.distcp"))  # this rank's DCP data files
    if rank == 0:
        log(f"world {world}: log {log_bytes} B; checkpoint {_bytes(ckpt)} B in {save_s:.1f} s; "
            f"load {load_s:.1f} s, replay {replay_s:.1f} s")
    return {
        "world": world, "engine": "local" if world == 1 else "fsdp2", "steps": args.steps, "noise": args.noise,
        "log_bytes": log_bytes, "log_header_bytes": header_bytes if rank == 0 else None,
        "log_bytes_per_step": (log_bytes - header_bytes) / args.steps if rank == 0 else None,
        "checkpoint_bytes_all_ranks": _bytes(ckpt), "checkpoint_bytes_this_rank": own,
        "checkpoint_save_s": save_s, "resume_load_checkpoint_s": load_s, "resume_replay_s": replay_s,
        "replay_s_per_step": replay_s / args.steps, "train_s_per_step": train_s / args.steps,
        "weights_equal_after_load": loaded_ok, "weights_equal_after_replay": replayed_ok,
        "threads": torch.get_num_threads(),
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (args.threads or 2) // world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        return measure(rank, world, args, Path(tmp))
    finally:
        gc.collect()
        torch.distributed.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="zoscale_ckpt_") as tmp:
        if world == 1:
            return measure(0, 1, args, Path(tmp))
        records = spawn_records(_worker, world, world, free_port(), args, tmp)
        return {**records[0], "per_rank": records}


def extrapolate(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    P, W, bw = args.extrapolate_params, args.extrapolate_ranks, args.extrapolate_bandwidth * 1e9
    shard = P * 2 / W  # bf16 bytes per GPU
    per_step = {passes: passes * 2 * shard / bw for passes in (3, 2)}
    return {
        "params": P, "ranks": W, "bytes_per_weight": 2, "memory_bandwidth_GBps": args.extrapolate_bandwidth,
        "steps": args.extrapolate_steps,
        "log_bytes": 4096 + 64 * args.extrapolate_tensors + args.extrapolate_steps * measured["log_bytes_per_step"],
        "full_checkpoint_bytes_bf16": P * 2, "full_checkpoint_bytes_with_fp32_masters": P * 6,
        "replay_s_per_step": {"three_pass": per_step[3], "two_pass": per_step[2]},
        "replay_s_all_steps": {"three_pass": per_step[3] * args.extrapolate_steps,
                               "two_pass": per_step[2] * args.extrapolate_steps},
        "assumptions": "memory-bound passes at the given bandwidth; header: 4 KiB of config + 64 B of "
                       "fingerprint per tensor; bytes per step as measured (q = 1)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="1: one process; 2: FSDP2 on 2 ranks")
    parser.add_argument("--noise", default="gaussian")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--extrapolate-params", type=float, default=66e9)
    parser.add_argument("--extrapolate-tensors", type=int, default=1156)  # OPT-66B: 64 layers x 16 + 12
    parser.add_argument("--extrapolate-ranks", type=int, default=64)
    parser.add_argument("--extrapolate-bandwidth", type=float, default=2000.0)
    parser.add_argument("--extrapolate-steps", type=int, default=20000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = {f"world_{w}": run_world(w, args) for w in args.world}
    first = measured[f"world_{args.world[0]}"]
    print(json.dumps({"measured": measured, "extrapolated": extrapolate(first, args)}, indent=2))


if __name__ == "__main__":
    main()
