"""Where a run resumes, and the step log that makes every completed step a resume point.

A fresh run starts ``steps.jsonl`` (``zoscale.train.step_log_file``) with a header: the run's
identity and config, the optimizer and its options, the noise kind and a fingerprint of the base
weights (``zoscale.train.fingerprint``). Every step appends its records. A resume loads the
newest intact full checkpoint (``zoscale.train.checkpoint``: on any engine and world size), then
replays the logged steps after it (:meth:`~zoscale.optim.base.ZOOptimizer.replay`: bit for bit, on
any engine and world size); without one, it replays the log from the base weights, after checking that
they are the run's (the fingerprint) and that the noise kind is the log's. So a SIGKILL loses no
completed step.

The hybrid's first-order part is not in the log: it resumes from its newest full checkpoint and
says which logged steps it runs again.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from zoscale.train.checkpoint import CheckpointError, load_checkpoint, verify_files
from zoscale.train.fingerprint import fingerprints_match, weights_fingerprint
from zoscale.train.run_folder import STEP_LOG, RunFolder
from zoscale.train.step_log_file import StepLogError, StepLogWriter, read_step_log

__all__ = ["resume", "open_step_log", "check_log_header"]


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[zoscale] {text}", file=sys.stderr, flush=True)


def _log_only_refused(optimizer: Any) -> str | None:
    if hasattr(optimizer, "fo_optimizer"):
        return "the hybrid's first-order part is not in the step log"
    return None


def check_log_header(header: dict[str, Any], optimizer: Any, log: Any, from_base: bool) -> None:
    """Refuse a log of another noise kind, or (replaying from the base) of other base weights.

    The fingerprint is collective: every rank calls this.
    """
    noise = optimizer.param_groups[0].get("noise")
    if header.get("noise") != noise:
        raise StepLogError(f"step log {log} was written with noise {header.get('noise')!r}; this run's "
                           f"optimizer uses {noise!r}: replaying it would follow another trajectory")
    if from_base:
        differ = fingerprints_match(header.get("base", {}), weights_fingerprint(optimizer))
        if differ:
            raise StepLogError(f"step log {log} was written on other base weights: the fingerprints of "
                               f"{len(differ)} tensors differ (e.g. {differ[:3]}); load the run's base model")


def _verified(folder: RunFolder, engine: Any) -> Any:
    """The newest checkpoint whose files every rank verified against the manifest (collective), or None."""
    for path in [folder.checkpoint, *folder.fallbacks]:
        problem = verify_files(path, engine.rank, engine.world_size)
        bad = torch.tensor([1.0 if problem else 0.0], device=next(engine.module.parameters()).device)
        if engine.world_size > 1:
            bad = engine.all_reduce_sum(bad)
        if bad.item() == 0:
            return path
        _say(engine.rank, f"checkpoint {path} is damaged ({problem or 'on another rank'}): falling back to an older one")
        if problem:
            print(f"[zoscale rank {engine.rank}] {problem}", file=sys.stderr, flush=True)
    return None


def resume(folder: RunFolder, optimizer: Any, engine: Any) -> tuple[int, str | None]:
    """Restore the run in ``folder`` onto ``optimizer``; return (the step to continue after, from what)."""
    rank, world_size = engine.rank, engine.world_size
    start, origin = 0, None
    if folder.checkpoint is not None:
        checkpoint = _verified(folder, engine)
        if checkpoint is None and folder.log is None:
            raise CheckpointError(f"every checkpoint of {folder.path} is damaged and there is no step log")
        folder.checkpoint = checkpoint
    if folder.checkpoint is not None:
        start = load_checkpoint(folder.checkpoint, optimizer, rank, world_size, folder.identity)
        origin = str(folder.checkpoint)
    if folder.log is None:
        return start, origin
    header, steps = read_step_log(folder.log)
    later = [(s, records) for s, records in steps if s > start]
    if not later:
        return start, origin
    refused = _log_only_refused(optimizer)
    if refused:
        if folder.checkpoint is None:
            raise StepLogError(f"cannot resume {folder.path}: {refused} and there is no full checkpoint of this "
                               "layout (set checkpoint_every)")
        _say(rank, f"{refused}: resuming from {folder.checkpoint} (step {start}); logged steps "
                   f"{later[0][0]}-{later[-1][0]} run again")
        return start, origin
    check_log_header(header, optimizer, folder.log, from_base=folder.checkpoint is None)
    optimizer.replay([r for _, records in later for r in records])
    _say(rank, f"replayed steps {later[0][0]}-{later[-1][0]} from {folder.log}"
               + (f" after {folder.checkpoint}" if folder.checkpoint is not None else " from the base weights"))
    return later[-1][0], f"{origin} + {folder.log}" if origin else str(folder.log)


def open_step_log(folder: RunFolder, optimizer: Any, cfg: Any, start: int, rank: int) -> StepLogWriter | None:
    """Rank 0's writer of ``steps.jsonl``: a new log for a fresh run, else the log cut at ``start``.

    The header's fingerprint is collective: every rank calls this, rank 0 writes.
    """
    path = folder.path / STEP_LOG
    fresh = folder.checkpoint is None and folder.log is None
    header = None
    if fresh or not path.is_file():
        base = weights_fingerprint(optimizer) if start == 0 else {}
        header = {"noise": optimizer.param_groups[0].get("noise"),
                  "optimizer": {"type": cfg.optimizer.type, "params": {"seed": cfg.seed, **cfg.optimizer.params}},
                  "base": base, "run": folder.identity, "config": dataclasses.asdict(cfg)}
    if rank != 0:
        return None
    writer = StepLogWriter(path, header)
    if header is None:
        writer.truncate_after(start)
    return writer
