"""Sparse MeZO against MeZO: peak memory and step time of one process on a small Llama.

What is measured, for each optimizer (``mezo``: ``zoscale.optim.mezo.MeZO``; ``sparse_mezo``:
``zoscale.optim.sparse_mezo.SparseMeZO`` with ``--sparsity``, default 0.8) and each
``master_weights`` setting asked for (``--master``: without, with or both), in a fresh process
(``torch.multiprocessing`` spawn, so peaks never carry over):

* the same randomly initialised ``LlamaForCausalLM`` built from a config (``--shape small``:
  hidden 256, 8 layers, vocabulary 8192, ~10.5M parameters, fp32; ``smollm2``: SmolLM2-135M's
  shape) and the same batch of ``--batch`` x ``--seq`` random tokens, loss = next-token
  cross-entropy (``labels=input_ids``), closure under ``torch.no_grad()``;
* ``lr=1e-6, eps=1e-3``, ``--noise`` (default gaussian), seed 0.

Per process, in this order (glibc's mmap threshold fixed at 128 KiB first, see
:func:`static_mmap_threshold`):

1. The noise kernels are compiled first by two steps of the same optimizer on a tiny Llama
   (``zoscale.models.tiny_llama``) and on a one-layer model of the measured shape, so that
   compilation (RSS of dynamo/inductor, not tensors) is out of every figure below;
   ``compile_s`` is its wall time.
2. ``gc.collect()``, glibc ``malloc_trim(0)`` and a reset of the RSS high-water mark
   (``/proc/self/clear_refs``), then ``pre_model_mib`` = VmRSS. The model and optimizer are
   built; ``weights_mib`` = bytes of the parameters.
3. The first step (``first_step_s``; Sparse MeZO fixes its thresholds there, timed as
   ``threshold_s``; masters are allocated there). ``first_step_footprint_mib`` = VmHWM -
   pre_model over build + first step.
4. Trim + reset again, ``baseline_mib`` = VmRSS; ``--steps`` timed steps: ``step_s`` (median),
   ``phases_s`` (medians of ``optimizer.last_step_timing``); ``peak_mib`` = VmHWM,
   ``footprint_mib`` = peak - pre_model (everything the model, the optimizer state and the steps
   hold at their peak), ``delta_mib`` = peak - baseline (what a step adds over the steady state).
5. One more step under ``torch.profiler`` (``profile_memory=True``): ``alloc_peak_mib`` is the
   peak of torch-tensor bytes allocated during that step over those alive before it (exact;
   Sparse MeZO's packed masks are in it). ``tensor_footprint_mib`` = weights + optimizer state
   tensors + alloc peak: the allocator-exact analogue of ``footprint_mib``.

Also recorded: ``state_mib`` (tensors in ``optimizer.state``: fp32 masters), ``mask_mib`` (the
packed masks a Sparse MeZO query holds without master weights: ``mask_words`` x 4 bytes per
tensor, 1/32 of the fp32 weights) and ``other_cpu_share`` (the share of the machine's CPU that
other processes used during the timed steps: on a shared machine step times are noise above
~0.05).

Step times are compared in one more process per ``master_weights`` setting (``timing``): two
copies of the model, one per optimizer, first step of each untimed, then ``--repeats`` rounds
that alternate one MeZO step and one Sparse MeZO step, so both see the same machine load.
``step_s`` / ``phases_s`` are medians (``perturb`` holds both perturbation passes, ``update``
the fused restore + update), ``min_step_s`` the fastest sample. ``passes`` then times single
noise passes over all parameters, masked against unmasked, interleaved (see ``_pass_times``):
on a busy machine the minima are the figures to read.

The summary gives, per ``master_weights``, ``sparse_over_mezo`` ratios by footprint, peak RSS,
tensor footprint, alloc peak, and step time and phases from the interleaved timing, and
``within_5pct`` (by footprint and by tensor footprint: the target is Sparse MeZO's peak memory
within 5% of MeZO's).

Run from the repository root (JSON on stdout, progress on stderr)::

    .venv/bin/python benchmarks/bench_sparse_mezo.py                    # small shape, no master (~40 s)
    .venv/bin/python benchmarks/bench_sparse_mezo.py --master both
    .venv/bin/python benchmarks/bench_sparse_mezo.py --shape smollm2 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import progress, spawn_records  # noqa: E402
from bench_memory import MIB, SHAPES, alloc_peak_mib, proc_status_mib, trim_and_reset_hwm  # noqa: E402
from bench_step import CpuMonitor, load_average  # noqa: E402

OPTIMIZERS: tuple[str, ...] = ("mezo", "sparse_mezo")
TARGET = 1.05  # Sparse MeZO's peak memory within 5% of MeZO's


log = progress("bench_sparse_mezo")


def build_optimizer(name: str, named: Any, master: bool, args: argparse.Namespace) -> Any:
    """The optimizer of a mode (both with lr 1e-6, eps 1e-3, seed 0)."""
    from zoscale.optim.mezo import MeZO
    from zoscale.optim.sparse_mezo import SparseMeZO

    kw = dict(lr=1e-6, eps=1e-3, noise=args.noise, seed=0, master_weights=master)
    if name == "sparse_mezo":
        return SparseMeZO(named, sparsity=args.sparsity, **kw)
    return MeZO(named, **kw)


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def _measure(name: str, master: bool, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoscale import noise
    from zoscale.models import tiny_llama

    # 1. Compile the noise kernels outside every figure: the tiny Llama, then one layer of the
    # measured shape (dynamo specialises on a few size / view relations the tiny one lacks).
    t0 = time.perf_counter()
    one_layer = LlamaConfig(max_position_embeddings=256, **{**SHAPES[args.shape], "num_hidden_layers": 1})
    for warm_model in (tiny_llama(seed=0), LlamaForCausalLM._from_config(one_layer)):
        ids = torch.randint(0, 262, (2, 8), generator=torch.Generator().manual_seed(0))
        warm = build_optimizer(name, warm_model.named_parameters(), master, args)
        for _ in range(2):
            warm.step(lambda: warm_model(input_ids=ids, labels=ids).loss)  # noqa: B023
        del warm_model, warm
    compile_s = time.perf_counter() - t0

    # 2. Build.
    trim_and_reset_hwm()
    pre_model = proc_status_mib("VmRSS")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, **SHAPES[args.shape])
        model = LlamaForCausalLM._from_config(cfg).eval()
    model.config.use_cache = False
    opt = build_optimizer(name, model.named_parameters(), master, args)
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params) / MIB
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1234))

    def closure() -> torch.Tensor:
        return model(input_ids=x, labels=x).loss

    # 3. First step (thresholds, masters).
    t0 = time.perf_counter()
    opt.step(closure)
    first_step_s = time.perf_counter() - t0
    threshold_s = opt.last_step_timing.get("threshold")
    first_footprint = proc_status_mib("VmHWM") - pre_model

    # 4. Steady state.
    hwm_reset = trim_and_reset_hwm()
    baseline = proc_status_mib("VmRSS")
    times: list[float] = []
    phases: dict[str, list[float]] = {}
    monitor = CpuMonitor().start()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - t0)
        for k, v in opt.last_step_timing.items():
            phases.setdefault(k, []).append(v)
    other = monitor.stop()
    peak = proc_status_mib("VmHWM")

    # 5. Tensor-exact peak of one step.
    alloc = alloc_peak_mib(lambda: opt.step(closure)) if args.alloc else None
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor)) / MIB
    mask = (sum(noise.mask_words(0, p.numel()) for p in params) * 4 / MIB
            if name == "sparse_mezo" and not master else 0.0)
    return dict(
        optimizer=name, master_weights=master, n_params=sum(p.numel() for p in params),
        weights_mib=round(weights, 2), state_mib=round(state, 2), mask_mib=round(mask, 3),
        pre_model_mib=round(pre_model, 1), baseline_mib=round(baseline, 1), peak_mib=round(peak, 1),
        footprint_mib=round(peak - pre_model, 2), delta_mib=round(peak - baseline, 2),
        first_step_footprint_mib=round(first_footprint, 2),
        alloc_peak_mib=None if alloc is None else round(alloc, 3),
        tensor_footprint_mib=None if alloc is None else round(weights + state + alloc, 2),
        step_s=_median(times), steps_s=[round(t, 4) for t in times],
        phases_s={k: _median(v) for k, v in phases.items()},
        first_step_s=round(first_step_s, 3), threshold_s=None if threshold_s is None else round(threshold_s, 3),
        compile_s=round(compile_s, 1), other_cpu_share=other, hwm_reset=hwm_reset,
    )


def _timing(master: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved steps of MeZO and Sparse MeZO on two copies of the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, **SHAPES[args.shape])
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1234))
    runs = {}
    for name in OPTIMIZERS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM._from_config(cfg).eval()
        model.config.use_cache = False
        opt = build_optimizer(name, model.named_parameters(), master, args)
        closure = (lambda m: lambda: m(input_ids=x, labels=x).loss)(model)
        opt.step(closure)  # compiles the kernels; Sparse MeZO fixes its thresholds
        opt.step(closure)
        runs[name] = (model, opt, closure)
    times: dict[str, list[float]] = {n: [] for n in OPTIMIZERS}
    phases: dict[str, dict[str, list[float]]] = {n: {} for n in OPTIMIZERS}
    monitor = CpuMonitor().start()
    for _ in range(args.repeats):
        for name, (_, opt, closure) in runs.items():
            t0 = time.perf_counter()
            opt.step(closure)
            times[name].append(time.perf_counter() - t0)
            for k, v in opt.last_step_timing.items():
                phases[name].setdefault(k, []).append(v)
    other = monitor.stop()
    return {"master_weights": master, "other_cpu_share": other,
            **{name: {"step_s": _median(times[name]), "min_step_s": round(min(times[name]), 4),
                      "steps_s": [round(t, 4) for t in times[name]],
                      "phases_s": {k: _median(v) for k, v in phases[name].items()}} for name in OPTIMIZERS},
            "passes": _pass_times(runs["sparse_mezo"][1], master, args)}


def _pass_times(opt: Any, master: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One noise pass over every parameter, unmasked (MeZO) and masked (Sparse MeZO), interleaved.

    ``+eps`` then ``-eps`` (the weights end where they were, up to rounding). Without master
    weights: ``axpbz_`` vs ``masked_axpbz_pack_`` (a query's first pass: selects and packs the
    mask) and ``masked_axpbz_`` (its later passes); with: ``perturb_from_master_`` vs
    ``masked_perturb_from_master_``. Min and median over ``2 * --repeats`` samples.
    """
    from zoscale import noise

    from zoscale.optim.directions import packed_buffers

    entries = opt.shard_entries()
    words = {id(e.param): w for e, w in zip(entries, packed_buffers(entries))}
    kind = args.noise
    if master:
        def unmasked(b: float) -> None:
            for e in entries:
                noise.perturb_from_master_(e.view.local, e.state["master"], e.view.offset, 7, b, kind)

        def masked(b: float) -> None:
            for e in entries:
                noise.masked_perturb_from_master_(e.view.local, e.state["master"], e.view.offset, 7, b,
                                                  e.state["threshold"], kind)
        passes = {"unmasked": unmasked, "masked": masked}
    else:
        def axpbz(b: float) -> None:
            for e in entries:
                noise.axpbz_(e.view.local, e.view.offset, 7, 1.0, b, kind)

        def pack(b: float) -> None:
            for e in entries:
                noise.masked_axpbz_pack_(e.view.local, words[id(e.param)], e.view.offset, 7, 1.0, b,
                                         e.state["threshold"], kind)

        def masked(b: float) -> None:
            for e in entries:
                noise.masked_axpbz_(e.view.local, words[id(e.param)], e.view.offset, 7, 1.0, b, kind)
        passes = {"unmasked": axpbz, "masked_pack": pack, "masked": masked}
    samples: dict[str, list[float]] = {k: [] for k in passes}
    for i in range(2 * args.repeats + 1):
        for k, fn in passes.items():
            t0 = time.perf_counter()
            fn(1e-3 if i % 2 else -1e-3)
            if i:  # the first round warms up
                samples[k].append(time.perf_counter() - t0)
    out: dict[str, Any] = {k: {"min_s": round(min(v), 5), "median_s": _median(v)} for k, v in samples.items()}
    out["ratios_to_unmasked_by_min"] = {k: _ratio(out[k]["min_s"], out["unmasked"]["min_s"])
                                        for k in passes if k != "unmasked"}
    return out


def static_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at its default 128 KiB (``mallopt(M_MMAP_THRESHOLD)``).

    glibc raises the threshold each time a large mmapped block is freed (up to 32 MiB), after
    which tensors of that size come from the heap and their holes keep RSS high: run-to-run RSS
    noise of a few MiB on this model, as large as the effect measured. With a static threshold
    every tensor above 128 KiB is mapped and unmapped, the same in both modes.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _worker(index: int, what: str, name: str, master: bool, args: argparse.Namespace) -> dict[str, Any]:
    del index  # spawn passes the process index
    static_mmap_threshold()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    rec = _timing(master, args) if what == "timing" else _measure(name, master, args)
    gc.collect()
    return rec


def run_mode(what: str, name: str, master: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (``memory`` of one optimizer, or ``timing``) in a fresh process; its record."""
    return spawn_records(_worker, 1, what, name, master, args)[0]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


def summarize(records: list[dict[str, Any]], timings: list[dict[str, Any]]) -> dict[str, Any]:
    """``sparse_over_mezo`` ratios per master setting."""
    out: dict[str, Any] = {}
    for master in sorted({r["master_weights"] for r in records}):
        by = {r["optimizer"]: r for r in records if r["master_weights"] == master}
        if set(by) != set(OPTIMIZERS):
            continue
        s, m = by["sparse_mezo"], by["mezo"]
        ratios = {f"by_{k.removesuffix('_mib')}": _ratio(s[k], m[k])
                  for k in ("footprint_mib", "peak_mib", "tensor_footprint_mib", "alloc_peak_mib")}
        timing = next((t for t in timings if t["master_weights"] == master), None)
        if timing is not None:
            ts, tm = timing["sparse_mezo"], timing["mezo"]
            ratios["by_step_time"] = _ratio(ts["step_s"], tm["step_s"])
            ratios["by_min_step_time"] = _ratio(ts["min_step_s"], tm["min_step_s"])
            for phase in ("perturb", "update", "forward"):
                ratios[f"by_{phase}_time"] = _ratio(ts["phases_s"].get(phase), tm["phases_s"].get(phase))
        out[f"master_{master}"] = {
            "sparse_over_mezo": ratios,
            "extra_mib": {"footprint": round(s["footprint_mib"] - m["footprint_mib"], 2),
                          "tensor_footprint": None if s["tensor_footprint_mib"] is None
                          else round(s["tensor_footprint_mib"] - m["tensor_footprint_mib"], 2),
                          "expected_mask": s["mask_mib"]},
            "within_5pct": {k: (None if ratios[k] is None else ratios[k] <= TARGET)
                            for k in ("by_footprint", "by_tensor_footprint")},
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--master", choices=("without", "with", "both"), default="without",
                    help="master_weights setting(s) to measure (default: without)")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=2, help="steps of the memory phase per mode (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--noise", choices=("gaussian", "rademacher"), default="gaussian")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine a parallel region waits for any "
                         "preempted thread, which inflates every kernel launch; see bench_step.py)")
    ap.add_argument("--no-alloc", dest="alloc", action="store_false",
                    help="skip the profiler-based tensor peak (one extra step)")
    args = ap.parse_args(argv)
    masters = {"without": [False], "with": [True], "both": [False, True]}[args.master]

    import transformers

    t0 = time.time()
    records, timings = [], []
    for master in masters:
        for name in OPTIMIZERS:
            log(f"memory: {name} master_weights={master} ...")
            t = time.perf_counter()
            rec = run_mode("memory", name, master, args)
            records.append(rec)
            log(f"  done in {time.perf_counter() - t:.1f}s: footprint {rec['footprint_mib']} MiB, "
                f"tensor footprint {rec['tensor_footprint_mib']} MiB")
        log(f"timing: master_weights={master}, {args.repeats} interleaved rounds ...")
        t = time.perf_counter()
        timings.append(run_mode("timing", "", master, args))
        log(f"  done in {time.perf_counter() - t:.1f}s: "
            + ", ".join(f"{n} {timings[-1][n]['step_s']} s" for n in OPTIMIZERS))
    result = dict(
        meta=dict(torch=torch.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), shape=args.shape, model_config=SHAPES[args.shape],
                  dtype="float32", batch=args.batch, seq=args.seq, steps=args.steps, repeats=args.repeats,
                  noise=args.noise,
                  sparsity=args.sparsity, threads=args.threads,
                  noise_backend=os.environ.get("ZOSCALE_NOISE_BACKEND", "compiled"),
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
                  wall_s=round(time.time() - t0, 1), load_avg=load_average()),
        records=records,
        timing=timings,
        summary=summarize(records, timings),
    )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
