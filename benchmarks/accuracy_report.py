"""bench_accuracy's summary, table and plots, made from the finished runs' records.

Per task and optimizer (at the lr the sweep chose): test accuracy (mean over seeds), the mean
curve, training seconds and forwards until the mean curve first reaches MeZO's final mean test
accuracy, and step time and training memory relative to MeZO's. Plots (matplotlib, Agg): test
accuracy against training seconds and against forwards per task, memory bars, and a small
headline figure for the README.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

LABELS = {"mezo": "MeZO", "lezo": "LeZO", "sparse_mezo": "Sparse MeZO", "lozo": "LOZO", "zo_adam": "ZO-Adam",
          "zo_sgd_sign": "ZO-SGD-Sign", "blockwise": "block-wise ZO", "adamw": "AdamW (FO)"}


def _finals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["stage"] == "final"]


def _chosen(records: list[dict[str, Any]]) -> dict[str, float]:
    """optimizer -> the lr of its final runs."""
    return {r["optimizer"]: r["lr"] for r in _finals(records)}


def sweep_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """optimizer -> {lr: final dev accuracy (None: diverged)} of the sweep runs."""
    out: dict[str, dict[str, float | None]] = {}
    for r in records:
        if r["stage"] == "sweep":
            out.setdefault(r["optimizer"], {})[f"{r['lr']:g}"] = r["final_dev"]
    return out


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Point-by-point mean over seeds (the points sit at the same forward counts)."""
    n = min(len(r["curve"]) for r in runs)
    return [{k: sum(r["curve"][i][k] for r in runs) / len(runs) for k in ("forwards", "train_s", "test")}
            for i in range(n)]


def first_reaching(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first point after step 0 at or above ``target`` (None: never; a target the untrained
    model already reaches says nothing about speed, so the caller passes None for it)."""
    for point in curve[1:]:
        if point["test"] >= target - 1e-9:
            return {"train_s": point["train_s"], "forwards": point["forwards"]}
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def task_summary(records: list[dict[str, Any]], task: str, lrs: dict[str, float]) -> dict[str, Any]:
    """The table rows of one task."""
    groups = {name: [r for r in _finals(records) if r["task"] == task and r["optimizer"] == name
                     and r["final_test"] is not None] for name in lrs}
    groups = {k: v for k, v in groups.items() if v}
    if "mezo" not in groups:
        return {}
    target = sum(r["final_test"] for r in groups["mezo"]) / len(groups["mezo"])
    zero_shot = sorted({(r["seed"], r["zero_shot_test"]) for r in _finals(records) if r["task"] == task})
    zero = sum(z for _, z in zero_shot) / len(zero_shot)
    ref_step = sum(r["step_s_median"] for r in groups["mezo"]) / len(groups["mezo"])
    ref_mem = sum(r["train_peak_rss_growth_mib"] or 0 for r in groups["mezo"]) / len(groups["mezo"])
    rows = {}
    for name, runs in groups.items():
        curve = mean_curve(runs)
        step = sum(r["step_s_median"] for r in runs) / len(runs)
        mem = sum(r["train_peak_rss_growth_mib"] or 0 for r in runs) / len(runs)
        rows[name] = {"lr": lrs[name], "seeds": sorted(r["seed"] for r in runs),
                      "test": [r["final_test"] for r in runs], "test_mean": sum(r["final_test"] for r in runs) / len(runs),
                      "best_test_on_curve": max(p["test"] for p in curve), "curve": curve,
                      "to_mezo_final": first_reaching(curve, target) if target > zero else None, "step_s": step,
                      "step_time_vs_mezo": _ratio(step, ref_step), "forwards_per_step": runs[0]["forwards_per_step"],
                      "train_peak_rss_growth_mib": mem, "memory_vs_mezo": _ratio(mem, ref_mem)}
    return {"mezo_final_test": target, "mezo_improved": target > zero, "zero_shot_test": zero,
            "zero_shot_by_seed": dict(zero_shot), "rows": rows}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| task | optimizer | lr | test acc (seeds) | s / forwards to MeZO's final | step time vs MeZO "
             "| training memory MiB (vs MeZO) |", "|---|---|---|---|---|---|---|"]
    for task, s in summary["tasks"].items():
        if not s:
            continue
        lines.append(f"| {task} | zero-shot | - | {s['zero_shot_test']:.3f} | - | - | - |")
        for name, row in s["rows"].items():
            reach = row["to_mezo_final"]
            reach_s = ("not reached" if s["mezo_improved"] else "- (MeZO ended at zero-shot)") if reach is None \
                else f"{reach['train_s']:.0f} s / {reach['forwards']:.0f}"
            tests = ", ".join(f"{t:.3f}" for t in row["test"])
            lines.append(f"| {task} | {LABELS[name]} | {row['lr']:g} | {row['test_mean']:.3f} ({tests}) | {reach_s} "
                         f"| {_fmt(row['step_time_vs_mezo'], '.2f')}x | {row['train_peak_rss_growth_mib']:.0f} "
                         f"({_fmt(row['memory_vs_mezo'], '.2f')}x) |")
    return "\n".join(lines) + "\n"


def sweep_table(sweep: dict[str, dict[str, float | None]]) -> str:
    if not sweep:
        return ""
    lines = ["", "| optimizer | sweep: dev accuracy by lr |", "|---|---|"]
    for name, by_lr in sweep.items():
        cells = ", ".join(f"{lr}: {'diverged' if dev is None else format(dev, '.3f')}" for lr, dev in by_lr.items())
        lines.append(f"| {LABELS[name]} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_task(s: dict[str, Any], task: str, model: str, path: Path, figsize: tuple[float, float] = (11, 4),
              dpi: int = 100) -> Any:
    """Test accuracy against training seconds and against forwards, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=figsize, sharey=True)
    for name, row in s["rows"].items():
        curve = row["curve"]
        for ax, x in zip(axes, ("train_s", "forwards")):
            ax.plot([p[x] for p in curve], [p["test"] for p in curve], marker="o", ms=3, label=LABELS[name])
    for ax, x in zip(axes, ("training seconds (evaluation excluded)", "forward passes")):
        ax.axhline(s["zero_shot_test"], color="grey", ls=":", lw=1)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{task}: held-out accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{model} on {task}: accuracy (mean over seeds; dotted: zero-shot)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig


def plot_memory(summary: dict[str, Any], path: Path) -> Any:
    """Training peak RSS growth and median step time per optimizer, on the first task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = next(iter(summary["tasks"].values()))
    names = list(s["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].bar([LABELS[n] for n in names], [s["rows"][n]["train_peak_rss_growth_mib"] for n in names])
    axes[0].set_ylabel("training peak RSS over the loaded model (MiB)")
    axes[1].bar([LABELS[n] for n in names], [s["rows"][n]["step_s"] for n in names])
    axes[1].set_ylabel("median step time (s)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def write_report(records: list[dict[str, Any]], out: Path, figure: Path | None, setting: dict[str, Any]) -> dict:
    """summary.json, table.md and the PNGs under ``out``; the headline copied to ``figure``."""
    lrs = _chosen(records)
    finals = _finals(records)
    tasks = sorted({r["task"] for r in finals}, key=lambda t: min(i for i, r in enumerate(finals) if r["task"] == t))
    summary = {"setting": setting, "chosen_lr": lrs, "sweep_dev": sweep_summary(records), "runs": len(records),
               "tasks": {t: task_summary(records, t, lrs) for t in tasks}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(summary) + sweep_table(summary["sweep_dev"]))
    pngs = []
    for task, s in summary["tasks"].items():
        if s:
            plot_task(s, task, setting["model"], out / f"accuracy_{task}.png")
            pngs.append(str(out / f"accuracy_{task}.png"))
    if summary["tasks"] and next(iter(summary["tasks"].values())):
        plot_memory(summary, out / "memory.png")
        pngs.append(str(out / "memory.png"))
        first = next(iter(summary["tasks"]))
        plot_task(summary["tasks"][first], first, setting["model"], out / "headline.png", figsize=(8, 3), dpi=80)
        pngs.append(str(out / "headline.png"))
        if figure is not None:
            figure.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "headline.png", figure)
    summary["pngs"] = pngs
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
