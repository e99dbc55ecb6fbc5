"""A run folder belongs to one run: its identity, recorded in ``run.json``, checked before a model loads.

The identity is what fixes a run's trajectory: a hash of the config without the settings that
only steer a run (``steps``, ``resume``, ``output_dir``, evaluation and checkpoint cadence), the
seed, a fingerprint of the training examples in order, and the world layout (engine, ranks).
``prepare_run_folder`` refuses, with one message saying what differs:

* resuming into a folder written by another run (another config, seed or data; another layout
  is allowed: the step log resumes on any engine and world size);
* resuming with ``steps`` below the step to resume (nothing to train, and the run is already
  past the end asked for);
* resuming a folder that holds neither a step log nor a complete checkpoint;
* a fresh run in a folder that holds checkpoints (its own config's or another's): they would be
  mixed and pruned; ``--resume`` continues them, ``--overwrite`` starts over (and deletes them).

It also picks what a resume starts from: the newest complete checkpoint whose files match its
manifest (on any engine and world size: ``zoscale.train.checkpoint``), then the step log
(``steps.jsonl``) replays every step after it; without a checkpoint, the log alone replays the
run from the base weights. On
resume, ``metrics.jsonl`` loses the records after the resumed step, so that each step is written
once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from zoscale.data.tasks import Example
from zoscale.train.checkpoint import LAYOUT_KEYS, intact_checkpoints, latest_checkpoint
from zoscale.train.config import TrainConfig
from zoscale.train.preemption import STOP_FILE
from zoscale.train.reporting import METRICS_FILE, TENSORBOARD_DIR, trim_metrics
from zoscale.train.step_log_file import read_step_log

__all__ = ["RunFolder", "prepare_run_folder", "run_identity", "STEP_LOG"]

#: The step log in a run folder.
STEP_LOG = "steps.jsonl"
#: Settings that steer a run without changing its trajectory, left out of the config hash.
STEERING = ("steps", "resume", "overwrite", "output_dir", "eval_every", "eval_batch_size", "checkpoint_every",
            "keep_checkpoints", "save_final", "report_to")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: TrainConfig, train: list[Example], engine: str, world_size: int) -> dict[str, Any]:
    """The run's identity: config hash, seed, training-data fingerprint, global batch, world layout.

    The per-rank split of the batch (``batch_size``, ``gradient_accumulation_steps``) is layout:
    the config hash leaves it out and the identity holds the global batch it makes, so a resume on
    another world size with the same global batch continues the same run.
    """
    split = ("seed", "batch_size", "gradient_accumulation_steps")
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in STEERING and k not in split}
    config["data"] = {k: v for k, v in config["data"].items() if k != "predictions"}
    data = [(ex.prompt, ex.candidates, ex.correct, ex.answers) for ex in train]
    return {"config_hash": _digest(config), "seed": cfg.seed, "data_fingerprint": _digest(data),
            "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * world_size,
            "engine": engine, "world_size": world_size}


@dataclasses.dataclass
class RunFolder:
    """What the checks found: the checkpoint to load (or None), the step log to replay after it
    (or None), and the step the run resumes at (0: a fresh run)."""

    path: Path
    identity: dict[str, Any]
    checkpoint: Path | None
    step: int
    log: Path | None = None
    checkpoint_step: int = 0
    #: Older intact checkpoints, newest first: where a resume falls back to when
    #: a file of ``checkpoint`` turns out corrupt at load.
    fallbacks: list[Path] = dataclasses.field(default_factory=list)


def _differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in new
            if k not in ignore and old.get(k) != new.get(k)]


def _checkpoint_step(path: Path) -> int:
    return int((path / "done").read_text().strip() or path.name.split("_")[-1])


def prepare_run_folder(cfg: TrainConfig, identity: dict[str, Any]) -> RunFolder:
    """Check ``cfg.output_dir`` against this run (see the module docstring); rank 0 may then write.

    Raises:
        ValueError: the folder belongs to another run, ``steps`` is below the checkpoint, or a
            fresh run would mix with checkpoints already there.
        FileNotFoundError: ``resume`` without a complete checkpoint.
    """
    out = Path(cfg.output_dir)
    root = out / "checkpoints"
    if cfg.overwrite:
        return RunFolder(out, identity, None, 0)
    recorded = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else None
    latest = latest_checkpoint(root)
    log = out / STEP_LOG if (out / STEP_LOG).is_file() else None
    ignore = LAYOUT_KEYS if cfg.resume else ()
    if recorded is not None and (latest is not None or log is not None or cfg.resume) and \
            _differences(recorded, identity, ignore):
        raise ValueError(f"{out} belongs to another run ({'; '.join(_differences(recorded, identity, ignore))}): use "
                         "another --output_dir, or --overwrite to start over there")
    if not cfg.resume:
        if latest is not None or log is not None:
            what = f"checkpoints up to step {_checkpoint_step(latest)}" if latest is not None else f"a step log ({log})"
            raise ValueError(f"{out} holds {what}: pass --resume to continue them, or --overwrite to start over "
                             "(deletes them)")
        return RunFolder(out, identity, None, 0)
    if latest is None and log is None:
        raise FileNotFoundError(f"resume requested but {out} holds neither a step log ({STEP_LOG}) nor a complete "
                                f"checkpoint under {root}")
    intact, problems = intact_checkpoints(root)
    for problem in problems:  # a checkpoint cut short or damaged: the next older one, and the log, instead
        print(f"[zoscale] skipping a checkpoint: {problem}", file=sys.stderr, flush=True)
    if latest is not None and not intact and log is None:
        raise FileNotFoundError(f"resume requested but no checkpoint under {root} is intact ({'; '.join(problems)}) "
                                "and there is no step log")
    checkpoint = intact[0] if intact else None
    checkpoint_step = _checkpoint_step(checkpoint) if checkpoint is not None else 0
    logged = read_step_log(log)[1] if log is not None else []
    step = max(checkpoint_step, logged[-1][0] if logged else 0)
    if cfg.steps < step:
        raise ValueError(f"--steps {cfg.steps} is below the step to resume ({step}, from "
                         f"{checkpoint or log})")
    return RunFolder(out, identity, checkpoint, step, log, checkpoint_step, intact[1:])


def write_run_folder(folder: RunFolder) -> None:
    """Rank 0: clear an overwritten folder, record the identity, trim ``metrics.jsonl`` on resume."""
    out = folder.path
    out.mkdir(parents=True, exist_ok=True)
    resumed = folder.checkpoint is not None or folder.log is not None
    if not resumed:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
        (out / STEP_LOG).unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)  # the event files of the run started over
    (out / STOP_FILE).unlink(missing_ok=True)  # a stop request left over from an earlier run
    (out / "run.json").write_text(json.dumps(folder.identity, indent=2))
    if resumed:
        trim_metrics(out / METRICS_FILE, folder.step)
