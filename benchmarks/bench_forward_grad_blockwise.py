"""Step time and peak memory of ForwardGrad and BlockwiseZO against MeZO, on CPU.

Each optimizer runs in its own subprocess (so that peak RSS is its own) on a randomly
initialised ``LlamaForCausalLM`` with SmolLM2-135M's width (hidden 576, 9 heads / 3 KV heads,
vocabulary 49152, tied embeddings) and ``--layers`` layers, on a fixed batch of ``--batch`` x
``--seq`` random token ids; the closure returns the mean cross-entropy of the last position
(``logits_to_keep=1``, the shape of a classification loss), as the trainer's does.

Measured per optimizer (``lr=0`` so the weights do not drift; wall clock, median of
``--repeats`` timed steps after one warm-up step, which also compiles the noise kernels):

* ``forward_s``: one plain forward under ``torch.no_grad()`` (median, same process).
* ``step_s`` and ``step_over_forward``: one ``optimizer.step(closure)`` and its ratio to one
  forward. MeZO: 2 forwards + 3 noise passes. ForwardGrad: one JVP forward (math attention,
  a tangent next to each activation) + tangent generation + one update pass. BlockwiseZO:
  2 x blocks forwards + 3 noise passes over the model.
* ``timing``: ``optimizer.last_step_timing`` of the last step (perturb, forward, update, ...).
* ``peak_rss_mb`` / ``rss_after_forward_mb``: process peak RSS (``ru_maxrss``) after the steps
  and after the first plain forward; their difference is what the optimizer step added on top
  of inference (ForwardGrad: the tangents, about one fp32 copy of the parameters, and the
  forward-mode activations).

JSON to stdout. Timings on a shared 2-core machine are noisy: the JSON records the load average.
Run from the repository root (about a minute with the defaults on an idle machine)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_forward_grad_blockwise.py --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from _harness import progress, spawn_records

OPTIMIZERS = ("mezo", "forward_grad", "blockwise")
log = progress("bench_forward_grad_blockwise")


def _child(index: int, optimizer: str, args: argparse.Namespace) -> dict:
    """One optimizer's record, in a fresh process (its own peak RSS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoscale.optim.blockwise import BlockwiseZO
    from zoscale.optim.forward_grad import ForwardGrad
    from zoscale.optim.mezo import MeZO

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def closure():
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        return torch.nn.functional.cross_entropy(logits, ids[:, -1])

    with torch.no_grad():
        closure()
    rss_forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    forwards = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            closure()
        forwards.append(time.perf_counter() - t0)
    named = model.named_parameters()
    if optimizer == "mezo":
        opt = MeZO(named, lr=0.0, eps=1e-3, noise=args.noise)
    elif optimizer == "forward_grad":
        opt = ForwardGrad(named, lr=0.0, module=model, noise=args.noise)
    else:
        opt = BlockwiseZO(named, lr=0.0, eps=1e-3, noise=args.noise)
    t0 = time.perf_counter()
    opt.step(closure)
    warmup = time.perf_counter() - t0
    steps = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        opt.step(closure)
        steps.append(time.perf_counter() - t0)
    forward = statistics.median(forwards)
    step = statistics.median(steps)
    return {
        "optimizer": optimizer,
        "parameters": sum(p.numel() for p in model.parameters()),
        "blocks": len(getattr(opt, "blocks", [])) or None,
        "forward_s": forward,
        "step_s": step,
        "step_over_forward": step / forward,
        "warmup_step_s": warmup,
        "forward_samples_s": forwards,
        "step_samples_s": steps,
        "timing": opt.last_step_timing,
        "rss_after_forward_mb": rss_forward,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noise", default="rademacher", choices=("gaussian", "rademacher"))
    args = parser.parse_args()
    results = []
    for name in OPTIMIZERS:
        log(f"running {name}")
        results.append(spawn_records(_child, 1, name, args)[0])
    print(json.dumps({"meta": {"layers": args.layers, "batch": args.batch, "seq": args.seq, "noise": args.noise,
                               "repeats": args.repeats, "loadavg_after": os.getloadavg(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
