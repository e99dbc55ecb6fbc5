"""LeZO step-time benchmark: perturb + update time against the active fraction, and the step speed-up.

What is measured (one process, ``time.perf_counter``, medians over ``--repeats`` timed rounds
after one warm-up round; every optimizer is stepped once per round, interleaved, so all of them
see the same machine load):

* the model of ``bench_step.py``: a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's
  shape (30 layers; ``--quick``: 6), batch 16 x 32, last-position cross-entropy as the closure;
* trainable parameters as the default job trains them (``--trainable non_embedding``: the tied
  embedding / head frozen, so LeZO's units are the 30 blocks plus the final norm) or ``all``;
* for each sparsity rho in ``--sparsity`` (default 0, 0.5, 0.75, 0.9): one
  ``LeZO(lr=0, eps=1e-3, sparsity=rho).step(closure)`` per round (rho = 0 is MeZO bit for bit;
  lr = 0 keeps the weights where they are). From ``optimizer.last_step_timing``:
  ``perturb_update_s`` (the two perturbation passes plus the fused restore + update pass),
  ``forward_s`` (two forwards) and the step's wall time ``step_s``;
* ``active_param_fraction``: parameters the step's drawn units hold over all trainable ones,
  averaged over the timed steps (units differ in size, so this, not 1 - rho, is what the noise
  passes should scale with).

Derived: ``perturb_update_vs_mezo`` (LeZO's perturb + update time over MeZO's, to compare with
``active_param_fraction``) and ``step_speedup_vs_mezo`` (MeZO step time over LeZO's). The paper
reports >3x on OPT-13B on GPUs, where a forward is cheap relative to the noise passes; on this
CPU a forward costs much more than a fused noise pass, so the whole-step speed-up is bounded by
``step / (2 x forward)`` of MeZO (see ``bench_step.py``).

JSON on stdout, progress on stderr. Run from the repository root::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lezo.py            # SmolLM2 shape, 30 layers
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lezo.py --quick    # 6 layers, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import progress  # noqa: E402
from bench_step import CpuMonitor, build_model, cpu_model, load_average, make_closure  # noqa: E402

from zoscale.optim.lezo import LeZO, unit_of  # noqa: E402
from zoscale.shards import canonical_name  # noqa: E402
from zoscale.train.trainer import trainable_parameters  # noqa: E402

log = progress("bench_lezo")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 30; --quick 6)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; --quick 3)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--noise", choices=("gaussian", "rademacher"), default="gaussian")
    ap.add_argument("--trainable", choices=("non_embedding", "all"), default="non_embedding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    layers = args.layers or (6 if args.quick else 30)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.set_num_threads(args.threads)

    log(f"building a {layers}-layer SmolLM2-shaped model")
    model = build_model(layers, torch.float32, seed=0)
    closure = make_closure(model, args.batch, args.seq_len, seed=0)
    named = trainable_parameters(model, args.trainable)
    sizes: dict[str, int] = {}
    for name, p in named:
        unit = unit_of(canonical_name(name))
        sizes[unit] = sizes.get(unit, 0) + p.numel()
    total = sum(sizes.values())
    opts = {rho: LeZO(named, lr=0.0, eps=1e-3, sparsity=rho, noise=args.noise, seed=1) for rho in args.sparsity}

    samples: dict[float, dict[str, list[float]]] = {rho: {"step_s": [], "perturb_update_s": [], "forward_s": [],
                                                           "active_param_fraction": []} for rho in opts}
    monitor = CpuMonitor()
    log(f"{len(opts)} optimizers x (1 warm-up + {repeats}) rounds; first steps compile the noise kernels")
    for i in range(1 + repeats):
        if i == 1:
            monitor.start()
        for rho, opt in opts.items():
            step = opt.step_count
            active = sum(sizes[u] for u in opt.active_units(step))
            t0 = time.perf_counter()
            opt.step(closure)
            dt = time.perf_counter() - t0
            if i == 0:
                continue
            t = opt.last_step_timing
            s = samples[rho]
            s["step_s"].append(dt)
            s["perturb_update_s"].append(t.get("perturb", 0.0) + t.get("update", 0.0))
            s["forward_s"].append(t.get("forward", 0.0))
            s["active_param_fraction"].append(active / total)
        log(f"round {i} done")
    other = monitor.stop()

    results = []
    med = {rho: {k: statistics.median(v) for k, v in s.items()} for rho, s in samples.items()}
    base = med.get(0.0)
    for rho in opts:
        m = med[rho]
        rec = {"sparsity": rho, "units": len(opts[rho].units), "active_units": opts[rho].active_count,
               "active_param_fraction": round(statistics.mean(samples[rho]["active_param_fraction"]), 4),
               "step_s": round(m["step_s"], 4), "perturb_update_s": round(m["perturb_update_s"], 4),
               "forward_s": round(m["forward_s"], 4),
               "samples": {k: [round(x, 4) for x in v] for k, v in samples[rho].items() if k != "active_param_fraction"}}
        if base is not None:
            rec["perturb_update_vs_mezo"] = round(m["perturb_update_s"] / base["perturb_update_s"], 3)
            rec["step_speedup_vs_mezo"] = round(base["step_s"] / m["step_s"], 3)
        results.append(rec)
    out = {
        "meta": {"torch": torch.__version__, "cpu": cpu_model(), "threads": args.threads, "layers": layers,
                 "trainable": args.trainable, "trainable_params": total, "batch": args.batch,
                 "seq_len": args.seq_len, "noise": args.noise, "repeats": repeats,
                 "load_average": load_average(), "other_processes_cpu_share": other,
                 "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "results": results,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
