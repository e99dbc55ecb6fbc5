"""Preemption: SIGTERM or SIGUSR1 stops a run after its current step, checkpointed, exit code 75.

SLURM sends SIGTERM before it kills a job (a time limit, a preemption, ``scancel``) and, with
``--signal=USR1@120``, SIGUSR1 a chosen time before the limit. Either signal on any rank only sets
a flag; after every step the ranks agree on it (one all-reduce of one float: the run's only
collective besides the optimizer's and the engine's) and, if any rank was signalled, every rank
writes a full checkpoint of that step and the run exits with :data:`EXIT_PREEMPTED`, which means
"resume me" (``--resume``: the checkpoint and the step log lose nothing). A second signal while the
checkpoint is written is ignored (the write finishes).

A file named :data:`STOP_FILE` (``PREEMPT``) appearing in the run folder is the same request,
for schedulers and users that cannot signal the ranks themselves: the SLURM scripts have SLURM
signal the batch shell (``--signal=B:USR1@120``), which creates the file on the shared file
system, so that no launcher between it and the ranks (``deepspeed``, ``torchrun``, which a
SIGUSR1 would kill) is in the way; by hand, ``touch runs/x/PREEMPT`` stops a run after its step
with a checkpoint. The run deletes the file when it acts on it (and a stale one when it starts).

Ctrl-C (SIGINT, which reaches every rank of the terminal's process group) is the same request; a
second Ctrl-C interrupts at once (``KeyboardInterrupt``; the step log still holds every completed
step). And a rank whose launcher went away (the ``deepspeed`` launcher returns at once on SIGTERM,
leaving its ranks running) notices that its parent process changed and stops the same way, so
nothing keeps running after the launcher.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionFlag", "STOP_FILE"]

#: Exit code of a preempted run (75: EX_TEMPFAIL, "try again", as a run whose peer died).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: The file in the run folder whose appearance asks the run to stop as SIGUSR1 does.
STOP_FILE = "PREEMPT"
#: Seconds between two looks at the parent process.
PARENT_POLL_S = 0.5
# Whether a launcher (deepspeed, torchrun, accelerate) started this process: read at import, before
# a one-process run sets LOCAL_RANK itself.
_LAUNCHED = "LOCAL_RANK" in os.environ


class Preempted(SystemExit):
    """Raised by the trainer after the preemption checkpoint: exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum
        super().__init__(EXIT_PREEMPTED)


class PreemptionFlag:
    """Installs the handlers (main thread only) and tells, collectively, whether to stop."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signum = 0
        self.stop_file = stop_file
        self._previous: dict[int, Any] = {}
        self._watching = threading.Event()

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if _LAUNCHED:  # started by a launcher: watch it
            self._watching.set()
            threading.Thread(target=self._watch_launcher, args=(_launcher_chain(),), daemon=True,
                             name="zoscale-launcher-watch").start()
        return self

    def uninstall(self) -> None:
        self._watching.clear()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now
        if not self.signum:
            self.request(signum, f"received {signal.Signals(signum).name}")

    def request(self, signum: int, why: str) -> None:
        self.signum = signum
        print(f"[zoscale] {why}: stopping after this step with a checkpoint", file=sys.stderr, flush=True)

    def _watch_launcher(self, chain: list[tuple[int, int]]) -> None:
        while self._watching.is_set() and not self.signum:
            for pid, parent in chain:
                if _parent_of(pid) != parent:
                    self.request(int(signal.SIGTERM), f"the launcher (pid {parent}) is gone")
                    return
            time.sleep(PARENT_POLL_S)

    def agreed(self, engine: Any) -> int:
        """A signal some rank received, or the stop file's SIGUSR1 (0: none); collective on a
        multi-rank engine."""
        if not self.signum and self.stop_file is not None and self.stop_file.exists():
            self.request(int(signal.SIGUSR1), f"{self.stop_file} appeared")
        # Read once: a handler or the launcher watch may set it during the collective, and a rank
        # that looked again afterwards would stop a step before the others (which then wait in
        # the next step's collectives forever).
        mine = self.signum
        if engine.world_size == 1:
            return mine
        device = next(engine.module.parameters()).device
        flag = engine.all_reduce_sum(torch.tensor([float(mine)], device=device))
        return mine or (int(signal.SIGTERM) if flag.item() > 0 else 0)


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (None once it has exited), from /proc."""
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _launcher_chain() -> list[tuple[int, int]]:
    """``(process, its parent)`` pairs whose change means the launcher went away: this rank's parent;
    under DeepSpeed's per-node ``deepspeed.launcher.launch`` also that process's parent, the
    ``deepspeed`` command (which returns on SIGTERM without stopping the per-node launcher)."""
    me, parent = os.getpid(), os.getppid()
    chain = [(me, parent)]
    try:
        cmdline = open(f"/proc/{parent}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return chain
    grandparent = _parent_of(parent)
    if "deepspeed.launcher.launch" in cmdline and grandparent is not None:
        chain.append((parent, grandparent))
    return chain
