"""Step-time benchmark of zoscale's fused noise passes and MeZO step on CPU.

What is measured (one process, wall clock with ``time.perf_counter``, median over ``--repeats``
timed rounds after one warm-up round; quantities that are compared are timed in the same rounds,
interleaved: floor / noise / randn passes, then forward / MeZO steps):

* ``forward_s``: one full forward of a randomly initialised ``LlamaForCausalLM`` with the shape of
  SmolLM2-135M (30 layers, hidden 576, tied embeddings; ``--quick``: 4 layers) on a fixed batch of
  16 x 32 random token ids, returning the mean next-token cross-entropy of the last position
  (``logits_to_keep=1``, the shape of a classification loss), under ``torch.no_grad()``. This
  is the closure given to the optimizer.
* ``noise_pass_s[kind]`` (kind = gaussian, rademacher): one ``zoscale.noise.axpbz_(view, 0, key,
  1.0, +-1e-3, kind)`` pass over every trainable parameter (flat views ``p.data.view(-1)``, one
  key per tensor). The first pass compiles the kernel (``torch.compile``); its wall time
  (compilation plus one pass) is reported as ``compile_s[kind]`` and serves as the warm-up.
  The kind compiled first (gaussian) also pays torch.compile's one-time start-up in the process.
* ``floor_pass_s``: one in-place scalar add ``p.data.add_(+-1e-3)`` over the same parameters, the
  memory-bandwidth floor of any pass that reads and writes each parameter once; and
  ``ratio_noise_to_floor[kind]``.
* ``randn_pass_s``: the public MeZO perturbation (``torch.manual_seed(s)`` once per pass, then per
  parameter ``z = torch.normal(0, 1, size=p.shape); p.data = p.data + eps * z``), which
  materialises ``z`` and a new parameter tensor: what the fused kernel saves.
* ``mezo_step_s[kind]``: one ``MeZO(model.named_parameters(), lr=0.0, eps=1e-3,
  noise=kind).step(closure)`` (lr 0 keeps the model from drifting): two forwards plus three
  fused noise passes. ``ratio_step_to_2fwd[kind]`` = step / (2 x forward).

Signs alternate between repeats (+eps, -eps) so the benchmark leaves the weights where they were.
``meets_target`` compares against the issue's targets: Rademacher pass <= 2x floor, Gaussian
pass <= 6x floor, MeZO step <= 1.10 x 2 forwards with Rademacher and <= 1.20 with Gaussian.

The JSON result goes to stdout; progress goes to stderr. Run from the repository root::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_step.py            # full (~1 min on an idle machine)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_step.py --quick    # 4 layers, 2 repeats
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_step.py --dtype bf16 > bench_bf16.json

Timings are very sensitive to other processes on the machine: when another process keeps the
cores busy, every OpenMP parallel region waits for a preempted thread and times grow by 10x or
more. The JSON records the share of CPU time other processes used during each phase
(``meta.other_processes_cpu_share``; near 0 means a clean run), the load average, every timed
sample and the minima (``from_minima``), so a disturbed run can be recognised.

By default the noise kernels are compiled into a fresh temporary inductor cache, so that
``compile_s`` is a cold compile and the kernels do not depend on what earlier processes compiled
(``--shared-inductor-cache`` to opt out; ``meta.noise_kernel_parallel`` records whether the
compiled kernels are multi-threaded).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import shutil
import tempfile
import time
from typing import Any, Callable

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from _harness import progress
from zoscale import noise
from zoscale.optim.mezo import MeZO

KINDS: tuple[str, ...] = ("gaussian", "rademacher")
EPS = 1e-3
# Targets from the issue.
TARGET_NOISE_TO_FLOOR = {"rademacher": 2.0, "gaussian": 6.0}
TARGET_STEP_TO_2FWD = {"rademacher": 1.10, "gaussian": 1.20}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


log = progress("bench_step")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages, or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy jiffies of the machine, all jiffies of the machine, jiffies of this process)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat", encoding="utf-8") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total, int(own[11]) + int(own[12])  # utime + stime (all threads)


class CpuMonitor:
    """Share of the machine's CPU time used by *other* processes between start() and stop().

    0 on a quiet machine; 0.5 on two cores means another process kept one core busy. Compiler
    worker processes of this run count as "other" (they only run during compilation).
    """

    def __init__(self) -> None:
        self._start: tuple[int, int, int] | None = None

    def start(self) -> "CpuMonitor":
        self._start = _cpu_jiffies()
        return self

    def stop(self) -> float | None:
        end = _cpu_jiffies()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        busy, total, own = (e - s for e, s in zip(end, self._start))
        return round(max(0.0, (busy - own) / total), 3)


def wait_for_idle(max_wait_s: float, threshold: float = 0.1, window_s: float = 2.0) -> float | None:
    """Wait until other processes use less than ``threshold`` of the CPU over ``window_s``.

    Gives up after ``max_wait_s``. Returns the last measured share of other processes.
    """
    deadline = time.monotonic() + max_wait_s
    share = None
    while True:
        monitor = CpuMonitor().start()
        time.sleep(window_s)
        share = monitor.stop()
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share
        log(f"waiting for an idle machine (other processes use {share:.0%} of the CPU)")


def build_model(num_layers: int, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with SmolLM2-135M's shape (no download)."""
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def make_closure(model: LlamaForCausalLM, batch: int, seq_len: int, seed: int) -> Callable[[], torch.Tensor]:
    """The closure: mean next-token cross-entropy of the last position of a fixed random batch.

    ``seq_len + 1`` ids are drawn per row; the model reads the first ``seq_len`` and the last id is
    the target of the logits at the last position.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=gen)
    inputs, targets = ids[:, :seq_len].contiguous(), ids[:, seq_len].contiguous()

    @torch.no_grad()
    def closure() -> torch.Tensor:
        logits = model(input_ids=inputs, logits_to_keep=1).logits[:, -1, :]
        return torch.nn.functional.cross_entropy(logits.float(), targets)

    return closure


def rounds(
    fns: dict[str, Callable[[int], Any]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]], float | None]:
    """Time every function once per round, ``warmup`` untimed rounds then ``repeats`` timed ones.

    Interleaving puts the quantities that are compared (a pass and the floor, a step and a
    forward) under the same machine load. ``fn(i)`` gets the round index, so it can alternate
    signs. Returns (timed samples per name, warm-up times per name, share of the CPU used by
    other processes during the timed rounds).
    """
    warm: dict[str, list[float]] = {name: [] for name in fns}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    monitor = CpuMonitor()
    for i in range(warmup + repeats):
        if i == warmup:
            monitor.start()
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            (warm if i < warmup else samples)[name].append(dt)
    return samples, warm, monitor.stop()


def sign(i: int) -> float:
    """+1 on even calls, -1 on odd ones (consecutive passes cancel)."""
    return 1.0 if i % 2 == 0 else -1.0


def noise_kernels_parallel(cache_dir: str) -> dict[str, bool] | None:
    """Whether the compiled CPU noise kernels in ``cache_dir`` contain an OpenMP parallel region.

    With ``dynamic=True`` inductor decides serial vs. parallel from the size of the *first* call
    and the FX graph cache then serves that kernel for every size (and to later processes);
    this records which variant the timings used. None when no kernel source is found.
    """
    found: dict[str, bool] = {}
    for path in glob.glob(os.path.join(cache_dir, "**", "*.py"), recursive=True):
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
        except OSError:
            continue
        if "bitwise_xor" not in src or "cpp_fused" not in src:
            continue
        kind = "gaussian" if "_cos_" in src or "cos_log" in src else "rademacher"
        found[kind] = found.get(kind, False) or "omp parallel" in src
    return found or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 5; 2 with --quick)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--layers", type=int, default=None,
                        help="number of decoder layers (default 30; 4 with --quick)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--seq-len", type=int, default=32, help="sequence length (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    parser.add_argument("--quick", action="store_true", help="sanity run: 4 layers, 2 repeats")
    parser.add_argument("--skip-randn", action="store_true", help="skip the public-MeZO randn baseline")
    parser.add_argument(
        "--shared-inductor-cache", action="store_true",
        help="use the user's inductor cache instead of a fresh temporary one (compile_s is then "
             "a cache hit, and the kernels are whatever an earlier process compiled)",
    )
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, metavar="SECONDS",
        help="before starting, wait up to SECONDS for other processes to leave the CPU idle",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.layers is None:
        args.layers = 4 if args.quick else 30
    if args.repeats < 1 or args.threads < 1 or args.layers < 1:
        parser.error("--repeats, --threads and --layers must be >= 1")
    return args


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the JSON result to stdout and return it."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    private_cache = None
    if not args.shared_inductor_cache:
        # Before the first torch.compile: inductor reads the variable lazily.
        private_cache = tempfile.mkdtemp(prefix="zoscale_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = private_cache
    idle_share = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
    load_before = load_average()
    t_start = time.perf_counter()

    log(f"building model: {args.layers} layers, {args.dtype}, {args.threads} threads")
    model = build_model(args.layers, dtype, args.seed)
    closure = make_closure(model, args.batch, args.seq_len, args.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for _, p in named)
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    keys = [noise.noise_key(args.seed, 0, 0, n) for n, _ in named]

    def views() -> list[torch.Tensor]:
        # Rebuilt per pass: the randn baseline rebinds p.data.
        return [p.data.view(-1) for _, p in named]

    # ---- parameter passes, interleaved round by round: floor, fused noise, public MeZO randn.
    def floor_pass(i: int) -> None:
        s = sign(i) * EPS
        for v in views():
            v.add_(s)

    def noise_pass(kind: str) -> Callable[[int], None]:
        def run(i: int) -> None:
            b = sign(i) * EPS
            for v, key in zip(views(), keys):
                noise.axpbz_(v, 0, key, 1.0, b, kind)
        return run

    def randn_pass(i: int) -> None:
        s = sign(i) * EPS
        torch.manual_seed(1234)  # public MeZO seeds once per pass, then draws parameter by parameter
        for _, p in named:
            z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + s * z

    passes: dict[str, Callable[[int], None]] = {"floor": floor_pass}
    passes.update({kind: noise_pass(kind) for kind in KINDS})  # warm-up round compiles
    if not args.skip_randn:
        passes["randn"] = randn_pass
    log(f"parameter passes ({', '.join(passes)}); the warm-up round compiles the noise kernels")
    rng_state = torch.get_rng_state()
    pass_samples, pass_warm, other_passes = rounds(passes, args.repeats)
    torch.set_rng_state(rng_state)

    # ---- forward and MeZO steps, interleaved round by round
    optimizers = {kind: MeZO(model.named_parameters(), lr=0.0, eps=EPS, noise=kind) for kind in KINDS}
    steps: dict[str, Callable[[int], Any]] = {"forward": lambda i: closure()}
    steps.update({kind: (lambda i, opt=opt: opt.step(closure)) for kind, opt in optimizers.items()})
    log("forward and MeZO steps")
    step_samples, _, other_steps = rounds(steps, args.repeats)
    other_cpu = {"passes": other_passes, "forward_and_steps": other_steps}

    # ---- results
    fwd = _median(step_samples["forward"])
    floor = _median(pass_samples["floor"])
    fwd_min, floor_min = min(step_samples["forward"]), min(pass_samples["floor"])
    result: dict[str, Any] = {
        "forward_s": fwd,
        "floor_pass_s": floor,
        "floor_bandwidth_GBps": 2 * n_params * elem_bytes / floor / 1e9,  # read + write
        "compile_s": {kind: pass_warm[kind][0] for kind in KINDS},
        "noise_pass_s": {kind: _median(pass_samples[kind]) for kind in KINDS},
    }
    result["ratio_noise_to_floor"] = {k: result["noise_pass_s"][k] / floor for k in KINDS}
    result["noise_ns_per_element"] = {k: result["noise_pass_s"][k] / n_params * 1e9 for k in KINDS}
    if "randn" in pass_samples:
        randn = _median(pass_samples["randn"])
        result["randn_pass_s"] = randn
        result["ratio_randn_to_floor"] = randn / floor
        result["ratio_randn_to_noise"] = {k: randn / result["noise_pass_s"][k] for k in KINDS}
        # Public MeZO regenerates z four times per step (+eps, -2eps, restore, update).
        result["public_mezo_step_estimate_s"] = 2 * fwd + 4 * randn
    result["mezo_step_s"] = {k: _median(step_samples[k]) for k in KINDS}
    result["ratio_step_to_2fwd"] = {k: result["mezo_step_s"][k] / (2 * fwd) for k in KINDS}
    # Three fused noise passes + bookkeeping; compare with 3 x noise_pass_s.
    result["step_overhead_s"] = {k: result["mezo_step_s"][k] - 2 * fwd for k in KINDS}
    noise_ratio, step_ratio = result["ratio_noise_to_floor"], result["ratio_step_to_2fwd"]
    result["meets_target"] = {
        "rademacher_pass_le_2x_floor": noise_ratio["rademacher"] <= TARGET_NOISE_TO_FLOOR["rademacher"],
        "gaussian_pass_le_6x_floor": noise_ratio["gaussian"] <= TARGET_NOISE_TO_FLOOR["gaussian"],
        "rademacher_step_le_1.10x_2fwd": step_ratio["rademacher"] <= TARGET_STEP_TO_2FWD["rademacher"],
        "gaussian_step_le_1.20x_2fwd": step_ratio["gaussian"] <= TARGET_STEP_TO_2FWD["gaussian"],
    }
    # Best-case (least disturbed) view, from the minimum of each sample list.
    result["from_minima"] = {
        "forward_s": fwd_min,
        "floor_pass_s": floor_min,
        "noise_pass_s": {k: min(pass_samples[k]) for k in KINDS},
        "ratio_noise_to_floor": {k: min(pass_samples[k]) / floor_min for k in KINDS},
        "mezo_step_s": {k: min(step_samples[k]) for k in KINDS},
        "ratio_step_to_2fwd": {k: min(step_samples[k]) / (2 * fwd_min) for k in KINDS},
    }
    if "randn" in pass_samples:
        result["from_minima"]["randn_pass_s"] = min(pass_samples["randn"])
    result["loss"] = float(closure())
    result["samples"] = {
        **{f"{name}_pass_s": v for name, v in pass_samples.items()},
        "forward_s": step_samples["forward"],
        **{f"mezo_step_s.{k}": step_samples[k] for k in KINDS},
    }
    result["meta"] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "noise_backend": noise.backend(),
        "inductor_cache": "private" if private_cache else "shared",
        "noise_kernel_parallel": noise_kernels_parallel(private_cache) if private_cache else None,
        "dtype": args.dtype,
        "layers": args.layers,
        "n_params": n_params,
        "n_tensors": len(named),
        "batch_shape": [args.batch, args.seq_len],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "repeats": args.repeats,
        "quick": args.quick,
        "other_processes_cpu_share": other_cpu,
        "other_processes_cpu_share_at_start": idle_share,
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
        "total_wall_s": time.perf_counter() - t_start,
    }
    if private_cache:
        shutil.rmtree(private_cache, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
