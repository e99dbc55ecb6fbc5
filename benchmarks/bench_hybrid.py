"""Peak memory of one training step: MeZO vs HybridZOFO (FO on the last 1/3 or 2/3 of blocks) vs AdamW.

One process per mode (a fresh ``spawn`` child, so peaks never carry over), the same randomly
initialised ``LlamaForCausalLM`` (seed 0, fp32, untied head so that ``lm_head`` is its own
tensor) and the same batch of random tokens, loss = next-token cross-entropy
(``labels=input_ids``):

* ``mezo``: ``MeZO(lr=1e-6, eps=1e-3)``: two forwards under ``no_grad``, three noise passes.
* ``hybrid_third`` / ``hybrid_two_thirds``: ``HybridZOFO`` with ``fo_fraction`` 1/3 or 2/3 of the
  blocks (the last ones) plus ``fo_params=["model.norm", "lm_head"]``, AdamW ``fo_lr=1e-5``;
  the rest (embeddings, first blocks) by ZO. One forward with grad + backward, two no-grad
  forwards.
* ``adamw``: first-order fine-tuning of everything, ``torch.optim.AdamW(lr=1e-5)``:
  ``loss.backward(); opt.step(); opt.zero_grad()``.

Measured as in ``bench_memory.py`` (whose probes are reused): in the child, after imports,
``gc`` + ``malloc_trim`` + a reset of the RSS high-water mark (``/proc/self/clear_refs``), then
``pre_model`` = VmRSS; the model and optimizer are built; trim + reset again, ``baseline`` =
VmRSS; ``--steps`` steps; ``peak`` = VmHWM. ``footprint_mib = peak - pre_model`` is what the
model, the optimizer state, and the steps' transients added (the CPU analogue of a GPU's
``max_memory_allocated``); ``delta_mib = peak - baseline``. Then one more step runs under
``torch.profiler`` and ``alloc_peak_mib`` is the peak of torch tensor bytes allocated during
that step over those alive before it: activations kept for backward, gradients, optimizer
temporaries (steady state: AdamW's moments exist from step 1, so they are not in it).
``state_mib`` counts the tensors the optimizer keeps between steps (AdamW moments, ZO master
copies: none here), ``params_mib`` the model, and ``tensor_footprint_mib = params + state +
alloc_peak`` is the allocator-exact total. ``saved_for_backward_mib`` is the bytes autograd
packed during the step's forward (``saved_tensors_hooks``): activations kept for backward.

Noise kernels default to the eager (chunked) backend: compiling them would add hundreds of MiB
of RSS that has nothing to do with the optimizers (``--noise-backend compiled`` precompiles them
before the baseline, as ``bench_memory.py`` does, and reports it as ``noise_compile_rss_mib``).

Run from the repository root (JSON on stdout, progress on stderr). With the defaults (6 blocks,
hidden 256, vocab 8192, ~8.9M parameters, batch 8 x 128) it took 33 s of CPU and 1 min 54 s of
wall time on this 2-core machine under a load average of ~11 (mostly MeZO's eager noise passes
and four interpreter start-ups)::

    .venv/bin/python benchmarks/bench_hybrid.py
    .venv/bin/python benchmarks/bench_hybrid.py --seq 256 --layers 12   # more activations

``summary.ordered_by_*`` says whether ``mezo < hybrid_third < hybrid_two_thirds < adamw``
holds for each measure; ``summary.ratios`` gives each mode over MeZO and over AdamW. Timings
(``step_s``) are noisy on a shared machine and are reported for orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import progress, spawn_records  # noqa: E402
from bench_memory import alloc_peak_mib, precompile_noise, proc_status_mib, trim_and_reset_hwm  # noqa: E402

MODES: tuple[str, ...] = ("mezo", "hybrid_third", "hybrid_two_thirds", "adamw")
FO_FRACTION = {"hybrid_third": 1 / 3, "hybrid_two_thirds": 2 / 3}
MIB = float(1 << 20)


log = progress("bench_hybrid")


def _config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 8 * 8,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                       vocab_size=args.vocab, tie_word_embeddings=False, max_position_embeddings=max(256, args.seq),
                       rms_norm_eps=1e-5)


def _tensor_mib(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / MIB


def _state_mib(optimizer: Any) -> float:
    """Bytes of the tensors an optimizer keeps between steps (and its inner FO optimizer's)."""
    total = 0.0
    for opt in (optimizer, getattr(optimizer, "fo_optimizer", None)):
        if opt is not None:
            total += sum(_tensor_mib(s.values()) for s in opt.state.values())
    return total


def _child(index: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode's record, in its own process; a failure is reported in the record, not raised."""
    try:
        return _measure(mode, args)
    except Exception as e:
        traceback.print_exc()
        return {"mode": mode, "error": f"{type(e).__name__}: {e}"}


def _measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    from zoscale.optim.hybrid import HybridZOFO
    from zoscale.optim.mezo import MeZO

    extra: dict[str, Any] = {}
    if mode != "adamw" and args.noise_backend == "compiled":
        before = proc_status_mib("VmRSS")
        precompile_noise("gaussian", False)
        extra["noise_compile_rss_mib"] = round(proc_status_mib("VmRSS") - before, 2)
    trim_and_reset_hwm()
    pre_model = proc_status_mib("VmRSS")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(_config(args))
    model.config.use_cache = False
    model.eval()  # no dropout anyway; what the trainer does
    named = list(model.named_parameters())
    if mode == "mezo":
        opt: Any = MeZO(named, lr=1e-6, eps=1e-3)
    elif mode == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        opt = HybridZOFO(named, lr=1e-6, eps=1e-3, fo_fraction=FO_FRACTION[mode], fo_params=["model.norm", "lm_head"],
                         fo_optimizer="adamw", fo_lr=1e-5)
        extra["fo_params"] = sum(p.numel() for _, p in opt._fo_named)
        extra["fo_blocks"] = sorted({int(n.split(".")[2]) for n in opt.fo_names if n.startswith("model.layers.")})
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    if mode == "adamw":
        def step() -> float:
            value = loss()
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(value.detach())
    else:
        def step() -> float:
            return float(opt.step(loss))

    trim_and_reset_hwm()
    baseline = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    step_s = (time.perf_counter() - t0) / args.steps
    peak = proc_status_mib("VmHWM")
    alloc = alloc_peak_mib(step)
    packed = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    params = _tensor_mib(model.parameters())
    state = _state_mib(opt)
    return dict(mode=mode, pre_model_mib=round(pre_model, 2), baseline_mib=round(baseline, 2), peak_mib=round(peak, 2),
                delta_mib=round(peak - baseline, 2), footprint_mib=round(peak - pre_model, 2),
                alloc_peak_mib=round(alloc, 2), params_mib=round(params, 2), state_mib=round(state, 2),
                tensor_footprint_mib=round(params + state + alloc, 2),
                saved_for_backward_mib=round(packed[0] / MIB, 2), step_s=round(step_s, 3),
                losses=[round(v, 5) for v in losses], n_params=sum(p.numel() for p in model.parameters()), **extra)


def summarize(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keys = ("footprint_mib", "delta_mib", "alloc_peak_mib", "tensor_footprint_mib", "saved_for_backward_mib")
    out: dict[str, Any] = {}
    present = [m for m in MODES if m in records and "error" not in records[m]]
    for k in keys:
        vals = [records[m][k] for m in present]
        out[f"ordered_by_{k[:-4]}"] = all(a < b for a, b in zip(vals, vals[1:])) if len(present) == len(MODES) else None
    ratios: dict[str, Any] = {}
    for m in present:
        r: dict[str, Any] = {}
        for ref in ("mezo", "adamw"):
            if ref in present and ref != m:
                r[f"over_{ref}"] = {f"by_{k[:-4]}": (round(records[m][k] / records[ref][k], 3) if records[ref][k] else None)
                                    for k in ("footprint_mib", "alloc_peak_mib", "tensor_footprint_mib")}
        ratios[m] = r
    out["ratios"] = ratios
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--layers", type=int, default=6, help="decoder blocks (default 6: thirds are whole)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="steps before the profiled one (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--noise-backend", choices=("eager", "compiled"), default="eager")
    args = ap.parse_args(argv)
    os.environ["ZOSCALE_NOISE_BACKEND"] = args.noise_backend  # inherited by the children

    t0 = time.time()
    records: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        log(f"{mode} ...")
        t = time.perf_counter()
        rec = records[mode] = spawn_records(_child, 1, mode, args)[0]
        log(f"  {time.perf_counter() - t:.1f}s: " + ", ".join(f"{k} {rec.get(k)}" for k in
                                                               ("footprint_mib", "alloc_peak_mib", "error") if k in rec))
    import transformers

    result = dict(
        meta=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                  model=dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab, tied=False, dtype="float32"),
                  batch=args.batch, seq=args.seq, steps=args.steps, threads=args.threads,
                  noise_backend=args.noise_backend, wall_s=round(time.time() - t0, 1), load_avg=os.getloadavg(),
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0))),
        records=[records[m] for m in args.modes],
        summary=summarize(records),
    )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
