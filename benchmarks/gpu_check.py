"""The GPU path in one script (< 8 minutes on one GPU); JSON on stdout, one record per check.

Checks, each with its measured value, its target where the issue sets one, and ``ok``:

* ``noise``: the compiled noise kernels (inductor's Triton on a GPU) against the eager reference
  kernels on the CPU, for odd starts and sizes: Rademacher bit for bit; Gaussian within
  ``GAUSSIAN_ULP`` ulp (``log``/``cos`` differ between libraries);
* ``bandwidth``: one ``x = x + b z`` noise pass against a device-to-device copy of the same
  tensor (both read and write it once; target >= 0.70 of the copy's bytes per second);
* ``mezo_step``: a MeZO step (Rademacher noise) of an OPT-1.3B-shaped model in bf16 against two
  of its forwards (target <= 1.05x);
* ``bf16_master``: the same step with fp32 master shards: finite loss, fp32 masters, weights move;
* ``engines``: one-rank DeepSpeed ZeRO-3 and FSDP2 steps (NCCL on a GPU) against the same steps
  on the plain model: equal losses (``skipped`` where DeepSpeed is not installed).

``--dry`` runs everything on the CPU with small shapes and gloo, so the script itself is tested
(``tests/unit/test_gpu_check.py``); its numbers mean nothing for a GPU::

    .venv/bin/python benchmarks/gpu_check.py            # on a machine with a GPU
    .venv/bin/python benchmarks/gpu_check.py --dry      # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Largest Gaussian difference between the compiled and eager kernels, in fp32 ulp of
#: ``max(|z|, 1)`` (measured on the CPU's inductor kernels: under 2).
GAUSSIAN_ULP = 16
OPT_1_3B = dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32)
DRY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` (synchronised on a GPU), after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_noise(device: torch.device, n: int) -> dict[str, Any]:
    from zoscale import noise

    worst: dict[str, float] = {}
    for kind in ("rademacher", "gaussian"):
        worst[kind] = 0.0
        for start, size in ((0, n), (3, n + 5), ((1 << 31) + 7, 1001)):
            got = noise.generate(start, size, 1234567, kind, device=device).cpu()
            want = noise.generate(start, size, 1234567, kind, eager=True)
            # In ulp of the value, or of 1 below |z| = 1 (near zero a relative ulp means nothing).
            ulp = (got - want).abs() / torch.finfo(torch.float32).eps / want.abs().clamp_min(1.0)
            worst[kind] = max(worst[kind], 0.0 if torch.equal(got, want) else float(ulp.max()))
    return {"check": "noise", "rademacher_max_ulp": worst["rademacher"], "gaussian_max_ulp": worst["gaussian"],
            "ok": worst["rademacher"] == 0.0 and worst["gaussian"] <= GAUSSIAN_ULP}


def check_bandwidth(device: torch.device, n: int, repeats: int) -> dict[str, Any]:
    from zoscale import noise

    x, y = torch.zeros(n, device=device), torch.zeros(n, device=device)
    copy_s = _timed(lambda: y.copy_(x), device, repeats)
    pass_s = _timed(lambda: noise.axpbz_(x, 0, 99, 1.0, 1e-3, "rademacher"), device, repeats)
    ratio = copy_s / pass_s
    return {"check": "bandwidth", "elements": n, "copy_gb_s": 8 * n / copy_s / 1e9,
            "noise_pass_gb_s": 8 * n / pass_s / 1e9, "pass_vs_copy": ratio, "target": 0.70, "ok": ratio >= 0.70}


def _opt(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=50272, word_embed_proj_dim=shape["hidden_size"], max_position_embeddings=2048,
                       **shape)
    return OPTForCausalLM(config).to(device=device, dtype=dtype).eval()


def _closure(model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> Callable[[], torch.Tensor]:
    ids = torch.randint(2, 50000, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)

    @torch.no_grad()
    def closure() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    return closure


def check_mezo_step(shape: dict[str, int], device: torch.device, batch: int, seq: int,
                    repeats: int) -> dict[str, Any]:
    from zoscale.optim import MeZO

    model = _opt(shape, torch.bfloat16, device)
    closure = _closure(model, batch, seq, device)
    opt = MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, noise="rademacher")
    forwards = _timed(lambda: (closure(), closure()), device, repeats)
    step = _timed(lambda: opt.step(closure), device, repeats)
    ratio = step / forwards
    return {"check": "mezo_step", "shape": shape, "step_s": step, "two_forwards_s": forwards,
            "step_vs_two_forwards": ratio, "target": 1.05, "ok": ratio <= 1.05}


def check_bf16_master(shape: dict[str, int], device: torch.device, batch: int, seq: int) -> dict[str, Any]:
    from zoscale.optim import MeZO

    model = _opt(shape, torch.bfloat16, device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MeZO(model.named_parameters(), lr=1e-4, eps=1e-3, master_weights=True)
    losses = [opt.step(_closure(model, batch, seq, device)) for _ in range(2)]
    masters = {e.state["master"].dtype for e in opt.shard_entries()}
    moved = sum(int(not torch.equal(p, before[n])) for n, p in model.named_parameters())
    ok = all(torch.isfinite(torch.tensor(losses))) and masters == {torch.float32} and moved > 0
    return {"check": "bf16_master", "losses": losses, "master_dtypes": sorted(map(str, masters)),
            "tensors_moved": moved, "ok": bool(ok)}


def _engine_losses(kind: str, device: torch.device, batch: int, seq: int) -> list[float]:
    from zoscale.models import tiny_opt

    model = tiny_opt().to(device)
    ids = torch.randint(2, 200, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    params = {"lr": 1e-3, "eps": 1e-3, "seed": 5}
    if kind == "zero3":
        from zoscale.engines import zero3_engine

        engine, opt = zero3_engine(model, {"train_micro_batch_size_per_gpu": batch, "optimizer": {
            "type": "MeZO", "params": params}, "zero_optimization": {"stage": 3}})
        module = engine.module
    elif kind == "fsdp":
        from zoscale.engines import FSDPEngine
        from zoscale.optim import build_optimizer

        engine = FSDPEngine(model)
        module = engine.module
        opt = build_optimizer("mezo", module.named_parameters(), params, shards=engine.shards, module=module)
    else:
        from zoscale.optim import build_optimizer

        module, opt = model, build_optimizer("mezo", model.named_parameters(), params, module=model)
    return [opt.step(lambda: module(input_ids=ids, labels=ids).loss) for _ in range(2)]


def check_engines(device: torch.device, batch: int, seq: int) -> dict[str, Any]:
    import importlib.util

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        want = _engine_losses("local", device, batch, seq)
        out: dict[str, Any] = {"check": "engines", "local": want, "fsdp": _engine_losses("fsdp", device, batch, seq)}
        if importlib.util.find_spec("deepspeed") is None:
            out["zero3"] = "skipped: deepspeed is not installed"
        else:
            out["zero3"] = _engine_losses("zero3", device, batch, seq)
        got = [v for k, v in out.items() if k in ("fsdp", "zero3") and isinstance(v, list)]
        out["ok"] = all(_close(v, want) for v in got)
        return out
    finally:
        dist.destroy_process_group()


def _close(got: list[float], want: list[float], rel: float = 1e-5) -> bool:
    """Equal within ``rel`` (the engines' fp32 tolerance: a one-rank engine sums as one process)."""
    return len(got) == len(want) and all(abs(a - b) <= rel * abs(b) for a, b in zip(got, want))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU, small shapes: checks the script")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no GPU here: pass --dry to run the checks on the CPU")
    device = torch.device("cpu" if args.dry else "cuda")
    shape, n, batch, seq, repeats = ((DRY_OPT, 1 << 16, 2, 16, 3) if args.dry else (OPT_1_3B, 1 << 28, 8, 256, 10))
    records = [check_noise(device, 4099 if args.dry else 1 << 24), check_bandwidth(device, n, repeats),
               check_mezo_step(shape, device, batch, seq, repeats), check_bf16_master(shape, device, batch, seq),
               check_engines(device, 2, 12)]
    out = [{"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)", "torch":
            torch.__version__}, *records]
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
