"""A ZOTrainer run's ``<output_dir>/metrics.jsonl``, in the records zoscale's own trainer writes.

``Trainer`` keeps its logs in ``trainer_state.json`` (and sends them to ``report_to``:
TensorBoard and the rest, through transformers' own callbacks, which ZOTrainer leaves alone).
:class:`MetricsCallback` also writes each log, on the main process, as a zoscale metrics record
(``zoscale.train.reporting.Reporter``: stamped with ``time`` and ``elapsed_s``), so that
``launch/plot.py <output_dir>`` draws a Trainer run next to ``launch/train.py`` runs.

A record: ``step`` (the global step), ``loss``, ``lr``, ``projected_grad``, ``step_s`` and the
last step's split by phase (``<phase>_s``, the optimizer's ``last_step_timing``), ``epoch``, and
every ``eval_<metric>`` as the Trainer named it. On ``resume_from_checkpoint`` the records after
the checkpoint's step are dropped (``reporting.trim_metrics``), as ``launch/train.py`` does; an
evaluation this session ran before resuming is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from zoscale.train.reporting import METRICS_FILE, Reporter, trim_metrics

__all__ = ["MetricsCallback", "zoscale_record"]

#: Trainer's log keys -> zoscale's record keys (the rest keep their names).
_RENAMED = {"learning_rate": "lr", "zo_projected_grad": "projected_grad", "zo_step_s": "step_s"}


def zoscale_record(logs: dict[str, Any], step: int) -> dict[str, Any]:
    """The metrics record of one Trainer log at global step ``step``."""
    record: dict[str, Any] = {"step": step}
    for key, value in logs.items():
        if key.startswith("zo_") and key.endswith("_s") and key not in _RENAMED:
            key = key[len("zo_"):]  # a phase of the step: zo_forward_s -> forward_s
        record[_RENAMED.get(key, key)] = value
    return record


class MetricsCallback(TrainerCallback):
    """Writes every Trainer log to ``<output_dir>/metrics.jsonl`` on the main process (see the module)."""

    def __init__(self) -> None:
        self._reporter: Reporter | None = None
        self._outside_train = 0  # records written outside train() (an evaluate() before it, say)
        self._training = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = True
        if not state.is_world_process_zero:
            return
        self._close()
        path = Path(args.output_dir) / METRICS_FILE
        if state.global_step == 0 and self._outside_train == 0:
            path.unlink(missing_ok=True)  # a fresh run
        else:
            trim_metrics(path, state.global_step, tail=self._outside_train)
        self._reporter = _reporter(args, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if self._reporter is None:
            self._reporter = _reporter(args, state.global_step)
        self._reporter.record(zoscale_record(logs, state.global_step))
        self._outside_train += 0 if self._training else 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False
        self._close()

    def _close(self) -> None:
        if self._reporter is not None:
            self._reporter.close()
            self._reporter = None


def _reporter(args: Any, start_step: int) -> Reporter:
    """A reporter appending to ``<output_dir>/metrics.jsonl``; its clock goes on from the last record after step 0."""
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return Reporter(args.output_dir, "jsonl", start_step=start_step)
