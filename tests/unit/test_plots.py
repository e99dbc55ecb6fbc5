"""Plots of runs from metrics.jsonl (zoscale.plots, launch/plot.py; issue 14, item 3): one line per
run per panel, drawn from the records' values; a PNG from the command; errors that name the line."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from zoscale.plots import PANELS, MetricsError, eval_keys, plot_runs, read_metrics, timing_keys

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ["step_s", "perturb_s", "forward_s", "update_s"]


def _run(folder: Path, steps: int, scale: float, metrics: tuple[str, ...] = ("accuracy",),
         timestamps: bool = True) -> Path:
    """A metrics.jsonl as the trainer writes it: eval at 0, steps with eval every 2, a checkpoint, the end."""
    folder.mkdir(parents=True)
    t, rows = 1.7e9, []

    def stamp(row: dict) -> dict:
        nonlocal t
        t += 0.5 * scale
        return {**row, "time": t, "elapsed_s": t - 1.7e9} if timestamps else row

    rows.append(stamp({"step": 0, **{f"eval_{m}": 0.5 * scale for m in metrics}, "eval_truncated": 0,
                       "train_truncated": 0}))
    for s in range(1, steps + 1):
        row = {"step": s, "loss": scale / s, "projected_grad": (-1) ** s * s, "lr": 1e-3 * scale / s,
               **{k: 0.01 * (i + 1) * scale + 0.001 * s for i, k in enumerate(TIMINGS)},
               "examples_per_s": 100.0 * s, "peak_memory_mb": 400.0}
        if s % 2 == 0 and s != steps:
            row.update({f"eval_{m}": 0.5 * scale + 0.01 * s for m in metrics}, eval_truncated=0)
        rows.append(stamp(row))
        if s == 2:
            rows.append(stamp({"step": s, "checkpoint_s": 9.0, "checkpoint_bytes": 1000}))
    rows.append(stamp({"step": steps, **{f"eval_{m}": 0.9 * scale for m in metrics}, "eval_truncated": 0}))
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _panel(fig, row: int, title: str):
    axes = [ax for ax in fig.axes if ax.get_title() == title]
    assert len(axes) in (1, 2), title
    return axes[row]


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_each_panel_draws_one_line_per_run_from_the_records(tmp_path: Path) -> None:
    a = _run(tmp_path / "alpha", 6, 1.0, metrics=("f1", "em"))
    b = _run(tmp_path / "beta", 4, 2.0, metrics=("f1", "em"))
    fig = plot_runs([a, tmp_path / "beta"], x="both")  # a file and a folder
    assert len(fig.axes) == 2 * len(PANELS)
    for row, xkey in ((0, "step"), (1, "elapsed_s")):
        for path, label in ((a, "alpha"), (b, "beta")):
            records = read_metrics(path)
            steps = [r for r in records if "loss" in r]
            for title, key in (("loss", "loss"), ("lr", "lr")):
                lines = _lines(_panel(fig, row, title))
                assert sorted(lines) == ["alpha", "beta"], title
                assert lines[label] == ([r[xkey] for r in steps], [r[key] for r in steps]), (title, row)
            held = _lines(_panel(fig, row, "held-out"))
            assert sorted(held) == ["alpha eval_em", "alpha eval_f1", "beta eval_em", "beta eval_f1"]
            evals = [r for r in records if "eval_f1" in r]
            assert held[f"{label} eval_f1"] == ([r[xkey] for r in evals], [r["eval_f1"] for r in evals])
            assert held[f"{label} eval_f1"][0][0] == records[0][xkey]  # the evaluation before training
            timing = _lines(_panel(fig, row, "step time"))
            # The per-step timings only: not the rate (examples_per_s), the clock or a checkpoint's seconds.
            assert sorted(timing) == sorted(f"{run} {k}" for run in ("alpha", "beta") for k in TIMINGS)
            for k in TIMINGS:
                assert timing[f"{label} {k}"] == ([r[xkey] for r in steps], [r[k] for r in steps]), k
    colours = {line.get_label(): line.get_color() for line in _panel(fig, 0, "loss").lines}
    assert colours["alpha"] != colours["beta"]
    timing_colours = {line.get_label().split()[0]: line.get_color() for line in _panel(fig, 0, "step time").lines}
    assert timing_colours == colours  # a run keeps its colour across panels
    assert _panel(fig, 1, "loss").get_xlabel() == "elapsed (s)" and _panel(fig, 0, "loss").get_xlabel() == "step"


def test_one_row_against_step_or_time(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", 4, 1.0)
    for x, xkey in (("step", "step"), ("time", "elapsed_s")):
        fig = plot_runs([a], x=x)
        assert len(fig.axes) == len(PANELS)
        steps = [r for r in read_metrics(a) if "loss" in r]
        assert _lines(_panel(fig, 0, "loss"))["a"][0] == [r[xkey] for r in steps]
    with pytest.raises(ValueError, match="x must be one of"):
        plot_runs([a], x="wall")


def test_runs_without_timestamps_are_left_out_of_the_time_row(tmp_path: Path) -> None:
    old = _run(tmp_path / "old", 4, 1.0, timestamps=False)
    new = _run(tmp_path / "new", 4, 1.0)
    with pytest.warns(UserWarning, match="old.*no 'elapsed_s'"):
        fig = plot_runs([old, new])
    assert sorted(_lines(_panel(fig, 0, "loss"))) == ["new", "old"]
    assert sorted(_lines(_panel(fig, 1, "loss"))) == ["new"]


def test_key_discovery(tmp_path: Path) -> None:
    from zoscale.plots import load_run

    run = load_run(_run(tmp_path / "r", 4, 1.0, metrics=("accuracy",)))
    assert timing_keys([run]) == TIMINGS and eval_keys([run]) == ["eval_accuracy"]
    assert run.label == "r" and len(run.steps) == 4


def test_same_folder_names_get_their_paths_as_labels(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "x" / "run", 3, 1.0), _run(tmp_path / "y" / "run", 3, 2.0)
    labels = sorted(_lines(_panel(plot_runs([a, b], x="step"), 0, "loss")))
    assert labels == [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_command_writes_a_png(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a", 8, 1.0), _run(tmp_path / "b", 8, 1.5)
    out = tmp_path / "figs" / "compare.png"
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(a), str(tmp_path / "b"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    width, height = _png_size(out)
    assert width > 1500 and height > 600 and out.stat().st_size > 20_000  # two rows of four panels, drawn
    single = tmp_path / "one.png"
    assert _plot_main([str(a), "--x", "step", "--out", str(single)]) == 0
    w1, h1 = _png_size(single)
    assert w1 == width and h1 < height * 0.6  # one row


def _plot_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("plot_cli", ROOT / "launch" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("content, message", [
    (None, "metrics file not found: {path}"),
    ("", "{path}: no records"),
    ("\n\n", "{path}: no records"),
    ('{"step": 0, "loss": 1}\n{"step": 1, "loss": \n{"step": 2}\n', "{path}:2: not valid JSON"),
    ('{"step": 0}\n[1, 2]\n', "{path}:2: a record must be a JSON object, got list"),
    ('{"step": 0}\n\n{"loss": 1}\n', "{path}:3: a record without a numeric 'step'"),
])
def test_bad_files_exit_2_naming_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   content: str | None, message: str) -> None:
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MetricsError, match="^" + message.format(path=path).replace("[", r"\[")):
        read_metrics(path)
    with pytest.raises(SystemExit) as exit_:
        _plot_main([str(path), "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(path=path)) and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_the_command_names_a_malformed_line_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "run" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"step": 0, "eval_accuracy": 0.5}\n{"step": 1, "loss": 0.7\n{"step": 2, "loss": 0.6}\n')
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(tmp_path / "run"), "--out",
                           str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {bad}:2: not valid JSON") and "Traceback" not in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MetricsError, match="a folder without metrics.jsonl"):
        read_metrics(empty)


def test_an_unfinished_last_line_of_a_live_run_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_accuracy": 0.5}\n{"step": 1, "loss": 0.7}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match=r":3: an incomplete last line"):
        assert [r["step"] for r in read_metrics(path)] == [0, 1]
    path.write_text('{"step": 0}\n{"step": 1, "lo\n')  # with its newline: a malformed record, not a live one
    with pytest.raises(MetricsError, match=":2: not valid JSON"):
        read_metrics(path)


def test_a_real_runs_metrics_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's own metrics.jsonl: the plot's loss and step-time lines are its records'."""
    from zoscale.train import load_config, train

    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"sentence": f"a film {i}", "label": i % 2}) + "\n" for i in range(24)))
    train(load_config(None, ["model.name=tiny-llama", f"data.path={data}", "data.n_train=16", "data.n_eval=4",
                             'data.label_words=[" bad", " good"]', "batch_size=4", "steps=3", "eval_every=2",
                             "save_final=false", f"output_dir={tmp_path / 'real'}"]), progress=False)
    records = read_metrics(tmp_path / "real")
    steps = [r for r in records if "loss" in r]
    fig = plot_runs([tmp_path / "real"])
    assert _lines(_panel(fig, 1, "loss"))["real"] == ([r["elapsed_s"] for r in steps], [r["loss"] for r in steps])
    timing = _lines(_panel(fig, 0, "step time"))
    assert {"real step_s", "real forward_s", "real perturb_s", "real update_s"} <= set(timing)
    assert not {k for k in timing if "examples_per_s" in k or "elapsed_s" in k}
    assert [s for s in _lines(_panel(fig, 0, "held-out"))["real eval_accuracy"][0]] == [0, 2, 3]
