"""What checkpoints cost: the step log against a full checkpoint, on SmolLM2-135M (one process).

Measured, in one run: ``--steps`` MeZO steps of the real SmolLM2-135M (fp32, every weight
trainable, a fixed 8 x 32 batch) writing ``steps.jsonl`` as the trainer does
(``zoscale.train.step_log_file``); then a full checkpoint of the same run
(``zoscale.train.checkpoint``: this rank's shards plus the optimizer state); then two resumes on
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

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_checkpoint.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import progress  # noqa: E402

from zoscale.models import load_smollm2  # noqa: E402
from zoscale.optim import MeZO  # noqa: E402
from zoscale.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from zoscale.train.fingerprint import weights_fingerprint  # noqa: E402
from zoscale.train.step_log_file import StepLogWriter, read_step_log  # noqa: E402

log = progress("bench_checkpoint")


def _optimizer(model: torch.nn.Module, args: argparse.Namespace) -> MeZO:
    return MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0, noise=args.noise)


def _closure(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    return lambda: model(input_ids=ids, labels=ids).loss


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model, _ = load_smollm2()
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    opt = _optimizer(model, args)
    writer = StepLogWriter(tmp / "steps.jsonl", {"noise": args.noise, "base": weights_fingerprint(opt)})
    header_bytes = (tmp / "steps.jsonl").stat().st_size
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        first = len(opt.step_log)
        opt.step(_closure(model, ids))
        writer.append(step, opt.step_log[first:])
    train_s = time.perf_counter() - t0
    writer.close()
    log_bytes = (tmp / "steps.jsonl").stat().st_size
    t0 = time.perf_counter()
    save_checkpoint(tmp / "checkpoints", args.steps, opt, 0, 1, keep=1)
    save_s = time.perf_counter() - t0
    ckpt = next((tmp / "checkpoints").glob("step_*"))
    log(f"{args.steps} steps in {train_s:.1f} s; log {log_bytes} B; checkpoint {_bytes(ckpt)} B in {save_s:.1f} s")

    fresh, _ = load_smollm2()
    t0 = time.perf_counter()
    load_checkpoint(ckpt, _optimizer(fresh, args), 0, 1)
    load_s = time.perf_counter() - t0
    loaded_ok = _same(fresh, model)
    fresh, _ = load_smollm2()
    records = [r for _, recs in read_step_log(tmp / "steps.jsonl")[1] for r in recs]
    replayer = _optimizer(fresh, args)
    t0 = time.perf_counter()
    replayer.replay(records)
    replay_s = time.perf_counter() - t0
    replayed_ok = _same(fresh, model)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": "SmolLM2-135M fp32", "params": n_params, "steps": args.steps, "noise": args.noise,
        "log_bytes": log_bytes, "log_header_bytes": header_bytes,
        "log_bytes_per_step": (log_bytes - header_bytes) / args.steps,
        "checkpoint_bytes": _bytes(ckpt), "checkpoint_save_s": save_s,
        "resume_load_checkpoint_s": load_s, "resume_replay_s": replay_s,
        "replay_s_per_step": replay_s / args.steps, "train_s_per_step": train_s / args.steps,
        "weights_equal_after_load": loaded_ok, "weights_equal_after_replay": replayed_ok,
        "threads": torch.get_num_threads(),
    }


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
    with tempfile.TemporaryDirectory(prefix="zoscale_ckpt_") as tmp:
        measured = measure(args, Path(tmp))
    print(json.dumps({"measured": measured, "extrapolated": extrapolate(measured, args)}, indent=2))


if __name__ == "__main__":
    main()
