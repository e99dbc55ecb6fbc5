"""Preemption: SIGTERM or SIGUSR1 stops a run after its current step, checkpointed, exit code 75.

SLURM sends SIGTERM before it kills a job (a time limit, a preemption, ``scancel``) and, with
``--signal=USR1@120``, SIGUSR1 a chosen time before the limit. Either signal on any rank only sets
a flag; after every step the ranks agree on it (one all-reduce of one float: the run's only
collective besides the optimizer's and the engine's) and, if any rank was signalled, every rank
writes a full checkpoint of that step and the run exits with :data:`EXIT_PREEMPTED`, which means
"resume me" (``--resume``: the checkpoint and the step log lose nothing). A second signal while the
checkpoint is written is ignored (the write finishes).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

import torch

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionFlag"]

#: Exit code of a preempted run (75: EX_TEMPFAIL, "try again", as a run whose peer died).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by the trainer after the preemption checkpoint: exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum
        super().__init__(EXIT_PREEMPTED)


class PreemptionFlag:
    """Installs the handlers (main thread only) and tells, collectively, whether to stop."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum
            print(f"[zoscale] received {signal.Signals(signum).name}: stopping after this step with a checkpoint",
                  file=sys.stderr, flush=True)

    def agreed(self, engine: Any) -> int:
        """A signal some rank received (0: none); collective on a multi-rank engine."""
        if engine.world_size == 1:
            return self.signum
        device = next(engine.module.parameters()).device
        flag = engine.all_reduce_sum(torch.tensor([float(self.signum)], device=device))
        return self.signum or (int(signal.SIGTERM) if flag.item() > 0 else 0)
