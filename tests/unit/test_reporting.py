"""Metrics records carry timestamps; ``report_to=tensorboard`` writes the same scalars as event files
(issue 14, item 3): a real tiny trainer run, interrupted and resumed, read back both ways."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoscale.train import load_config, train
from zoscale.train.reporting import REPORT_TO, Reporter, scalar_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _cfg(tmp: Path, out: str, *extra: str):
    data = tmp / "toy.jsonl"
    if not data.is_file():
        words = {1: ["great", "lovely"], 0: ["awful", "dull"]}
        data.write_text("".join(json.dumps({"sentence": f"a {words[i % 2][i % 4 // 2]} film {i}", "label": i % 2})
                                + "\n" for i in range(40)))
    return load_config(None, ["model.name=tiny-llama", "model.trainable=all", f"data.path={data}", "data.n_train=24",
                              "data.n_eval=8", 'data.label_words=[" bad", " good"]', "batch_size=4", "eval_every=3",
                              "optimizer.params.lr=0.001", "save_final=false", f"output_dir={tmp / out}", *extra])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list[dict], float, float]:
    """6 steps with a checkpoint at 4, its step log cut after step 5 (as if killed between the
    metrics record of step 6 and its log line), resumed to 9; TensorBoard on; the records of both."""
    import os

    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"  # module scope: the autouse fixture has not run yet
    tmp = tmp_path_factory.mktemp("reporting")
    t0 = time.time()
    train(_cfg(tmp, "run", "steps=6", "checkpoint_every=4", "report_to=tensorboard"), progress=False)
    first = _rows(tmp / "run")
    log = tmp / "run" / "steps.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["step"] == 6
    log.write_text("".join(lines[:-1]))  # the run resumes at step 5 and redoes step 6
    time.sleep(0.3)  # the second session starts visibly later
    t1 = time.time()
    train(_cfg(tmp, "run", "steps=9", "checkpoint_every=4", "report_to=tensorboard", "resume=true"), progress=False)
    return tmp / "run", first, _rows(tmp / "run"), t0, t1


def test_every_record_has_a_wall_clock_time_and_elapsed_seconds(resumed_run) -> None:
    run, first, rows, t0, t1 = resumed_run
    kinds = {"step": [r for r in first if "loss" in r], "checkpoint": [r for r in first if "checkpoint_s" in r],
             "eval": [r for r in first if "eval_accuracy" in r and "loss" not in r]}
    assert all(kinds.values()), kinds  # step, checkpoint, the evaluations before and after
    for r in first:
        assert isinstance(r["time"], float) and isinstance(r["elapsed_s"], float), r
        assert t0 <= r["time"] <= t1 and 0 <= r["elapsed_s"] <= t1 - t0, r
    # One clock per session: time - elapsed_s is the session's start, the same for every record.
    starts = [r["time"] - r["elapsed_s"] for r in first]
    assert max(starts) - min(starts) < 1e-3 and t0 <= starts[0]
    for key in ("time", "elapsed_s"):
        values = [r[key] for r in first]
        assert values == sorted(values) and len(set(values)) == len(values), key


def test_elapsed_continues_from_the_last_kept_record_on_resume(resumed_run) -> None:
    run, first, rows, t0, t1 = resumed_run
    kept = [r for r in first if r["step"] < 5 or (r["step"] == 5 and "loss" in r)]  # run_folder's trim
    assert rows[:len(kept)] == kept and kept[-1]["step"] == 5
    later = rows[len(kept):]
    assert [r["step"] for r in later if "loss" in r] == [6, 7, 8, 9] and later[0]["step"] == 5  # eval redone at 5
    for key in ("time", "elapsed_s"):
        values = [r[key] for r in rows]
        assert values == sorted(values), key
    assert all(r["time"] >= t1 for r in later)
    # The second session's clock starts where the kept records stop, not at 0 ...
    assert later[0]["elapsed_s"] > kept[-1]["elapsed_s"]
    # ... and counts its own seconds on top: its time - elapsed_s is constant, and is not the first's.
    offsets = [r["time"] - r["elapsed_s"] for r in later]
    assert max(offsets) - min(offsets) < 1e-3
    assert offsets[0] - (first[0]["time"] - first[0]["elapsed_s"]) > 0.3
    assert later[-1]["elapsed_s"] - kept[-1]["elapsed_s"] < later[-1]["time"] - kept[-1]["time"]


def test_tensorboard_events_hold_the_metrics_records(resumed_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, first, rows, t0, t1 = resumed_run
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one file per session
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    steps = [r for r in rows if "loss" in r]
    assert {"train/loss", "train/projected_grad", "train/lr", "train/step_s", "train/perturb_s", "train/forward_s",
            "train/examples_per_s", "eval/accuracy", "checkpoint/s", "checkpoint/bytes"} <= tags
    assert not {t for t in tags if t.endswith(("/time", "/elapsed_s", "/step"))}  # the axes are not scalars
    for key in ("loss", "projected_grad", "lr", "step_s", "forward_s"):
        got = {e.step: e.value for e in acc.Scalars(f"train/{key}")}
        # Steps 1-9 once each, as in metrics.jsonl: the first session's step 6 is hidden (purge_step).
        assert [e.step for e in acc.Scalars(f"train/{key}")] == list(range(1, 10)), key
        assert got == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in steps}, key
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    logged = [(e.step, e.value) for e in acc.Scalars("eval/accuracy")]
    assert [s for s, _ in logged] == [s for s, _ in evals] == [0, 3, 5, 6, 9]  # the first session's 6 purged
    assert [v for _, v in logged] == pytest.approx([v for _, v in evals], rel=1e-6)
    loss = acc.Scalars("train/loss")
    assert [e.wall_time for e in loss] == pytest.approx([r["time"] for r in steps], abs=1e-3)


def test_the_default_report_writes_metrics_jsonl_only(tmp_path: Path) -> None:
    assert load_config(None, []).report_to == "jsonl"
    train(_cfg(tmp_path, "plain", "steps=1", "eval_every=0"), progress=False)
    rows = _rows(tmp_path / "plain")
    assert [r["step"] for r in rows] == [0, 1, 1] and all("time" in r and "elapsed_s" in r for r in rows)
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_an_overwritten_run_drops_the_old_event_files(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "run", "steps=1", "eval_every=0", "report_to=tensorboard"), progress=False)
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    train(_cfg(tmp_path, "run", "steps=1", "eval_every=0", "overwrite=true"), progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("value", ["wandb", "TensorBoard", "", ["tensorboard"], 1])
def test_an_unknown_report_to_is_named_with_the_allowed_values(value) -> None:
    with pytest.raises(ValueError, match=r"config key 'report_to' must be one of \['jsonl', 'none', 'tensorboard'\]"):
        load_config(None, [f"report_to={json.dumps(value)}"])
    for ok in REPORT_TO:
        assert load_config(None, [f"report_to={ok}"]).report_to == ok


def test_tensorboard_without_the_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ValueError, match=r"'report_to' is 'tensorboard' but the 'tensorboard' package is not "
                                         r"installed \(pip install tensorboard\)"):
        load_config(None, ["report_to=tensorboard"])
    assert load_config(None, ["report_to=jsonl"]).report_to == "jsonl"


def test_the_cli_flag_reaches_the_config_and_a_bad_value_exits_2() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--report_to", "wandb",
                          "--model", "/nonexistent/model"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "config key 'report_to' must be one of" in out.stderr and "wandb" in out.stderr
    assert "Traceback" not in out.stderr


def test_scalar_names() -> None:
    assert [scalar_name(k) for k in ("loss", "step_s", "eval_accuracy", "eval_f1", "dev_em", "train_truncated",
                                     "checkpoint_bytes", "examples_per_s")] == [
        "train/loss", "train/step_s", "eval/accuracy", "eval/f1", "dev/em", "train/truncated", "checkpoint/bytes",
        "train/examples_per_s"]


def test_a_reporter_stamps_and_returns_each_record(tmp_path: Path) -> None:
    reporter = Reporter(tmp_path, "none", started=time.time() - 5.0)
    stamped = reporter.record({"step": 1, "loss": 0.5})
    reporter.close()
    assert stamped["loss"] == 0.5 and 5.0 <= stamped["elapsed_s"] < 60 and abs(stamped["time"] - time.time()) < 60
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == stamped
    resumed = Reporter(tmp_path, "jsonl", start_step=1)  # the clock goes on from the last record's elapsed_s
    assert resumed.record({"step": 2, "loss": 0.4})["elapsed_s"] >= stamped["elapsed_s"]
    resumed.close()
    fresh = Reporter(tmp_path, "jsonl")  # a fresh run (start_step 0) starts its clock at 0
    assert fresh.record({"step": 0})["elapsed_s"] < 5.0
    fresh.close()
