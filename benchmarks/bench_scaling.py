"""Scaling benchmark: communication per step and throughput of a ZO step over 1, 2, 4 ranks and 2 nodes.

For every layout and engine, fresh gloo ranks build the same random ``LlamaForCausalLM``, wrap it,
and run ``--steps`` timed MeZO steps (after one warm-up step) on a micro-batch of ``--micro`` x
``--seq`` random tokens per rank (weak scaling: the global batch grows with the ranks). Every
collective is counted by wrapping ``torch.distributed``'s functions and DeepSpeed's cached
all-gather / reduce-scatter (tests/distributed/collectives.py), outermost call only,
split into:

* ``optimizer``: collectives issued by ``optimizer.step`` outside the forwards (zoscale's own
  traffic: one all-reduce of the loss pair per query, 2 float64 = 16 bytes);
* ``forward``: collectives issued inside the closure (the engine's parameter all-gathers).

For each, per rank and step: ``calls``, ``payload_bytes`` (size of the full tensor the collective
produces: the gathered parameter for an all-gather, the reduced tensor for an all-reduce) and
``wire_bytes`` (what a rank receives with ring algorithms: ``(g-1)/g`` of an all-gather's
output, ``2(g-1)/g`` of an all-reduce's tensor, for a group of ``g`` ranks), and the part of
``wire_bytes`` in collectives whose group spans nodes (``inter_node_wire_bytes``; a rank's node
is ``rank // ranks_per_node``). Throughput: ``examples_per_s`` = global batch / median step
time (each step's time is the slowest rank's).

Layouts: ``1``, ``2``, ``4`` ranks on one node (``torch.multiprocessing.spawn``) and ``2x2``:
two torchrun launchers (``--nnodes 2 --node_rank N --nproc_per_node 2``) on this machine, as on
two nodes. Engines: ``zero3`` (DeepSpeed ZeRO-3, persistence threshold 0: every tensor
sharded), ``fsdp`` (FSDP2 over all ranks), ``hsdp`` (FSDP2, shard inside a node, replicate
across nodes: ``2x2`` only) and ``replicas`` (every rank holds the whole model).

    .venv/bin/python benchmarks/bench_scaling.py                        # ~2-3 min on an idle 2-core machine
    .venv/bin/python benchmarks/bench_scaling.py --layouts 1 2 --engines zero3 --steps 2
    .venv/bin/python benchmarks/bench_scaling.py --shape tiny           # the test model (91k params)

On this machine (2 cores, loopback) the time is not a speed-up measurement: 4 ranks share 2
cores. The byte counts are exact and hold on any hardware; README.md extrapolates them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _harness import free_port  # noqa: E402

from tests.distributed.collectives import Call, Collectives  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=262),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096),
}


# ---------------------------------------------------------------------- counting
def _wire_bytes(call: Call) -> float:
    """What a rank receives for ``call`` with ring algorithms over its group of ``g`` ranks."""
    g = len(call.ranks)
    if "reduce" in call.name and "scatter" not in call.name:  # all_reduce, reduce
        return 2 * (g - 1) / g * call.nbytes
    if "gather" in call.name or "scatter" in call.name or "all_to_all" in call.name:
        return (g - 1) / g * call.nbytes
    return float(call.nbytes) if call.name == "broadcast" else 0.0


def traffic_summary(calls: list[Call], steps: int, ranks_per_node: int) -> dict[str, dict[str, Any]]:
    """Per step: calls, payload, wire and inter-node wire bytes of the optimizer's and the forwards' calls."""
    out = {}
    for part, forward in (("optimizer", False), ("forward", True)):
        rs = [c for c in calls if (c.forward is not None) == forward]
        wire = [_wire_bytes(c) for c in rs]
        inter_node = [len({r // ranks_per_node for r in c.ranks}) > 1 for c in rs]
        out[part] = {
            "calls_per_step": len(rs) / steps,
            "payload_bytes_per_step": sum(c.nbytes for c in rs) / steps,
            "wire_bytes_per_step": sum(wire) / steps,
            "inter_node_wire_bytes_per_step": sum(w for w, x in zip(wire, inter_node) if x) / steps,
            "ops": sorted({c.name for c in rs}),
        }
    return out


# ---------------------------------------------------------------------- one layout, one engine
def _model(shape: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True, **SHAPES[shape])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM._from_config(cfg)


def _build(engine: str, shape: str, ranks_per_node: int) -> tuple[Any, Any, int]:
    """``(forward callable, optimizer, sharded parameter count)`` for ``engine``."""
    import torch.distributed as dist

    from zoscale.optim.mezo import MeZO

    world = dist.get_world_size()
    opts = dict(lr=1e-4, eps=1e-3, seed=0, noise="rademacher")
    model = _model(shape)
    numel = sum(p.numel() for p in model.parameters())
    if engine == "zero3":
        from zoscale.engines import zero3_engine

        cfg = {"train_micro_batch_size_per_gpu": 1,
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
               "optimizer": {"type": "MeZO", "params": opts}, "steps_per_print": 10**9}
        wrapped, opt = zero3_engine(model, cfg)
        return wrapped, opt, numel
    if engine in ("fsdp", "hsdp"):
        from zoscale.engines.fsdp import FSDPEngine

        hsdp = (world // ranks_per_node, ranks_per_node) if engine == "hsdp" else None
        wrapped = FSDPEngine(model, hsdp=hsdp)
        opt = MeZO(wrapped.module.named_parameters(), shards=wrapped.shards, **opts)
        return wrapped.module, opt, numel
    if engine == "replicas":
        return model, MeZO(model.named_parameters(), **opts), numel
    raise ValueError(f"unknown engine {engine!r}")


def run_engine(engine: str, args: argparse.Namespace, ranks_per_node: int) -> dict[str, Any]:
    """Build, warm up, time ``args.steps`` steps, count traffic; every rank returns the same record."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    forward, opt, numel = _build(engine, args.shape, ranks_per_node)
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.micro, args.seq), generator=g)

    def loss() -> torch.Tensor:
        return forward(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        opt.step(loss)  # warm-up: DeepSpeed records its module trace, kernels are built
        traffic = Collectives(deepspeed="deepspeed" in sys.modules, outermost=True)
        times = []
        barrier = dist.barrier  # the benchmark's own, not counted
        with traffic:
            for _ in range(args.steps):
                barrier()
                t0 = time.perf_counter()
                opt.step(traffic.closure(loss))
                times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    step_s = statistics.median(slowest.tolist())
    comm = traffic_summary(traffic.calls, args.steps, ranks_per_node)
    local = torch.tensor([comm["forward"]["wire_bytes_per_step"], comm["optimizer"]["wire_bytes_per_step"]],
                         dtype=torch.float64)
    spread = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(spread, local)
    return {
        "engine": engine, "world_size": world, "nodes": world // ranks_per_node, "ranks_per_node": ranks_per_node,
        "params": numel, "param_bytes": numel * 4, "global_batch": args.micro * world, "seq": args.seq,
        "step_s": step_s, "examples_per_s": args.micro * world / step_s, **comm,
        "forward_wire_bytes_per_rank": [float(s[0]) for s in spread],
    }


def worker_main(args: argparse.Namespace) -> None:
    """One rank: run every engine of this layout; rank 0 appends the records to ``args.out``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "deepspeed" in args.engines or "zero3" in args.engines:
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.init_process_group("gloo")
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    records = []
    for engine in args.engines:
        if engine == "hsdp" and dist.get_world_size() // ranks_per_node < 2:
            continue  # HSDP needs replicas on several nodes
        records.append(run_engine(engine, args, ranks_per_node))
        dist.barrier()
    if dist.get_rank() == 0:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps({"layout": args.layout, **r}) + "\n")
    dist.barrier()
    # Leave without tearing the engines down: FSDP2/DeepSpeed objects destroyed at interpreter
    # exit occasionally abort the process ("terminate called without an active exception"),
    # and torchrun would then fail the layout although every record is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    worker_main(args)


def run_layout(layout: str, args: argparse.Namespace, out: Path) -> float:
    """Run one layout (``"1"``, ``"2"``, ``"4"`` or ``"NxM"``); its wall time."""
    t0 = time.perf_counter()
    worker_args = [*sys.argv[1:]]
    if "x" in layout:
        nodes, per_node = (int(v) for v in layout.split("x"))
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        cmds = [[str(Path(sys.executable).parent / "torchrun"), "--nnodes", str(nodes), "--node_rank", str(n),
                 "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                 __file__, "--worker", "--layout", layout, "--out", str(out), *worker_args] for n in range(nodes)]
        logs = [out.parent / f"{layout}-node{n}.log" for n in range(nodes)]  # files: a full pipe would block
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
                 for c, log in zip(cmds, logs)]
        try:
            for p, log in zip(procs, logs):
                if p.wait(timeout=max(1.0, t0 + args.timeout - time.perf_counter())) != 0:
                    raise RuntimeError(f"layout {layout} failed:\n{log.read_text()[-3000:]}")
        finally:
            for p in procs:  # on failure or timeout: SIGTERM lets torchrun stop its ranks first
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
    else:
        import torch.multiprocessing as mp

        world = int(layout)
        wargs = argparse.Namespace(**{**vars(args), "layout": layout, "out": str(out)})
        mp.spawn(_spawned, args=(world, free_port(), wargs), nprocs=world, join=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["1", "2", "4", "2x2"],
                    help="ranks on one node (1, 2, 4) or NODESxRANKS_PER_NODE via torchrun launchers")
    ap.add_argument("--engines", nargs="+", default=["zero3", "fsdp", "hsdp", "replicas"],
                    choices=["zero3", "fsdp", "hsdp", "replicas"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per layout before its ranks are killed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.jsonl"
        walls = {layout: run_layout(layout, args, out) for layout in args.layouts}
        records = [json.loads(line) for line in out.read_text().splitlines()]
    result = {
        "meta": {"shape": args.shape, "shape_config": SHAPES[args.shape], "steps": args.steps, "micro": args.micro,
                 "seq": args.seq, "noise": "rademacher", "dtype": "float32", "cpu_count": os.cpu_count(),
                 "layout_wall_s": walls, "total_wall_s": time.perf_counter() - t0},
        "records": records,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
