"""Per-rank peak-memory benchmark: inference vs zoscale MeZO vs AdamW, on ZeRO-3 and on FSDP2.

What is measured, per rank, for each (mode, world size) on the same randomly initialised
``LlamaForCausalLM`` built partitioned under ZeRO-3 (``HfDeepSpeedConfig`` kept alive +
``LlamaForCausalLM._from_config``; ``stage3_param_persistence_threshold: 0``, fp32) and the same
global batch of 8 x 32 random tokens (split evenly over the ranks), loss = next-token
cross-entropy (``labels=input_ids``):

* ``forward_only``: ``deepspeed.initialize`` without optimizer; ``N`` forwards under
  ``torch.no_grad()`` (the inference floor).
* ``zo_step``: ``zoscale.engines.zero3_engine`` with ``{"type": "MeZO", "params": {...}}``;
  ``N`` calls of ``optimizer.step(closure)`` (two no-grad forwards + three noise passes each).
* ``zo_step_master``: the same with ``master_weights: true`` (expected: + one fp32 copy of the
  rank's shard).
* ``adamw_step``: first-order fine-tuning with DeepSpeed's own optimizer, ``"optimizer":
  {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": true}}`` handed to
  ``deepspeed.initialize``; ``N`` x ``engine.backward(loss); engine.step()``. ``torch_adam``
  makes DeepSpeed use ``torch.optim.AdamW`` (its FusedAdam needs a CUDA build).

``--engine fsdp`` (or ``both``, the default) runs the same modes on PyTorch FSDP2 instead: the
same model built whole on every rank (``LlamaForCausalLM._from_config``, seed 0), then wrapped
by ``zoscale.engines.FSDPEngine`` (``fully_shard`` on each decoder layer and on the root, 1-D
mesh, gloo ranks initialised by ``dist.init_process_group``; deepspeed is not imported):

* ``forward_only``: ``N`` forwards of the wrapped model under ``torch.no_grad()``.
* ``zo_step`` / ``zo_step_master``: ``MeZO(engine.module.named_parameters(), lr=1e-6, eps=1e-3,
  shards=engine.shards)`` built after wrapping (``master_weights`` as above).
* ``adamw_step``: ``torch.optim.AdamW(engine.module.parameters(), lr=1e-5)``; ``N`` x
  ``loss.backward(); opt.step(); opt.zero_grad()``. FSDP2 parameters are DTensors, so the
  gradients (reduce-scattered) and AdamW's states are sharded like the parameters.

Every record has ``engine`` (``deepspeed`` or ``fsdp``); ``shard_mib`` of FSDP2 sums
``p.to_local()`` (no padding counted), and FSDP records also give ``build_peak_rss_mib`` (the
high-water mark of the build over ``pre_model``: the whole model exists on each rank before
``fully_shard``). The summary is keyed by engine, then world; ``fsdp_over_deepspeed`` (per world,
when both ran) compares the two engines' footprints and tensor peaks mode by mode.

Each (mode, world) runs in a fresh set of ``torch.multiprocessing.spawn`` gloo ranks, so peaks
never carry over. Per rank, after the engine is built: ``gc.collect()``, glibc ``malloc_trim(0)``
(returns freed heap pages, so construction garbage cannot hide the phase's allocations), then
the high-water mark is reset (``echo 5 > /proc/self/clear_refs``) and ``VmRSS`` is read as the
baseline. After ``N`` steps ``VmHWM`` is the peak; ``delta = peak - baseline``. Without the
reset, ``VmHWM`` would still hold the construction peak and the delta could read 0
(``meta.hwm_reset`` says whether the kernel allowed it). With CUDA,
``torch.cuda.max_memory_allocated`` is reported as well.

``delta`` misses what an engine allocates while it is *built*: DeepSpeed's stage-3 optimizer
allocates its fp32 partitions and gradient buffers in ``deepspeed.initialize``. So the same
trim + reset is also done before the model is constructed (runtime imported, nothing built):
``footprint = peak - pre_model`` is everything the model, engine and steps added (shard,
optimizer state, buffers, activations): the CPU analogue of a GPU's ``max_memory_allocated``,
free of the Python/torch/DeepSpeed runtime (hundreds of MiB of RSS). The summary's ratios are
given by footprint (the meaningful one), by absolute peak and by delta.

As an allocator-exact cross-check, after the RSS phase one more step runs under
``torch.profiler`` (``profile_memory=True``) and ``alloc_peak_mib`` is the peak of torch-tensor
bytes allocated *during* that step over those alive before it (steady state: optimizer states
and master weights made in step 1 are not in it). ``by_tensors`` in the summary adds the
persistent tensors known exactly (the shard; plus one fp32 shard for master weights); it is not
computed for AdamW. ``--no-alloc`` skips it.

zoscale's noise kernels are compiled by ``torch.compile`` on first use; that costs tens to
hundreds of MiB of RSS (dynamo/inductor code, not tensors) independent of the model size. The ZO
modes therefore compile the kernels on dummy tensors *before* the baseline and report that cost
as ``noise_compile_rss_mib`` (``--noise-backend eager`` uses the chunked eager kernels instead).

Run from the repository root (JSON on stdout, progress on stderr)::

    .venv/bin/python benchmarks/bench_memory.py --world 1 2                 # small shape (~13M params)
    .venv/bin/python benchmarks/bench_memory.py --world 1 2 --shape smollm2 # SmolLM2-135M's shape
    .venv/bin/python benchmarks/bench_memory.py --quick                     # 2 layers, 1 step, world 1
    .venv/bin/python benchmarks/bench_memory.py --world 1 2 --engine fsdp   # FSDP2 only

Fields of a record: ``engine, mode, world, rank, baseline_mib`` (VmRSS after reset), ``peak_mib``
(VmHWM after N steps), ``delta_mib``, ``shard_mib`` (sum of ``p.ds_tensor.numel() *
element_size`` over this rank's parameters; ``p.to_local()`` on FSDP2), ``pre_model_mib``, ``footprint_mib`` (peak -
pre_model), ``build_rss_mib`` (RSS the build added), ``step_s``,
``alloc_peak_mib``, ``cuda_max_allocated_mib`` (null on CPU), and mode-specific extras.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _harness import free_port, progress, spawn_records  # noqa: E402

from tests.distributed.tensor_peak import tensor_peak_bytes  # noqa: E402

MODES: tuple[str, ...] = ("forward_only", "zo_step", "zo_step_master", "adamw_step")
ENGINES: tuple[str, ...] = ("deepspeed", "fsdp")
SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
MIB = float(1 << 20)
TARGET_ZO_OVER_FORWARD = 1.10  # from the issue

log = progress("bench_memory")


# ---------------------------------------------------------------------- memory probes
def proc_status_mib(key: str) -> float:
    """A ``Vm*`` field of /proc/self/status in MiB."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(m.group(1)) / 1024.0


def trim_and_reset_hwm() -> bool:
    """Free garbage, return free heap pages to the OS, reset VmHWM to VmRSS. True if reset worked."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return abs(proc_status_mib("VmHWM") - proc_status_mib("VmRSS")) < 1.0


def alloc_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak of live torch CPU tensor bytes allocated during ``fn()``, in MiB (the tests' probe)."""
    return tensor_peak_bytes(fn) / MIB


# ---------------------------------------------------------------------- model and configs
def ds_config(mode: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed config of ``mode`` (fp32, ZeRO-3, nothing kept whole)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if mode in ("zo_step", "zo_step_master"):
        cfg["optimizer"] = {"type": "MeZO", "params": {"lr": 1e-6, "eps": 1e-3, "noise": args.noise,
                                                       "master_weights": mode == "zo_step_master"}}
    elif mode == "adamw_step":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}}
    return cfg


def llama_config(shape: str, quick: bool) -> Any:
    """A ``LlamaConfig`` of the named shape (``quick``: 2 layers)."""
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if quick:
        kw["num_hidden_layers"] = 2
    return LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, **kw)


def shard_mib(model: torch.nn.Module) -> tuple[float, int]:
    """(MiB of this rank's ZeRO-3 partitions / FSDP2 local shards, total parameter count)."""
    nbytes = n = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            t = p.ds_tensor
        elif hasattr(p, "to_local"):  # FSDP2 DTensor
            t = p.to_local()
        else:
            t = p
        nbytes += t.numel() * t.element_size()
        n += int(getattr(p, "ds_numel", p.numel()))
    return nbytes / MIB, n


def precompile_noise(kind: str, master: bool) -> None:
    """Compile zoscale's noise kernels on dummy fp32 tensors.

    Covers dynamo's 0/1 specialisations of the size and of the start offset (rank 0's shards
    start at 0), so that the measured steps do not compile new graphs.
    """
    from zoscale import noise

    for n in (4097, 1):
        x = torch.zeros(n)
        m = torch.zeros(n)
        for start in (0, 1, 3 + (1 << 24)):
            for b in (1e-3, -2e-3):
                noise.axpbz_(x, start, 12345, 1.0, b, kind)
                noise.axpbz_(x, start, -12345, 0.5, b, kind)
                if master:
                    noise.perturb_from_master_(x, m, start, 12345, b, kind)
                    noise.update_master_(x, m, start, 12345, 0.5, b, kind)


# ---------------------------------------------------------------------- one rank
def _worker(rank: int, world: int, port: int, engine: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One rank's record of ``mode`` on ``engine``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS=str(args.threads))
    if args.noise_backend:
        os.environ["ZOSCALE_NOISE_BACKEND"] = args.noise_backend
    torch.set_num_threads(args.threads)
    if engine == "fsdp":
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            return _measure_fsdp(rank, world, mode, args)
        finally:
            # FSDP-wrapped modules sit in reference cycles; collect them before the group goes
            # (tests/distributed/test_fsdp.py: avoids a rare abort at exit).
            gc.collect()
            dist.destroy_process_group()
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed.utils.logging as ds_logging

    ds_logging.logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        return _measure(rank, world, mode, args)
    finally:
        dist.destroy_process_group()


def _measure(rank: int, world: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = ds_config(mode, world, args)
    extra: dict[str, Any] = {}
    if mode.startswith("zo_step") and (os.environ.get("ZOSCALE_NOISE_BACKEND") or "compiled") == "compiled":
        before = proc_status_mib("VmRSS")
        precompile_noise(args.noise, mode == "zo_step_master")
        extra["noise_compile_rss_mib"] = proc_status_mib("VmRSS") - before
    import zoscale.engines  # noqa: F401  (imported before the pre-model baseline, as deepspeed is)

    trim_and_reset_hwm()
    pre_model = proc_status_mib("VmRSS")
    torch.manual_seed(0)
    hf_ds = HfDeepSpeedConfig(cfg)  # noqa: F841  (must stay alive while the model is built)
    model = LlamaForCausalLM._from_config(llama_config(args.shape, args.quick))
    model.config.use_cache = False
    optimizer: Any = None
    if mode == "forward_only":
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
    elif mode.startswith("zo_step"):
        from zoscale.engines import zero3_engine

        engine, optimizer = zero3_engine(model, cfg)
    else:
        engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        extra["ds_optimizer"] = type(optimizer).__name__
        inner = getattr(optimizer, "optimizer", None)
        extra["inner_optimizer"] = type(inner).__name__ if inner is not None else None
    del model
    shard, n_params = shard_mib(engine.module)
    extra["build_rss_mib"] = proc_status_mib("VmRSS") - pre_model

    x, per = _batch(rank, world, args)

    def loss() -> torch.Tensor:
        return engine(input_ids=x, labels=x).loss

    def closure() -> torch.Tensor:
        with torch.no_grad():
            return loss()

    if mode == "forward_only":
        def step() -> float:
            return float(closure())
    elif mode.startswith("zo_step"):
        def step() -> float:
            return float(optimizer.step(closure))
    else:
        def step() -> float:
            loss_value = loss()
            engine.backward(loss_value)
            engine.step()
            return float(loss_value)

    return _run_steps("deepspeed", rank, world, mode, args, step, pre_model, shard, n_params, per, extra)


def _batch(rank: int, world: int, args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    """This rank's slice of the global batch of random tokens, and the micro-batch size."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=g)
    per = args.batch // world
    return ids[rank * per:(rank + 1) * per].contiguous(), per


def _measure_fsdp(rank: int, world: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """``_measure`` on FSDP2: the model built whole, then ``FSDPEngine`` (fully_shard per block + root)."""
    from transformers import LlamaForCausalLM

    extra: dict[str, Any] = {}
    if mode.startswith("zo_step") and (os.environ.get("ZOSCALE_NOISE_BACKEND") or "compiled") == "compiled":
        before = proc_status_mib("VmRSS")
        precompile_noise(args.noise, mode == "zo_step_master")
        extra["noise_compile_rss_mib"] = proc_status_mib("VmRSS") - before
    import torch.distributed.fsdp  # noqa: F401
    import zoscale.engines  # noqa: F401  (imported before the pre-model baseline)
    from zoscale.engines import FSDPEngine
    from zoscale.optim import MeZO

    trim_and_reset_hwm()
    pre_model = proc_status_mib("VmRSS")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(llama_config(args.shape, args.quick))
    model.config.use_cache = False
    engine = FSDPEngine(model)
    module = engine.module
    del model
    optimizer: Any = None
    if mode.startswith("zo_step"):
        optimizer = MeZO(module.named_parameters(), lr=1e-6, eps=1e-3, noise=args.noise,
                         master_weights=mode == "zo_step_master", shards=engine.shards)
    elif mode == "adamw_step":
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
        extra["inner_optimizer"] = type(optimizer).__name__
    shard, n_params = shard_mib(module)
    extra["build_peak_rss_mib"] = proc_status_mib("VmHWM") - pre_model
    extra["build_rss_mib"] = proc_status_mib("VmRSS") - pre_model

    x, per = _batch(rank, world, args)

    def loss() -> torch.Tensor:
        return module(input_ids=x, labels=x).loss

    def closure() -> torch.Tensor:
        with torch.no_grad():
            return loss()

    if mode == "forward_only":
        def step() -> float:
            return float(closure())
    elif mode.startswith("zo_step"):
        def step() -> float:
            return float(optimizer.step(closure))
    else:
        def step() -> float:
            loss_value = loss()
            loss_value.backward()
            optimizer.step()
            optimizer.zero_grad()
            return float(loss_value.detach())

    return _run_steps("fsdp", rank, world, mode, args, step, pre_model, shard, n_params, per, extra)


def _run_steps(engine: str, rank: int, world: int, mode: str, args: argparse.Namespace, step: Callable[[], float],
               pre_model: float, shard: float, n_params: int, per: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Reset the high-water mark, run ``N`` steps, then one profiled step; the rank's record."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    hwm_reset = trim_and_reset_hwm()
    baseline = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    step_s = (time.perf_counter() - t0) / args.steps
    peak = proc_status_mib("VmHWM")
    cuda_peak = torch.cuda.max_memory_allocated() / MIB if cuda else None
    dist.barrier()
    alloc = alloc_peak_mib(step) if args.alloc else None
    delta = peak - baseline
    return dict(engine=engine, mode=mode, world=world, rank=rank, pre_model_mib=round(pre_model, 2),
                baseline_mib=round(baseline, 2), peak_mib=round(peak, 2), delta_mib=round(delta, 2),
                shard_mib=round(shard, 3), footprint_mib=round(peak - pre_model, 2),
                alloc_peak_mib=None if alloc is None else round(alloc, 2),
                cuda_max_allocated_mib=cuda_peak, step_s=round(step_s, 3), losses=[round(v, 5) for v in losses],
                hwm_reset=hwm_reset, n_params=n_params, micro_batch=per, threads=args.threads,
                **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in extra.items()})


# ---------------------------------------------------------------------- driver
def run_config(engine: str, mode: str, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn ``world`` fresh ranks for ``mode`` on ``engine``; return their records sorted by rank."""
    return spawn_records(_worker, world, world, free_port(), engine, mode, args)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


def summarize(records: list[dict[str, Any]], modes: list[str], worlds: list[int]) -> dict[str, Any]:
    """Ratios per engine and world, from the maximum over ranks of each quantity.

    Keyed ``{engine: {"world_N": ...}}``; with both engines, ``fsdp_over_deepspeed`` holds
    per-world, per-mode ratios of FSDP2's footprint / tensor peak / step time over ZeRO-3's.
    """
    engines = [e for e in ENGINES if any(r.get("engine", "deepspeed") == e for r in records)]
    out: dict[str, Any] = {e: _summarize_engine([r for r in records if r.get("engine", "deepspeed") == e],
                                                modes, worlds) for e in engines}
    if len(engines) == 2:
        cmp: dict[str, Any] = {}
        for w in worlds:
            c: dict[str, Any] = {}
            for m in modes:
                per = {e: [r for r in records if r["engine"] == e and r["mode"] == m and r["world"] == w]
                       for e in engines}
                if not all(per.values()):
                    continue
                fd, ds = per["fsdp"], per["deepspeed"]
                c[m] = {"by_footprint": _ratio(max(r["footprint_mib"] for r in fd),
                                               max(r["footprint_mib"] for r in ds)),
                        "by_step_s": _ratio(max(r["step_s"] for r in fd), max(r["step_s"] for r in ds))}
                if fd[0]["alloc_peak_mib"] is not None and ds[0]["alloc_peak_mib"] is not None:
                    c[m]["by_alloc_peak"] = _ratio(max(r["alloc_peak_mib"] for r in fd),
                                                   max(r["alloc_peak_mib"] for r in ds))
            cmp[f"world_{w}"] = c
        out["fsdp_over_deepspeed"] = cmp
    return out


def _summarize_engine(records: list[dict[str, Any]], modes: list[str], worlds: list[int]) -> dict[str, Any]:
    """Ratios per world for one engine's records."""
    out: dict[str, Any] = {}
    keys = ("footprint_mib", "peak_mib", "delta_mib", "alloc_peak_mib")
    for w in worlds:
        agg: dict[str, dict[str, float | None]] = {}
        for m in modes:
            rs = [r for r in records if r["mode"] == m and r["world"] == w]
            if rs:
                agg[m] = {k: (max(r[k] for r in rs) if rs[0][k] is not None else None) for k in keys}
        s: dict[str, Any] = {}
        for name, num, den in (("zo_over_forward", "zo_step", "forward_only"),
                               ("zo_master_over_forward", "zo_step_master", "forward_only"),
                               ("adamw_over_zo", "adamw_step", "zo_step")):
            if num in agg and den in agg:
                s[name] = {f"by_{k[:-4]}": _ratio(agg[num][k], agg[den][k]) for k in keys}
        tens: dict[str, float] = {}
        for m, copies in (("forward_only", 1), ("zo_step", 1), ("zo_step_master", 2)):
            rs = [r for r in records if r["mode"] == m and r["world"] == w]
            if rs and rs[0]["alloc_peak_mib"] is not None:
                tens[m] = max(copies * r["shard_mib"] + r["alloc_peak_mib"] for r in rs)
        for name, num in (("zo_over_forward", "zo_step"), ("zo_master_over_forward", "zo_step_master")):
            if name in s and num in tens and "forward_only" in tens:
                s[name]["by_tensors"] = _ratio(tens[num], tens["forward_only"])
        if tens:
            s["tensor_footprint_mib"] = {k: round(v, 2) for k, v in tens.items()}
        if "zo_over_forward" in s:
            v = s["zo_over_forward"]["by_footprint"]
            s["zo_meets_1.10x_target_by_footprint"] = None if v is None else v <= TARGET_ZO_OVER_FORWARD
        if "zo_step_master" in agg and "zo_step" in agg:
            shard = max(r["shard_mib"] for r in records if r["mode"] == "zo_step" and r["world"] == w)
            s["master_extra_mib"] = round(agg["zo_step_master"]["footprint_mib"] - agg["zo_step"]["footprint_mib"], 2)
            s["master_expected_mib"] = round(shard, 2)
        out[f"world_{w}"] = s
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--engine", choices=(*ENGINES, "both"), default="both",
                    help="ZeRO-3 (deepspeed), FSDP2 (fsdp) or both (default)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--steps", type=int, default=3, help="N steps per phase (default 3)")
    ap.add_argument("--batch", type=int, default=8, help="global batch, split over ranks")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--noise", choices=("gaussian", "rademacher"), default="gaussian")
    ap.add_argument("--noise-backend", choices=("compiled", "eager"), default=None,
                    help="ZOSCALE_NOISE_BACKEND for the ranks (default: inherited / compiled)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--no-alloc", dest="alloc", action="store_false",
                    help="skip the profiler-based tensor peak (one extra step)")
    ap.add_argument("--quick", action="store_true", help="2 layers, 1 step, world 1")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 1
        if argv is None and "--world" not in sys.argv:
            args.world = [1]
    for w in args.world:
        if args.batch % w:
            ap.error(f"--batch {args.batch} is not divisible by world {w}")

    import deepspeed
    import transformers

    engines = list(ENGINES) if args.engine == "both" else [args.engine]
    records: list[dict[str, Any]] = []
    t0 = time.time()
    for e in engines:
        for w in args.world:
            for m in args.modes:
                log(f"{e} {m} world={w} ...")
                t = time.perf_counter()
                recs = run_config(e, m, w, args)
                records += recs
                log(f"  done in {time.perf_counter() - t:.1f}s: "
                    + ", ".join(f"r{r['rank']} delta {r['delta_mib']} MiB shard {r['shard_mib']:.1f}" for r in recs))
    result = dict(
        meta=dict(torch=torch.__version__, deepspeed=deepspeed.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), shape=args.shape, quick=args.quick,
                  model_config={**SHAPES[args.shape], **({"num_hidden_layers": 2} if args.quick else {})},
                  n_params=records[0]["n_params"] if records else None, dtype="float32",
                  batch=args.batch, seq=args.seq, steps=args.steps, noise=args.noise,
                  noise_backend=args.noise_backend or os.environ.get("ZOSCALE_NOISE_BACKEND", "compiled"),
                  threads_per_rank=args.threads, cuda=torch.cuda.is_available(),
                  engines=engines,
                  adamw_config=ds_config("adamw_step", 1, args)["optimizer"],
                  fsdp_adamw_config={"type": "torch.optim.AdamW", "params": {"lr": 1e-5}},
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
                  wall_s=round(time.time() - t0, 1),
                  hwm_reset=all(r["hwm_reset"] for r in records),
                  load_avg=os.getloadavg()),
        records=records,
        summary=summarize(records, args.modes, args.world),
    )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
