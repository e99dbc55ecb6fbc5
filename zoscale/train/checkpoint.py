"""Full checkpoints through ``torch.distributed.checkpoint`` (DCP), loadable on any layout.

Layout: ``<dir>/step_<N>/``: DCP's files (``*.distcp`` and ``.metadata``: every rank writes the
chunks it owns at their global place, :mod:`zoscale.train.dcp_state`), then ``manifest.json``
(every file with its size and sha256; the ranks hash the files between them, rank 0 writes it,
with the step, the writing layout and the run's identity) and ``done``, written last by rank 0
after a barrier, so a checkpoint interrupted mid-write is never picked for resuming.
:func:`intact_checkpoints` lists the complete checkpoints whose files are all there with their
recorded sizes (a check before any model loads); :func:`verify_files` checks this rank's share of
the files against their checksums (collective use: ``zoscale.train.resume``).

Only trainable tensors are saved: frozen ones come back from the base model (with ``model.peft``
only the adapters are trainable, so a checkpoint holds nothing else). A checkpoint written by
ZeRO-3 on 2 ranks loads on FSDP2 on 4, or on one process: each rank reads the region of each
saved tensor that its own shard covers. The one exception is the hybrid's first-order
torch-optimizer state, which is per rank: it loads on the same world size only. The optimizer
state holds the step log (``optimizer.state_dict()["zo"]["log"]``) too: a resume loads the newest
checkpoint and replays the logged steps after it (``ZOOptimizer.replay``, ``zoscale.train.resume``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from zoscale.optim.base import ZOOptimizer
from zoscale.train.dcp_state import ChunkLoadPlanner, ChunkSavePlanner, assemble, loading_state, saved_state

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "intact_checkpoints", "verify_files",
           "CheckpointError", "LAYOUT_KEYS"]

MANIFEST = "manifest.json"
#: Identity keys a checkpoint may differ in from the run that loads it: it loads on any layout.
LAYOUT_KEYS = ("engine", "world_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a missing, truncated or corrupt file (named)."""


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _no_dist(world_size: int) -> bool:
    return world_size == 1 and not (dist.is_available() and dist.is_initialized())


def save_checkpoint(root: Path, step: int, optimizer: ZOOptimizer, rank: int, world_size: int, keep: int,
                    identity: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank its chunks); prune old ones (rank 0).

    ``identity`` (:func:`zoscale.train.run_folder.run_identity`) is recorded in the manifest, so
    that a checkpoint copied into another run's folder is still recognised.
    """
    path = root / f"step_{step:08d}"
    if rank == 0 and path.exists():  # a save of this step cut short earlier: start it over
        shutil.rmtree(path)
    _barrier(world_size)
    with warnings.catch_warnings():  # DCP warns that one process saves without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(saved_state(optimizer, rank), storage_writer=dcp.FileSystemWriter(str(path)),
                 planner=ChunkSavePlanner(), no_dist=_no_dist(world_size))
    _barrier(world_size)
    files = sorted(p.name for p in path.iterdir())
    mine = [{"file": f, "bytes": (path / f).stat().st_size, "sha256": _sha256(path / f)}
            for i, f in enumerate(files) if i % world_size == rank]
    entries = sorted((e for part in _gather(mine, world_size) for e in part), key=lambda e: e["file"])
    if rank == 0:
        manifest = {"step": step, "world_size": world_size, "run": identity, "files": entries}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (path / "done").write_text(str(step))
        _prune(root, path, keep)
    _barrier(world_size)
    return path


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; delete older ones and saves cut short before
    ``newest`` (no ``done``: never resumed from)."""
    done = sorted(p for p in root.glob("step_*") if (p / "done").exists())
    cut_short = [p for p in root.glob("step_*") if not (p / "done").exists() and p.name < newest.name]
    for old in [*done[:-keep], *cut_short]:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _gather(entry: Any, world_size: int) -> list[Any]:
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


def verify_files(path: Path, rank: int, world_size: int) -> str | None:
    """Why this rank's share of the checkpoint's files is corrupt (a sha256 differs from the
    manifest's), or None. The ranks split the files between them: call on every rank."""
    files = json.loads((path / MANIFEST).read_text())["files"]
    for entry in files[rank::world_size]:
        if _sha256(path / entry["file"]) != entry["sha256"]:
            return f"{path / entry['file']} is corrupt (its sha256 differs from the manifest's)"
    return None


def load_checkpoint(path: Path, optimizer: ZOOptimizer, rank: int, world_size: int,
                    identity: dict[str, Any] | None = None) -> int:
    """Restore the shards and optimizer state onto this rank's layout (collective); return the
    step to continue after.

    With ``identity``, a checkpoint that records another run's identity (other than its layout)
    is refused; so is one whose tensors do not fit the model, before any parameter is written.
    """
    manifest = json.loads((path / MANIFEST).read_text())
    recorded = manifest.get("run")
    if identity is not None and recorded is not None:
        differs = sorted(k for k in identity if k not in LAYOUT_KEYS and recorded.get(k) != identity.get(k))
        if differs:
            raise ValueError(f"checkpoint {path} belongs to another run (it differs in {differs})")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    own = any(key.startswith("rank/") for key in metadata.state_dict_metadata)
    if own and manifest["world_size"] != world_size:
        raise ValueError(f"checkpoint {path} holds per-rank optimizer state (the hybrid's first-order part) of "
                         f"{manifest['world_size']} ranks; this run has {world_size}: resume it on "
                         f"{manifest['world_size']} ranks")
    state = loading_state(optimizer, metadata, rank, str(path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), planner=ChunkLoadPlanner(),
                 no_dist=_no_dist(world_size))
    for entry in optimizer.shard_entries():
        # Providers that mirror the local tensor elsewhere (a ZeRO-3 parameter kept whole by
        # the persistence threshold, e.g. a small PEFT adapter) must see the write.
        if entry.view.after_write is not None:
            entry.view.after_write()
    optimizer.load_state_dict(assemble(optimizer, state, rank))
    return int(manifest["step"])
