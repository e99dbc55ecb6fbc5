"""Sharded checkpoints: each rank saves the shards it owns, its optimizer state and the data position.

Layout: ``<dir>/step_<N>/rank_<r>.pt``, then ``manifest.json`` (every rank file with its size and
sha256, gathered by rank 0) and ``done``, written last by rank 0 after a barrier, so a checkpoint
interrupted mid-write is never picked for resuming. :func:`intact_checkpoints` lists the complete
checkpoints whose files are all there with their recorded sizes (a check before any model loads);
:func:`verify_rank_file` checks one rank's file against its checksum (each rank its own, at load).
A rank's file holds ``{"step", "world_size", "shards": {stable id: local tensor}, "optimizer":
optimizer.state_dict()}``. Only trainable tensors are saved: frozen ones come back from the base
model (with ``model.peft`` only the adapters are trainable, so a checkpoint holds nothing else).
Resuming needs the same world size and layout. The step log in the optimizer state
(``optimizer.state_dict()["zo"]["log"]``) makes the run replayable on any layout: an optimizer
built on the base weights with the same param groups applies it with ``ZOOptimizer.replay``
(bitwise with master weights; README, "Using the optimizer").
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zoscale.optim.base import ZOOptimizer

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "intact_checkpoints", "verify_rank_file",
           "CheckpointError"]

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a missing, truncated or corrupt file (named)."""


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _shards(optimizer: ZOOptimizer) -> dict[str, torch.Tensor]:
    return {e.stable_id: e.view.local for e in optimizer.shard_entries()}


def save_checkpoint(root: Path, step: int, optimizer: ZOOptimizer, rank: int, world_size: int, keep: int,
                    identity: dict[str, Any] | None = None) -> Path:
    """Write this rank's part of the checkpoint of ``step``; prune old ones (rank 0).

    ``identity`` (:func:`zoscale.train.run_folder.run_identity`) is recorded with it, so that a
    checkpoint copied into another run's folder is still recognised.
    """
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "world_size": world_size,
        "run": identity,
        "shards": {k: v.detach().clone() for k, v in _shards(optimizer).items()},
        "optimizer": optimizer.state_dict(),
    }
    tmp = path / f"rank_{rank:05d}.pt.tmp"
    torch.save(payload, tmp)
    final = path / f"rank_{rank:05d}.pt"
    tmp.rename(final)
    entries = _gather({"file": final.name, "bytes": final.stat().st_size, "sha256": _sha256(final)}, world_size)
    if rank == 0:
        (path / MANIFEST).write_text(json.dumps({"step": step, "world_size": world_size, "files": entries}, indent=1))
        (path / "done").write_text(str(step))
        done = sorted(p for p in root.glob("step_*") if (p / "done").exists())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world_size)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _gather(entry: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    if world_size == 1:
        return [entry]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, entry)
    return out


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``done`` written), or None."""
    done = sorted(p for p in root.glob("step_*") if (p / "done").exists())
    return done[-1] if done else None


def _manifest_problem(path: Path) -> str | None:
    """Why the checkpoint's files do not match its manifest (missing, truncated), or None."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is malformed ({e})"
    for entry in files:
        file = path / entry["file"]
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, the manifest records {entry['bytes']} (truncated?)"
    return None


def intact_checkpoints(root: Path) -> tuple[list[Path], list[str]]:
    """The complete checkpoints whose files match their manifest, newest first; and the problems
    of the complete ones that do not (one line each, naming the file)."""
    intact, problems = [], []
    for path in sorted((p for p in root.glob("step_*") if (p / "done").exists()), reverse=True):
        problem = _manifest_problem(path)
        if problem is None:
            intact.append(path)
        else:
            problems.append(problem)
    return intact, problems


def verify_rank_file(path: Path, rank: int) -> str | None:
    """Why this rank's file of the checkpoint is corrupt (its sha256 differs from the manifest), or None."""
    files = json.loads((path / MANIFEST).read_text())["files"]
    name = f"rank_{rank:05d}.pt"
    entry = next((e for e in files if e["file"] == name), None)
    if entry is None:
        return f"{path / MANIFEST} lists no {name}"
    if _sha256(path / name) != entry["sha256"]:
        return f"{path / name} is corrupt (its sha256 differs from the manifest's)"
    return None


def load_checkpoint(path: Path, optimizer: ZOOptimizer, rank: int, world_size: int,
                    identity: dict[str, Any] | None = None) -> int:
    """Restore this rank's shards and optimizer state; return the step to continue after.

    With ``identity``, a checkpoint that records another run's identity is refused.
    """
    file = path / f"rank_{rank:05d}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no file for rank {rank} ({file.name})")
    payload: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=False)
    recorded = payload.get("run")
    if identity is not None and recorded is not None and recorded != identity:
        differs = sorted(k for k in identity if recorded.get(k) != identity.get(k))
        raise ValueError(f"checkpoint {file} belongs to another run (it differs in {differs})")
    if payload["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {payload['world_size']} ranks, this run has {world_size}; "
            "resume with the same world size"
        )
    local = _shards(optimizer)
    missing = sorted(set(local) - set(payload["shards"]))
    extra = sorted(set(payload["shards"]) - set(local))
    if missing or extra:
        raise ValueError(f"checkpoint {file} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in local.items():
        saved = payload["shards"][name]
        if saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            raise ValueError(f"checkpoint {file}: {name} is {tuple(saved.shape)} {saved.dtype}, "
                             f"the model has {tuple(tensor.shape)} {tensor.dtype}")
    with torch.no_grad():
        for entry in optimizer.shard_entries():
            entry.view.local.copy_(payload["shards"][entry.stable_id])
            # Providers that mirror the local tensor elsewhere (a ZeRO-3 parameter kept whole by
            # the persistence threshold, e.g. a small PEFT adapter) must see the write.
            if entry.view.after_write is not None:
                entry.view.after_write()
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["step"])
