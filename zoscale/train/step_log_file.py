"""The step log as a checkpoint: ``<run>/steps.jsonl``, an append-only, fsync'd file.

Line 1 is the header; every further line is one completed step, written by rank 0 as soon as the
step returns, then flushed and fsync'd::

    {"format": "zoscale.steplog", "version": 1, "noise": "gaussian", "optimizer": {...},
     "base": {stable id: fingerprint}, "run": {run identity}}
    {"step": 1, "records": [{"seed": 0, "step": 0, "query": 0, "grad": [...], "lr": [...], "loss": [...]}]}
    ...

(``records``: the optimizer's step-log records of that step, ``zoscale.optim.step_log``.) A step
is one line, so a SIGKILL during a write leaves at most a torn last line, which the reader drops:
every completed step before it survives. With the base weights and the options in the header,
the log is the whole fine-tune: :meth:`~zoscale.optim.base.ZOOptimizer.replay` re-runs it on any
engine and world size, bit for bit (``launch/replay.py`` writes the fine-tuned model from it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, IO

__all__ = ["FORMAT", "VERSION", "StepLogWriter", "read_step_log", "StepLogError"]

FORMAT, VERSION = "zoscale.steplog", 1


class StepLogError(ValueError):
    """A step log that cannot be used: missing, of another format or version, or malformed."""


class StepLogWriter:
    """Appends completed steps to a step log (rank 0 only), each one flushed and fsync'd."""

    def __init__(self, path: Path, header: dict[str, Any] | None = None) -> None:
        """Open ``path`` for appending; with ``header``, start a new log there (replacing any)."""
        self.path = path
        if header is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with tmp.open("w") as f:
                f.write(json.dumps({"format": FORMAT, "version": VERSION, **header}) + "\n")
                _sync(f)
            tmp.replace(path)
        self._file: IO[str] = path.open("a")

    def append(self, step: int, records: list[dict[str, Any]]) -> None:
        self._file.write(json.dumps({"step": step, "records": records}) + "\n")
        _sync(self._file)

    def truncate_after(self, step: int) -> None:
        """Keep the header and steps ``<= step`` (a resume continues from there)."""
        header, steps = read_step_log(self.path)
        self._file.close()
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(header) + "\n")
            for s, records in steps:
                if s <= step:
                    f.write(json.dumps({"step": s, "records": records}) + "\n")
            _sync(f)
        tmp.replace(self.path)
        self._file = self.path.open("a")

    def close(self) -> None:
        self._file.close()


def _sync(f: IO[str]) -> None:
    f.flush()
    os.fsync(f.fileno())


def read_step_log(path: Path) -> tuple[dict[str, Any], list[tuple[int, list[dict[str, Any]]]]]:
    """The header and the completed steps ``(step, records)`` of a step log.

    A torn last line (a write cut short) is dropped; a malformed line before it is an error.

    Raises:
        StepLogError: no file, another format or version, a malformed line, steps out of order.
    """
    if not path.is_file():
        raise StepLogError(f"no step log at {path}")
    lines = path.read_text().split("\n")
    complete, torn = lines[:-1], lines[-1]  # the text after the last newline was never finished
    del torn
    if not complete:
        raise StepLogError(f"step log {path} has no complete header line")
    header = _parse(path, 1, complete[0])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise StepLogError(f"{path} is not a zoscale step log of version {VERSION} (header format "
                           f"{header.get('format')!r}, version {header.get('version')!r})")
    steps = []
    for number, line in enumerate(complete[1:], start=2):
        entry = _parse(path, number, line)
        step = entry.get("step")
        if not isinstance(step, int) or not isinstance(entry.get("records"), list) or \
                (steps and step != steps[-1][0] + 1):
            raise StepLogError(f"step log {path}, line {number}: expected step "
                               f"{steps[-1][0] + 1 if steps else 'N'} with its records, got {line[:120]!r}")
        steps.append((step, entry["records"]))
    return header, steps


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise StepLogError(f"step log {path}, line {number} is not JSON ({e.msg}): {line[:120]!r}") from None
    if not isinstance(value, dict):
        raise StepLogError(f"step log {path}, line {number} is not a JSON object: {line[:120]!r}")
    return value
