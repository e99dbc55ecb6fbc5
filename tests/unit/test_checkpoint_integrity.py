"""Damaged checkpoints (issue 12): every file is in a manifest with its size and sha256; a
truncated or corrupt newest checkpoint is skipped, saying so, and the run resumes from the newest
intact one plus the step log: the same run as uninterrupted, bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_run_folder import _cfg
from zoscale.train.checkpoint import CheckpointError, intact_checkpoints, verify_files
from zoscale.train.trainer import train


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r}


def _final(run: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(run / "final").named_parameters())


def _data_file(path: Path) -> Path:
    """The checkpoint's (one process's) DCP data file: the tensors."""
    (file,) = path.glob("*.distcp")
    return file


def _reference(tmp: Path) -> Path:
    ref = tmp / "ref"
    ref.mkdir()
    train(_cfg(ref, "steps=8", "save_final=true"), progress=False)
    return ref / "run"


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path: Path, damage: str,
                                                                          capsys: pytest.CaptureFixture) -> None:
    train(_cfg(tmp_path, "steps=6", "checkpoint_every=2", "keep_checkpoints=3"), progress=False)
    root = tmp_path / "run" / "checkpoints"
    newest = _data_file(root / "step_00000006")
    manifest = json.loads((root / "step_00000006" / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["file"] == newest.name)
    assert entry["bytes"] == newest.stat().st_size and len(entry["sha256"]) == 64
    assert {e["file"] for e in manifest["files"]} == {newest.name, ".metadata"}
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":  # same size, other bytes: only the checksum tells
        newest.write_bytes(data[:-64] + bytes(64))
    else:
        newest.unlink()
    capsys.readouterr()
    summary = train(_cfg(tmp_path, "steps=8", "checkpoint_every=2", "keep_checkpoints=3", "resume=true",
                         "save_final=true"), progress=False)
    err = capsys.readouterr().err
    said = {"truncate": "has .* bytes, the manifest records", "corrupt": "is corrupt .*falling back|falling back",
            "delete": f"{newest.name} is missing"}[damage]
    assert re.search(said, err), err[-2000:]
    assert summary["start_step"] == 6 and "step_00000004" in summary["resumed_from"]
    ref = _reference(tmp_path)
    assert _losses(tmp_path / "run") == _losses(ref)
    want = _final(ref)
    for name, p in _final(tmp_path / "run").items():
        assert torch.equal(p, want[name]), name


def test_the_checks_name_the_file(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "steps=2", "checkpoint_every=1", "keep_checkpoints=2"), progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in intact_checkpoints(root)[0]] == ["step_00000002", "step_00000001"]
    file = _data_file(root / "step_00000002")
    file.write_bytes(file.read_bytes()[:100])
    intact, problems = intact_checkpoints(root)
    assert [p.name for p in intact] == ["step_00000001"] and str(file) in problems[0]
    assert verify_files(root / "step_00000001", 0, 1) is None
    older = _data_file(root / "step_00000001")
    older.write_bytes(b"x" * older.stat().st_size)
    assert f"{older} is corrupt" in verify_files(root / "step_00000001", 0, 1)
    (tmp_path / "run" / "steps.jsonl").unlink()  # nothing left to resume from
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged and there is no step log"):
        train(_cfg(tmp_path, "steps=3", "resume=true"), progress=False)


def test_metrics_record_each_checkpoints_bytes_and_seconds(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "steps=2", "checkpoint_every=2"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    row = next(r for r in rows if "checkpoint_bytes" in r)
    size = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints" / "step_00000002").iterdir())
    assert row["step"] == 2 and row["checkpoint_bytes"] == size and row["checkpoint_s"] > 0


# Trains with a checkpoint every step and is SIGKILLed while the step-2 checkpoint is being written
# (its data files written, DCP's .metadata, the manifest and `done` not yet).
_KILLED_IN_SAVE = """
import os, signal, sys
from pathlib import Path
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from tests.unit.test_run_folder import _cfg
from zoscale.train.trainer import train

write = FileSystemWriter.write_data

def write_then_die(self, plan, planner):
    written = write(self, plan, planner)
    if "step_00000002" in str(self.path):
        written.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return written

FileSystemWriter.write_data = write_then_die
train(_cfg(Path(sys.argv[1]), "steps=3", "checkpoint_every=1", "keep_checkpoints=3"), progress=False)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_the_one_resumed(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ZOSCALE_NOISE_BACKEND": "eager", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", _KILLED_IN_SAVE, str(tmp_path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    cut = checkpoints / "step_00000002"
    assert list(cut.glob("*.distcp")) and not (cut / "done").exists()  # killed in the middle of it
    summary = train(_cfg(tmp_path, "steps=4", "checkpoint_every=1", "keep_checkpoints=3", "resume=true",
                         "save_final=true"), progress=False)
    # The complete step-1 checkpoint, then step 2 from the log (logged before its checkpoint began).
    assert summary["start_step"] == 2 and "step_00000001 + " in summary["resumed_from"], summary
    assert not cut.exists()  # the cut-short save is deleted at the next checkpoint
    (tmp_path / "ref").mkdir()
    train(_cfg(tmp_path / "ref", "steps=4", "save_final=true"), progress=False)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref" / "run")
    want = _final(tmp_path / "ref" / "run")
    for name, p in _final(tmp_path / "run").items():
        assert torch.equal(p, want[name]), name
