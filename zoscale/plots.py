"""Plots of training runs from their ``metrics.jsonl``: loss, held-out metrics, step time, lr.

``launch/plot.py`` is the command; the functions are here::

    from zoscale.plots import plot_runs, save_figure
    fig = plot_runs(["runs/a", "runs/b/metrics.jsonl"], x="both")
    save_figure(fig, "compare.png")

One figure, four panels per row: the training loss, the held-out metrics (every ``eval_<metric>``
the runs recorded but ``eval_truncated``: accuracy, or f1 and em), the step time and its split by
phase (``step_s`` and the optimizer's ``perturb_s``, ``forward_s``, ... as lines, one line style
per phase), and the lr. One row against the step, one against ``elapsed_s`` (wall-clock seconds
since the run started), or both. Every run has its colour, labelled by its folder's name.

Figures are built with matplotlib's object API on the Agg canvas: no display and no pyplot state.
A file that is missing, empty or holds a line that is not a JSON object raises
:class:`MetricsError` naming the file and line.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MetricsError", "Run", "PANELS", "X_AXES", "read_metrics", "load_run", "timing_keys", "eval_keys",
           "plot_runs", "save_figure"]

#: Panel titles, left to right.
PANELS = ("loss", "held-out", "step time", "lr")
#: What ``x`` may be: a row against the step, against elapsed seconds, or both rows.
X_AXES = ("step", "time", "both")
_X_KEYS = {"step": "step", "time": "elapsed_s"}
_X_LABELS = {"step": "step", "time": "elapsed (s)"}
#: ``*_s`` keys of a step record that are not a phase of the step's time.
_NOT_TIMINGS = ("elapsed_s", "examples_per_s")
#: Line styles that tell a panel's keys apart (the colour is the run's).
_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2)), (0, (3, 1)))


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file (and line)."""


@dataclass
class Run:
    """One run's records: its label (the folder's name) and the path read."""

    label: str
    path: Path
    records: list[dict[str, Any]]

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The step records (those with a loss)."""
        return [r for r in self.records if "loss" in r]


def metrics_path(path: str | Path) -> Path:
    """``path`` itself, or ``<path>/metrics.jsonl`` for a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
        if not p.is_file():
            raise MetricsError(f"{path}: a folder without metrics.jsonl")
    if not p.is_file():
        raise MetricsError(f"metrics file not found: {p}")
    return p


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of a run folder's).

    Raises :class:`MetricsError` naming the file and line for a line that is not a JSON object
    or has no ``step``, and for a file without records. A last line without its newline that does
    not parse is a record being written (a live run): it is left out, with a warning.
    """
    p = metrics_path(path)
    text = p.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: cut short while being written
                warnings.warn(f"{p}:{number}: an incomplete last line (a record being written?) is left out",
                              stacklevel=2)
                continue
            raise MetricsError(f"{p}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{p}:{number}: a record must be a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("step"), (int, float)):
            raise MetricsError(f"{p}:{number}: a record without a numeric 'step'")
        records.append(record)
    if not records:
        raise MetricsError(f"{p}: no records (an empty metrics file)")
    return records


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A run from its metrics.jsonl or its folder, labelled by the folder's name."""
    p = metrics_path(path)
    return Run(label or p.resolve().parent.name, p, read_metrics(p))


def timing_keys(runs: Sequence[Run]) -> list[str]:
    """The per-step timing keys: ``step_s`` first, then the phases in the order recorded."""
    keys: list[str] = []
    for run in runs:
        for record in run.steps:
            keys += [k for k in record if k.endswith("_s") and k not in _NOT_TIMINGS and k not in keys
                     and isinstance(record[k], (int, float))]
    return sorted(keys, key=lambda k: k != "step_s")


def eval_keys(runs: Sequence[Run]) -> list[str]:
    """The held-out metric keys (``eval_<metric>``, not ``eval_truncated``), in the order recorded."""
    keys: list[str] = []
    for run in runs:
        for record in run.records:
            keys += [k for k in record if k.startswith("eval_") and k != "eval_truncated" and k not in keys
                     and isinstance(record[k], (int, float)) and not isinstance(record[k], bool)]
    return keys


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if x in r and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names; the fuller path where two runs share one."""
    names = [p.resolve().parent.name for p in paths]
    return [str(p.parent) if names.count(n) > 1 else n for n, p in zip(names, paths)]


def plot_runs(paths: Sequence[str | Path], x: str = "both", labels: Sequence[str] | None = None) -> Any:
    """A matplotlib ``Figure`` of the runs at ``paths`` (metrics.jsonl files or run folders).

    ``x``: ``step``, ``time`` (elapsed seconds) or ``both`` (two rows). Each panel holds one line
    per run (the held-out panel one per run and metric, the step-time panel one per run and
    phase); a line's label is ``<run>`` or ``<run> <key>``. Runs without ``elapsed_s`` (written
    before records had timestamps) are left out of the time row, with a warning.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise ValueError(f"x must be one of {list(X_AXES)}, got {x!r}")
    if not paths:
        raise ValueError("no runs to plot")
    files = [metrics_path(p) for p in paths]
    names = list(labels) if labels is not None else _labels(files)
    runs = [Run(name, f, read_metrics(f)) for name, f in zip(names, files)]
    rows = ["step", "time"] if x == "both" else [x]
    timings, metrics = timing_keys(runs), eval_keys(runs)
    fig = Figure(figsize=(4.4 * len(PANELS), 3.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(PANELS), squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for row, axis in zip(axes, rows):
        xkey = _X_KEYS[axis]
        drawn = [(run, c) for run, c in zip(runs, colours) if any(xkey in r for r in run.records)]
        if axis == "time":
            for run in runs:
                if all(run is not d[0] for d in drawn):
                    warnings.warn(f"{run.path}: no 'elapsed_s' in its records (written before timestamps); "
                                  "left out of the time row", stacklevel=2)
        loss, held, timing, lr = row
        for run, colour in drawn:
            loss.plot(*_series(run.steps, xkey, "loss"), color=colour, label=run.label)
            lr.plot(*_series(run.steps, xkey, "lr"), color=colour, label=run.label)
            for i, key in enumerate(metrics):
                evals = [r for r in run.records if key in r]
                if evals:
                    held.plot(*_series(evals, xkey, key), color=colour, linestyle=_STYLES[i % len(_STYLES)],
                              marker="o", markersize=3, label=f"{run.label} {key}")
            for i, key in enumerate(timings):
                if any(key in r for r in run.steps):
                    timing.plot(*_series(run.steps, xkey, key), color=colour, linestyle=_STYLES[i % len(_STYLES)],
                                linewidth=1.6 if key == "step_s" else 1.0, label=f"{run.label} {key}")
        for ax, title, ylabel in zip(row, PANELS, ("loss", "held-out metric", "seconds", "lr")):
            ax.set_title(title)
            ax.set_xlabel(_X_LABELS[axis])
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        if drawn:
            loss.legend(fontsize="small")
        _style_legend(held, metrics)
        _style_legend(timing, timings)
    return fig


def _style_legend(ax: Any, keys: list[str]) -> None:
    """A legend of line styles (one per key) in black; the colours are the runs' (the loss panel)."""
    from matplotlib.lines import Line2D

    if keys and ax.lines:
        handles = [Line2D([], [], color="black", linestyle=_STYLES[i % len(_STYLES)]) for i in range(len(keys))]
        ax.legend(handles, keys, fontsize="x-small")


def save_figure(fig: Any, out: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` (PNG, PDF or SVG by the suffix); the path written."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
