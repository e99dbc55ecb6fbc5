"""Pass-time benchmark of LOZO's low-rank perturbation against MeZO's fused noise pass (CPU).

Tensors: the weight matrices of ``--layers`` decoder layers of SmolLM2-135M's shape (q/o 576 x
576, k/v 192 x 576, gate/up 1536 x 576, down 576 x 1536; 3.5M elements per layer), fp32, held
by one process (``offset`` 0) or, with ``--shard``, as rank 0 of 2 ZeRO-3-style flat partitions
(so shards cut rows). Measured (wall clock, median of ``--repeats`` rounds after a warm-up
round; all quantities of a round timed back to back):

* ``floor_pass_s``: ``x.add_(1e-3)`` over every tensor: the memory floor of a pass.
* ``mezo_pass_s[kind]``: ``noise.axpbz_`` (the compiled fused kernel) over every tensor.
* ``lozo_pass_s[r]``: one LOZO perturbation pass (``LOZO._perturb``: build ``U V^T`` row block by
  row block, ``x += eps U V^T``) with factors generated beforehand.
* ``lozo_factors_s[r]``: generating ``U`` (the shard's rows) and ``V`` for every tensor, once per
  query (``LOZO._directions``).

JSON on stdout; progress on stderr. Timings are sensitive to other processes (the JSON records
the load average). Run from the repository root::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lozo.py --layers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import torch

from _harness import progress
from zoscale import noise
from zoscale.optim.base import ShardEntry
from zoscale.optim.lowrank import LowRank
from zoscale.optim.lozo import LOZO
from zoscale.shards import ShardView

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


log = progress("bench_lozo")


def entries(layers: int, shard: bool) -> list[ShardEntry]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(layers):
        for name, (m, n) in SHAPES.items():
            numel = m * n
            ps = (numel + 1) // 2
            local = torch.randn(ps if shard else numel, generator=g) * 0.02
            view = ShardView(local, 0, numel, torch.Size((m, n)), not shard)
            out.append(ShardEntry(0, local, view, f"model.layers.{i}.{name}.weight", {}))
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard", action="store_true", help="rank 0 of 2 flat partitions (rows cut)")
    args = parser.parse_args()
    ents = entries(args.layers, args.shard)
    elements = sum(e.view.local.numel() for e in ents)
    optimizers = {r: LOZO([torch.nn.Parameter(torch.zeros(1))], rank=r, nu=50) for r in (1, 2)}
    samples: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    for round_ in range(args.repeats + 1):
        sign = 1.0 if round_ % 2 == 0 else -1.0
        results = {"floor_pass_s": timed(lambda: [e.view.local.add_(sign * 1e-3) for e in ents])}
        for kind in ("gaussian", "rademacher"):
            results[f"mezo_pass_s.{kind}"] = timed(
                lambda: [noise.axpbz_(e.view.local, 0, 1234 + i, 1.0, sign * 1e-3, kind) for i, e in enumerate(ents)])
        for r, opt in optimizers.items():
            dirs: list[Any] = []
            results[f"lozo_factors_s.r{r}"] = timed(
                lambda: dirs.extend(LowRank.for_query(opt, ents, round_, 0, seed=0)))
            results[f"lozo_pass_s.r{r}"] = timed(lambda: [d.perturb_(sign * 1e-3, sign * 1e-3) for d in dirs])
        if round_ == 0:
            log(f"warm-up (compiles the noise kernels): {results}")
            continue
        for k, v in results.items():
            record(k, v)
        log(f"round {round_}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    median = {k: statistics.median(v) for k, v in samples.items()}
    floor = median["floor_pass_s"]
    print(json.dumps({
        "elements": elements, "layers": args.layers, "sharded": args.shard, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "median_s": median,
        "ratio_to_floor": {k: v / floor for k, v in median.items() if k != "floor_pass_s"},
        "samples_s": samples,
    }, indent=2))


if __name__ == "__main__":
    main()
