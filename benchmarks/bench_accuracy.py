"""Every optimizer on real data, side by side: held-out accuracy against time and forward passes.

SmolLM2-135M (the bundled real model, fp32, one process) on two real tasks: ``sst2`` (the Rotten
Tomatoes sentences with MeZO's SST-2 prompt) and ``tweets`` (3-class tweet sentiment). For each
task: zero-shot, then MeZO, LeZO, Sparse MeZO, LOZO, ZO-Adam, ZO-SGD-Sign and block-wise ZO, and
first-order AdamW by backprop on the same (local) engine as the reference. Every run has the
same data, micro-batch, prompt and evaluation; its optimizer options are the shipped
``ds_configs/zero3_<name>.json``'s except the learning rate:

* **sweep** (first task, seed 0, ``--sweep-steps`` each): three learning rates per optimizer;
  the one with the best final dev accuracy (dev cut from the training side; ties: the lower dev
  loss) is chosen;
* **final** (``--steps`` each): the chosen lr on every task, seed 0, and a second seed for MeZO,
  LeZO and Sparse MeZO; the table reports these runs' test accuracy.

A run's budget is counted in forward passes: ``2 x steps`` (MeZO's two per step), so block-wise
ZO (2 per block per step) takes fewer steps; AdamW takes ``steps`` steps of one forward and one
backward. A final run measures test accuracy at five points of the budget (0, 1/4, .., all), a
sweep run dev accuracy and loss at its start and end (the untrained model's scores are computed
once per task, seed and split); recorded per run: the curve against training seconds
(evaluation excluded) and forwards, step time, the peak RSS growth of training over the loaded
model (``VmHWM``), the losses.

The defaults (micro-batch 8, sweeps and final runs of 40 MeZO-steps, 64 dev and 100 test
examples) are sized to the 2-hour budget on a 2-core CPU: see the README for what they cost and
what so short a budget can and cannot show. The sweep runs at the final budget because a shorter
one chooses lrs that overshoot over the final run (10-step sweeps chose 4x MeZO's best 40-step lr).

Resumable run by run: each finished run is ``<out>/runs/<task>/<name>.json``; a benchmark started
again skips those. The summary (``<out>/summary.json``, ``<out>/table.md``) and the plots
(``<out>/*.png``, the headline copied to ``--figure``) are made from whatever runs exist::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_accuracy.py            # the whole benchmark
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_accuracy.py --quick    # a smoke run

``--quick``: the first task only, seed 0, no sweep (each optimizer at its shipped JSON's lr), a budget
of 4 MeZO steps, 32 test examples: it checks the benchmark on the real model, its
accuracies are not a comparison. See the README for the measured durations. JSON (the summary) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, progress  # noqa: E402
from accuracy_report import write_report  # noqa: E402
from bench_memory import proc_status_mib, trim_and_reset_hwm  # noqa: E402

log = progress("bench_accuracy")

TASKS = ("sst2", "tweets")
# name -> (shipped JSON whose optimizer section is used, the sweep's three learning rates). LeZO's,
# ZO-SGD-Sign's and block-wise's grids were one step lower until a 40-step sweep chose their top.
OPTIMIZERS: dict[str, tuple[str | None, tuple[float, float, float]]] = {
    "mezo": ("zero3_mezo.json", (1.25e-5, 5e-5, 2e-4)),
    "lezo": ("zero3_lezo.json", (5e-5, 2e-4, 8e-4)),
    "sparse_mezo": ("zero3_sparse_mezo.json", (5e-5, 2e-4, 8e-4)),
    "lozo": ("zero3_lozo.json", (1.25e-5, 5e-5, 2e-4)),
    "zo_adam": ("zero3_zo_adam.json", (3e-4, 1e-3, 3e-3)),
    "zo_sgd_sign": ("zero3_zo_sgd_sign.json", (5e-4, 1.5e-3, 5e-3)),
    "blockwise": ("zero3_blockwise.json", (5e-5, 2e-4, 8e-4)),
    "adamw": (None, (1e-5, 3e-5, 1e-4)),
}
SEEDED = ("mezo", "lezo", "sparse_mezo")  # run with a second seed
EVAL_POINTS = 4  # evaluations after step 0


@dataclass(frozen=True)
class RunSpec:
    """One fine-tune of the benchmark."""

    task: str
    optimizer: str
    lr: float
    seed: int
    stage: str  # "sweep" or "final"

    @property
    def name(self) -> str:
        return f"{self.stage}_{self.optimizer}_lr{self.lr:g}_seed{self.seed}"


@dataclass(frozen=True)
class Budget:
    """What every run shares."""

    model: str
    steps: int  # MeZO-equivalent steps: the forward budget is 2 x steps
    batch_size: int
    n_train: int
    n_dev: int
    n_eval: int
    max_length: int


def optimizer_section(name: str, lr: float) -> dict[str, Any]:
    """The shipped JSON's optimizer type and options with ``lr`` (AdamW: an unused MeZO)."""
    shipped = OPTIMIZERS[name][0]
    if shipped is None:
        return {"type": "MeZO", "params": {"lr": 0.0, "eps": 1e-3}}
    section = json.loads((ROOT / "ds_configs" / shipped).read_text())["optimizer"]
    return {"type": section["type"], "params": {**section["params"], "lr": lr}}


def shipped_lr(name: str) -> float:
    """The lr of the shipped JSON (AdamW, which has none: its grid's middle)."""
    shipped, grid = OPTIMIZERS[name]
    if shipped is None:
        return grid[1]
    return float(json.loads((ROOT / "ds_configs" / shipped).read_text())["optimizer"]["params"]["lr"])


def train_config(spec: RunSpec, budget: Budget, work: Path) -> Any:
    from zoscale.train.config import load_config

    data = {"task": spec.task, "n_train": budget.n_train, "n_dev": budget.n_dev, "n_eval": budget.n_eval,
            "max_length": budget.max_length}
    values = {"model": {"name": budget.model}, "data": data, "optimizer": optimizer_section(spec.optimizer, spec.lr),
              "steps": 10**6, "batch_size": budget.batch_size, "eval_every": 0, "seed": spec.seed,
              "output_dir": str(work), "save_final": False, "overwrite": True}
    path = work.with_suffix(".config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return load_config(path)


class ForwardCounter:
    """Counts calls of the model's forward (a pre-hook on the top module)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


class FirstOrderStep:
    """AdamW by backprop on the run's trainable parameters (those the ZO optimizer would train)."""

    def __init__(self, run: Any, lr: float) -> None:
        self.run = run
        self.params = [p for group in run.optimizer.param_groups for p in group["params"]]
        for p in self.params:
            p.requires_grad_(True)
        self.adam = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def __call__(self) -> float:
        run = self.run
        batch = run.task.family.train_batch(next(run.stream), run.encoder)
        self.adam.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = run.task.family.loss(run.engine.module, batch)
            loss.backward()
        self.adam.step()
        return float(loss.detach())


def _zo_step(run: Any, step: int) -> float:
    from zoscale.train.trainer import train_step

    return float(train_step(run, step)["loss"])


def _test_accuracy(run: Any) -> float:
    from zoscale.train.trainer import evaluate_run

    headline = run.task.family.metrics[0]
    return evaluate_run(run, run.data.eval)[0][f"eval_{headline}"]


@torch.no_grad()
def _dev_accuracy_and_loss(run: Any) -> tuple[float, float]:
    """Dev accuracy and mean loss from the same candidate scores (both tasks are classification):
    the loss tells apart the sweep's lrs that a short run leaves at the same accuracy."""
    from zoscale.data.tasks.classification import choice_scores

    run.optimizer.flush()
    dev, size = run.data.dev, run.cfg.batch_size
    right, loss = 0.0, 0.0
    for i in range(0, len(dev), size):
        batch = run.task.family.eval_batch(dev[i:i + size], run.encoder)
        scores = choice_scores(run.engine.module, batch)
        labels = batch["labels"].to(scores.device)
        right += float((scores.argmax(-1) == labels).sum())
        loss += float(torch.nn.functional.cross_entropy(scores, labels, reduction="sum"))
    return right / len(dev), loss / len(dev)


# The untrained model's score, the same for every run of a (budget, task, seed, split): computed once.
_ZERO_SHOT: dict[tuple[Any, ...], Any] = {}


def _score(run: Any, split: str) -> Any:
    """Test accuracy (``split`` "test"), or dev accuracy and loss ("dev")."""
    return _test_accuracy(run) if split == "test" else _dev_accuracy_and_loss(run)


def _zero_shot(run: Any, spec: RunSpec, budget: Budget, split: str) -> Any:
    key = (budget, spec.task, spec.seed, split)
    if key not in _ZERO_SHOT:
        _ZERO_SHOT[key] = _score(run, split)
    return _ZERO_SHOT[key]


def _point(step: int, forwards: int, seconds: float, split: str, score: Any) -> dict[str, Any]:
    """A curve point: test accuracy (final runs), or dev accuracy and loss (sweep runs)."""
    scores = {"test": score} if split == "test" else {"dev": score[0], "dev_loss": score[1]}
    return {"step": step, "forwards": forwards, "train_s": seconds, **scores}


def run_one(spec: RunSpec, budget: Budget, work: Path) -> dict[str, Any]:
    """Fine-tune ``spec`` within ``budget``; its curve, step time, memory and losses.

    A final run's curve is test accuracy at 0, 1/4, .., all of the budget; a sweep run's is dev
    accuracy and loss at 0 and at the end (dev chooses the lr, test reports it: neither sees the other).
    """
    from zoscale.optim.base import NonFiniteLossError
    from zoscale.train.trainer import build

    run = build(train_config(spec, budget, work))
    counter = ForwardCounter(run.engine.module)
    step_fn = FirstOrderStep(run, spec.lr) if spec.optimizer == "adamw" else None
    forwards_budget = budget.steps if step_fn is not None else 2 * budget.steps  # AdamW: steps x (fwd + bwd)
    points = EVAL_POINTS if spec.stage == "final" else 1
    marks = [math.ceil(forwards_budget * k / points) for k in range(1, points + 1)]
    split = "test" if spec.stage == "final" else "dev"
    curve = [_point(0, 0, 0.0, split, _zero_shot(run, spec, budget, split))]
    baseline = proc_status_mib("VmRSS") if trim_and_reset_hwm() else None
    losses, step_s, seconds, forwards, diverged = [], [], 0.0, 0, None
    while forwards < forwards_budget:
        step = len(step_s) + 1
        before, t0 = counter.calls, time.perf_counter()
        try:
            losses.append(step_fn() if step_fn is not None else _zo_step(run, step))
        except NonFiniteLossError as e:  # a too-large lr of the sweep: recorded, never chosen
            diverged = {"step": step, "error": str(e).splitlines()[0]}
            break
        step_s.append(time.perf_counter() - t0)
        seconds += step_s[-1]
        forwards += counter.calls - before  # the step's own forwards (a backward is not one)
        if marks and forwards >= marks[0]:
            while marks and forwards >= marks[0]:
                marks.pop(0)
            curve.append(_point(step, forwards, seconds, split, _score(run, split)))
    peak = proc_status_mib("VmHWM") - baseline if baseline is not None else None
    end = None if diverged else curve[-1]
    return {**asdict(spec), "name": spec.name, "budget": asdict(budget), "curve": curve,
            "steps_run": len(step_s), "forwards_per_step": forwards / max(len(step_s), 1),
            "step_s_median": sorted(step_s)[len(step_s) // 2] if step_s else None,
            "train_peak_rss_growth_mib": peak, "losses": losses, "diverged": diverged,
            "final_dev": end.get("dev") if end else None, "final_dev_loss": end.get("dev_loss") if end else None,
            "final_test": end.get("test") if end else None,
            "zero_shot_test": curve[0].get("test"), "zero_shot_dev": curve[0].get("dev")}


def run_path(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.task / f"{spec.name}.json"


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run's record under ``out`` (a cut-short write has no file: see ``ensure``)."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]


def ensure(spec: RunSpec, budget: Budget, out: Path) -> dict[str, Any]:
    """The run's record: read back if it finished before, else run now and keep it."""
    path = run_path(out, spec)
    if path.is_file():
        record = json.loads(path.read_text())
        if record["budget"] != asdict(budget):
            raise SystemExit(f"{path} was run with budget {record['budget']}, not {asdict(budget)}: "
                             "use another --out or delete it")
        log(f"{spec.task} {spec.name}: kept from an earlier run")
        return record
    log(f"{spec.task} {spec.name} ({spec.stage}) ...")
    record = run_one(spec, budget, out / "work" / spec.task / spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # whole or absent
    score = f"test {record['final_test']}" if spec.stage == "final" else \
        f"dev {record['final_dev']} (loss {record['final_dev_loss']})"
    log(f"{spec.task} {spec.name}: {score}, step {record['step_s_median']:.3f} s" if not record["diverged"]
        else f"{spec.task} {spec.name}: diverged at step {record['diverged']['step']}")
    return record


def chosen_lr(records: list[dict[str, Any]], optimizer: str) -> float:
    """The sweep's lr with the best final dev accuracy, ties broken by the lower dev loss, then the
    smaller lr; diverged runs never."""
    ok = [r for r in records if r["optimizer"] == optimizer and r["final_dev"] is not None]
    if not ok:
        raise SystemExit(f"every sweep run of {optimizer} diverged: widen its grid in OPTIMIZERS")
    return min(ok, key=lambda r: (-r["final_dev"], r["final_dev_loss"], r["lr"]))["lr"]


def run_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sweep on the first task (short runs), then the chosen lrs on every task and seed."""
    def budget(steps: int) -> Budget:
        return Budget(args.model, steps, args.batch_size, args.n_train, args.n_dev, args.n_eval, args.max_length)

    out, names, first = Path(args.out), args.optimizers, args.tasks[0]
    records: list[dict[str, Any]] = []
    if args.quick:  # no sweep: the shipped JSON's lr
        lrs = {name: shipped_lr(name) for name in names}
    else:
        for name in names:
            for lr in OPTIMIZERS[name][1]:
                records.append(ensure(RunSpec(first, name, lr, 0, "sweep"), budget(args.sweep_steps), out))
        lrs = {name: chosen_lr(records, name) for name in names}
    for task in args.tasks:
        for seed in args.seeds:
            for name in names:
                if seed == args.seeds[0] or name in SEEDED:
                    records.append(ensure(RunSpec(task, name, lrs[name], seed, "final"), budget(args.steps), out))
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_accuracy", help="runs, summary and plots (resumable)")
    parser.add_argument("--figure", default=str(ROOT / "benchmarks" / "figures" / "accuracy.png"),
                        help="where the headline PNG is copied (the README's); '' for none")
    parser.add_argument("--quick", action="store_true", help="one task, one seed, shipped lrs, 4-step budget")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="a final run's budget in MeZO steps (2 forwards each)")
    parser.add_argument("--sweep-steps", type=int, default=40, help="a sweep run's budget in MeZO steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-dev", type=int, default=None)
    parser.add_argument("--n-eval", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)
    quick = args.quick
    args.tasks = args.tasks or (list(TASKS[:1]) if quick else list(TASKS))
    args.seeds = args.seeds or ([0] if quick else [0, 1])
    args.steps = args.steps or (4 if quick else 40)
    args.n_dev = args.n_dev if args.n_dev is not None else (32 if quick else 64)
    args.n_eval = args.n_eval or (32 if quick else 100)
    if "mezo" not in args.optimizers:
        parser.error("--optimizers must include mezo (the reference of every ratio)")
    records = run_benchmark(args)
    summary = write_report(records, Path(args.out), Path(args.figure) if args.figure else None,
                           {"model": args.model, "engine": "one process (LocalEngine), fp32", "torch_threads": torch.get_num_threads(),
                            "quick": quick})
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
