"""ZO-Bench family: the optimizer's own cost per step (noise passes, state update), as JSON.

The closure is nearly free (a sum over 1000 elements), so the step time is the optimizer's:
perturbation passes (fused compiled kernels), the restore + update pass (MeZO / Sign: one fused
kernel; MMT / Adam: ``noise.generate`` per chunk + torch's update ops; Cons: candidate writes),
and the bytes of state each keeps per byte of parameters.

    python benchmarks/bench_zo_bench.py --numel 20000000 --steps 3

Figures on a shared 2-core machine are noisy: run it when the machine is quiet, compare ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zoscale.optim.mezo import MeZO
from zoscale.optim import ZOAdam, ZOSGDCons, ZOSGDMMT, ZOSGDSign

OPTIMIZERS = {"mezo": MeZO, "zo_sgd_sign": ZOSGDSign, "zo_sgd_mmt": ZOSGDMMT, "zo_sgd_cons": ZOSGDCons,
              "zo_adam": ZOAdam}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=20_000_000, help="total trainable elements (8 tensors)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per optimizer (after one warm-up)")
    parser.add_argument("--noise", default="gaussian", choices=["gaussian", "rademacher"])
    parser.add_argument("--master", action="store_true", help="fp32 master weights")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    results = {}
    for name, cls in OPTIMIZERS.items():
        params = [torch.nn.Parameter(torch.randn(args.numel // 8, generator=gen) * 0.02) for _ in range(8)]

        def closure() -> torch.Tensor:
            return params[0][:1000].sum()

        opt = cls([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-6, eps=1e-3, noise=args.noise,
                  master_weights=args.master)
        opt.step(closure)  # compile, allocate state
        totals, phases = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.step(closure)
            totals.append(time.perf_counter() - t0)
            phases.append(opt.last_step_timing)
        state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                          if isinstance(t, torch.Tensor))
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        results[name] = {
            "step_s_median": statistics.median(totals),
            **{f"{k}_s_median": statistics.median(p.get(k, 0.0) for p in phases)
               for k in ("perturb", "forward", "update")},
            "state_bytes_per_param_byte": state_bytes / param_bytes,
            # ZOSGDCons without master weights copies the shards for the step (freed after it).
            "transient_copy_bytes_per_param_byte": 1.0 if cls is ZOSGDCons and not args.master else 0.0,
        }
    base = results["mezo"]["step_s_median"]
    for r in results.values():
        r["step_vs_mezo"] = r["step_s_median"] / base
    print(json.dumps({"numel": args.numel, "noise": args.noise, "master_weights": args.master,
                      "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
