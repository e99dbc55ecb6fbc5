"""Where a run's metrics records go: ``metrics.jsonl`` always, TensorBoard event files on request.

The trainer hands each record (a step, an evaluation, a checkpoint, the final evaluation) to one
:class:`Reporter` on rank 0, which stamps it with the wall-clock time and the seconds since the
run started, appends it to ``<output_dir>/metrics.jsonl`` and, with ``report_to=tensorboard``,
writes its numbers as scalars to ``<output_dir>/tensorboard/`` (``torch.utils.tensorboard``):
``loss`` as ``train/loss``, ``eval_accuracy`` as ``eval/accuracy``, ``checkpoint_s`` as
``checkpoint/s`` (:func:`scalar_name`), at ``global_step`` = the record's step.

On resume ``metrics.jsonl`` has been trimmed to the records before the resumed step
(:mod:`zoscale.train.run_folder`); ``elapsed_s`` continues from the last kept record, and the
TensorBoard writer hides the earlier session's events after the resumed step (``purge_step``).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["REPORT_TO", "METRICS_FILE", "TENSORBOARD_DIR", "Reporter", "check_report_to", "scalar_name",
           "trim_metrics"]

#: The values of ``report_to``: ``jsonl`` (the default) and ``none`` write metrics.jsonl only.
REPORT_TO = ("jsonl", "none", "tensorboard")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: Keys of a record that are not scalars to report (the x axes).
_AXES = ("step", "time", "elapsed_s")
#: Record key prefixes that name a TensorBoard section of their own; every other key is ``train/``.
_SECTIONS = ("eval", "dev", "train", "checkpoint")


def check_report_to(value: Any) -> None:
    """``ValueError`` naming the key for an unknown value, or for ``tensorboard`` without the package."""
    if value not in REPORT_TO:
        raise ValueError(f"config key 'report_to' must be one of {list(REPORT_TO)}, got {value!r}")
    if value == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("config key 'report_to' is 'tensorboard' but the 'tensorboard' package is not installed "
                         "(pip install tensorboard)")


def scalar_name(key: str) -> str:
    """A record key's TensorBoard tag: ``eval_accuracy`` -> ``eval/accuracy``, ``loss`` -> ``train/loss``."""
    section, _, rest = key.partition("_")
    if section in _SECTIONS and rest:
        return f"{section}/{rest}"
    return f"train/{key}"


def _elapsed_of_last_record(path: Path) -> float:
    """``elapsed_s`` of the last record in ``path`` (0 without one): where a resumed run's clock goes on."""
    if not path.is_file():
        return 0.0
    last = 0.0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                last = float(json.loads(line).get("elapsed_s", last))
            except (ValueError, TypeError, AttributeError):
                pass  # a record written before timestamps, or a torn line: keep the last good one
    return last


def _kept(row: dict[str, Any], step: int) -> bool:
    """Records up to the checkpoint, but not the evaluation at its step (the resumed run redoes it)."""
    return row["step"] < step or (row["step"] == step and "loss" in row)


def trim_metrics(path: Path, step: int, tail: int = 0) -> None:
    """Keep in ``path`` (a metrics.jsonl) the records a run resumed at ``step`` keeps, and its last
    ``tail`` lines whatever they are (records this session wrote before resuming). No file: nothing."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    old, new = (rows[:-tail], rows[-tail:]) if tail else (rows, [])
    keep = [line for line in old if _kept(json.loads(line), step)] + new
    path.write_text("".join(line + "\n" for line in keep))


class Reporter:
    """Rank 0's sinks for the run's metrics records (see the module docstring).

    Args:
        out: the run folder.
        report_to: one of :data:`REPORT_TO`.
        start_step: the step the run starts (or resumes) at.
        started: ``time.time()`` when the run started (default: now); ``elapsed_s`` counts from it,
            plus the last kept record's ``elapsed_s`` when ``start_step`` > 0.
    """

    def __init__(self, out: str | Path, report_to: str = "jsonl", start_step: int = 0,
                 started: float | None = None) -> None:
        check_report_to(report_to)
        self.out = Path(out)
        self.started = time.time() if started is None else started
        metrics = self.out / METRICS_FILE
        self.offset = _elapsed_of_last_record(metrics) if start_step > 0 else 0.0
        self._metrics: IO[str] | None = metrics.open("a")
        self._tensorboard = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events the earlier session logged after the resumed step are hidden: the
            # steps after it are written again (the resumed step's own record is kept).
            self._tensorboard = SummaryWriter(str(self.out / TENSORBOARD_DIR),
                                              purge_step=start_step + 1 if start_step > 0 else None)

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Stamp ``entry`` with ``time`` and ``elapsed_s``, write it everywhere; the stamped record."""
        now = time.time()
        stamped = {**entry, "time": now, "elapsed_s": self.offset + now - self.started}
        if self._metrics is not None:
            self._metrics.write(json.dumps(stamped) + "\n")
            self._metrics.flush()
        if self._tensorboard is not None:
            for key, value in entry.items():
                if key not in _AXES and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(scalar_name(key), value, global_step=entry["step"], walltime=now)
            self._tensorboard.flush()
        return stamped

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
