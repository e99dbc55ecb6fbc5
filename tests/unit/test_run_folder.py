"""A run folder belongs to one run (issue 12, item 5), tried as a new user did.

Before: a second run started in a used --output_dir had its checkpoints pruned as soon as written
(the old run's had higher step numbers), and ``--resume --steps 40`` loaded another run's step-60
checkpoint, trained 0 steps and exited 0. Each case below stops with one error, before any model
loads (``load_model`` is replaced by a function that fails the test if called).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


import zoscale.train.trainer as trainer
from zoscale.train.config import load_config
from zoscale.train.trainer import train


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _cfg(tmp: Path, *extra: str):
    data = tmp / "toy.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"sentence": f"a film {i}", "label": i % 2}) + "\n" for i in range(40)))
    return load_config(None, ["model.name=tiny-llama", f"data.path={data}", "data.n_train=24", "data.n_eval=8",
                              'data.label_words=[" bad", " good"]', "batch_size=4", "eval_every=0",
                              f"output_dir={tmp / 'run'}", "save_final=false", *extra])


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> None:
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(trainer, "load_model", fail)


def _steps(tmp: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (tmp / "run" / "metrics.jsonl").open() if '"loss"' in line]


def test_resuming_another_runs_folder_is_refused_naming_what_differs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    train(_cfg(tmp_path, "steps=4", "checkpoint_every=2"), progress=False)
    _no_model(monkeypatch)
    with pytest.raises(ValueError, match=r"belongs to another run \(.*seed: 0 there, 1 here"):
        train(_cfg(tmp_path, "steps=8", "resume=true", "seed=1"), progress=False)
    with pytest.raises(ValueError, match="belongs to another run .*config_hash"):
        train(_cfg(tmp_path, "steps=8", "resume=true", "optimizer.params.lr=0.5"), progress=False)


def test_steps_below_the_checkpoint_and_a_missing_checkpoint_are_refused(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _no_model(monkeypatch)
    with pytest.raises(FileNotFoundError, match="neither a step log .* nor a complete checkpoint"):
        train(_cfg(tmp_path, "steps=2", "resume=true"), progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    train(_cfg(tmp_path, "steps=6", "checkpoint_every=3"), progress=False)
    _no_model(monkeypatch)
    with pytest.raises(ValueError, match=r"--steps 4 is below the step to resume \(6, from .*step_00000006"):
        train(_cfg(tmp_path, "steps=4", "resume=true"), progress=False)


def test_a_fresh_run_in_a_folder_with_checkpoints_needs_resume_or_overwrite(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    train(_cfg(tmp_path, "steps=4", "checkpoint_every=2"), progress=False)
    with monkeypatch.context() as m:
        _no_model(m)
        with pytest.raises(ValueError, match="holds checkpoints up to step 4: pass --resume .* or --overwrite"):
            train(_cfg(tmp_path, "steps=4", "checkpoint_every=2"), progress=False)  # the same command again
    summary = train(_cfg(tmp_path, "steps=2", "checkpoint_every=1", "seed=3", "overwrite=true"), progress=False)
    assert summary["start_step"] == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [
        "step_00000001", "step_00000002"]  # the old run's step 4 did not survive to prune these
    assert json.loads((tmp_path / "run" / "run.json").read_text())["seed"] == 3
    assert _steps(tmp_path) == [1, 2]


def test_a_resumed_run_writes_each_step_once_and_says_where_it_resumed(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "steps=6", "checkpoint_every=2", "keep_checkpoints=3"), progress=False)
    # As if killed after step 6 was logged but before its checkpoint was complete: the newest
    # complete checkpoint (step 4) and the step log's steps 5 and 6 resume it at step 6.
    (tmp_path / "run" / "checkpoints" / "step_00000006" / "done").unlink()
    summary = train(_cfg(tmp_path, "steps=8", "checkpoint_every=2", "keep_checkpoints=3", "resume=true"),
                    progress=False)
    assert summary["start_step"] == 6
    assert summary["resumed_from"].endswith("step_00000004 + " + str(tmp_path / "run" / "steps.jsonl"))
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_checkpoint_records_its_run_and_is_refused_in_another(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "steps=2", "checkpoint_every=2"), progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["run"] == json.loads((tmp_path / "run" / "run.json").read_text())
    manifest["run"] = {**manifest["run"], "data_fingerprint": "0" * 16}  # copied in from another run
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"step_00000002 belongs to another run \(it differs in \['data_fingerprint'\]"):
        train(_cfg(tmp_path, "steps=4", "resume=true"), progress=False)
