"""The step log file (issue 12): append-only, one line per step, a torn last line dropped, every
problem named with the file and line; a log of other base weights or noise refused on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_run_folder import _cfg as run_folder_cfg
from zoscale.train.step_log_file import StepLogError, StepLogWriter, read_step_log
from zoscale.train.trainer import train


def _records(step: int) -> list[dict]:
    return [{"seed": 0, "step": step - 1, "query": 0, "grad": [0.5], "lr": [1e-3], "loss": [1.0, 0.9]}]


def test_steps_are_appended_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    writer = StepLogWriter(path, {"noise": "gaussian"})
    for step in (1, 2, 3):
        writer.append(step, _records(step))
    writer.close()
    with path.open("a") as f:
        f.write('{"step": 4, "records": [{"seed": 0, "st')  # killed mid-write
    header, steps = read_step_log(path)
    assert header["noise"] == "gaussian" and [s for s, _ in steps] == [1, 2, 3]
    assert steps[1][1] == _records(2)
    writer = StepLogWriter(path)  # a resume at step 2 cuts the log there, torn tail included
    writer.truncate_after(2)
    writer.append(3, _records(3))
    writer.close()
    assert [s for s, _ in read_step_log(path)[1]] == [1, 2, 3]
    assert path.read_text().endswith("\n")


@pytest.mark.parametrize("text,match", [
    ("", "no complete header line"),
    ('{"format": "zoscale.steplog", "version": 9}\n', "version 9"),
    ('{"format": "zoscale.steplog", "version": 1}\n{"step": 1, "records": []}\nnot json\n{"step": 3, "records": []}\n',
     "line 3 is not JSON"),
    ('{"format": "zoscale.steplog", "version": 1}\n{"step": 1, "records": []}\n{"step": 3, "records": []}\n',
     "line 3: expected step 2"),
])
def test_a_malformed_log_is_refused_naming_the_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text(text)
    with pytest.raises(StepLogError, match=match):
        read_step_log(path)
    with pytest.raises(StepLogError, match="no step log"):
        read_step_log(tmp_path / "missing.jsonl")


def _cfg(tmp: Path, *extra: str):
    return run_folder_cfg(tmp, "optimizer.params.lr=0.01", *extra)


def _edit_header(path: Path, **changes: object) -> None:
    lines = path.read_text().split("\n")
    lines[0] = json.dumps({**json.loads(lines[0]), **changes})
    path.write_text("\n".join(lines))


def test_a_log_of_other_base_weights_or_noise_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    train(_cfg(tmp_path, "steps=2"), progress=False)
    log = tmp_path / "run" / "steps.jsonl"
    header, steps = read_step_log(log)
    assert [s for s, _ in steps] == [1, 2] and header["noise"] == "gaussian" and header["base"]
    original = log.read_text()
    name = sorted(header["base"])[0]
    _edit_header(log, base={**header["base"], name: header["base"][name] + 1.0})
    with pytest.raises(StepLogError, match=f"other base weights: the fingerprints of 1 tensors differ .*{name}"):
        train(_cfg(tmp_path, "steps=3", "resume=true"), progress=False)
    log.write_text(original)
    _edit_header(log, noise="rademacher")
    with pytest.raises(StepLogError, match="written with noise 'rademacher'; this run's optimizer uses 'gaussian'"):
        train(_cfg(tmp_path, "steps=3", "resume=true"), progress=False)
