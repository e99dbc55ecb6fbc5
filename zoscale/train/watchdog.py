"""When a rank dies, the others stop within a bounded time and say which rank it was.

Without help, a job whose rank dies either fails with a message that names no rank (gloo:
"Connection closed by peer [10.0.0.7]:23264", raised on every survivor; torchrun on the other
node then reports its *own* rank as the root cause) or hangs: NCCL, a frozen process, a node
that lost power or network send nothing, so the survivors wait in their collective until the
process-group timeout (torch's default: 10 min NCCL, 30 min gloo), or forever.

Three layers, each bounded:

1. **Heartbeats** (:class:`Watchdog`). A daemon thread on every rank adds 1 to the key
   ``hb/<rank>`` of the job's rendezvous store (the ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``
   that every launcher already starts: torchrun's agent on node 0, or rank 0 under
   ``deepspeed``/``srun``) every ``interval`` seconds, and reads every other rank's counter. A
   counter that has not changed for ``timeout`` seconds (measured on the reader's own clock, so
   clock skew between nodes does not matter) means that rank is dead or frozen: the watchdog
   prints which rank, where (host and pid) and since when, and ends the process with
   :data:`EXIT_PEER_LOST`. This is what catches hangs; the main thread may be stuck in a
   collective, so the thread ends the process itself (``os._exit``). A rank on the same machine
   (same kernel and pid namespace) is also checked directly: a process that has exited (or is a
   zombie) is named at once, without waiting for its counter to go stale.
2. **Collective errors** (:meth:`Watchdog.diagnose`). When a collective raises instead (gloo
   notices a closed connection at once), the launch layer asks the watchdog who stopped: it
   waits until one counter has been still for a few intervals (``quick``, default 3 s), names
   that rank, and the process exits with :data:`EXIT_PEER_LOST`. A rank that fails with its own
   Python error writes it to ``status/<rank>`` first (:meth:`Watchdog.failed`), so the others
   report "rank 1 failed: ValueError: ..." rather than "stopped".
3. **A bounded process-group timeout** (``--dist_timeout``), for a rank that is alive (heart
   beating) but stuck: the collective raises after that many seconds.

Ranks that finish write ``status/<rank> = done`` and stop their thread, so a rank that exits
normally while another is still writing its last file is not mistaken for a dead one; ranks that
give up because of another rank write ``aborting: ...``, so they are not blamed either. If the
store itself becomes unreachable, the process hosting it (rank 0 or node 0's launcher) is gone:
that is reported after ``timeout`` like a silent rank.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Watchdog", "EXIT_PEER_LOST", "is_communication_error", "PeerLost"]

EXIT_PEER_LOST = 75
"""Exit code of a rank that stopped because another rank died (75: EX_TEMPFAIL, "try again";
a batch script can requeue on it)."""

_PREFIX = "zoscale/watchdog"
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                 "timeout", "socket", "peer", "store")


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` came from a collective or the store (as opposed to this rank's own code)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, (RuntimeError, ConnectionError, TimeoutError)) and any(m in text for m in _COMM_MARKERS)


@dataclass
class PeerLost:
    """A rank that stopped, as seen from another rank."""

    rank: int | None
    """The rank, or None when the store (hosted by rank 0 or node 0's launcher) is gone."""
    message: str


class Watchdog:
    """Heartbeat thread over the rendezvous store; names the rank that stopped.

    Args:
        store: a ``torch.distributed.Store`` shared by the job (see :meth:`from_env`).
        rank: this process's global rank.
        world_size: number of ranks.
        timeout: seconds without a heartbeat after which a rank counts as dead (the hang case).
        interval: seconds between heartbeats.
        quick: after a collective failed, seconds without a heartbeat that identify the rank
            that caused it (default ``3 * interval``); never more than ``timeout``.
        on_lost: called with the :class:`PeerLost` when the thread finds a dead rank; default
            :meth:`exit`, which prints and ends the process.
        store_host: a description of who hosts the store, for messages.
    """

    def __init__(self, store: Any, rank: int, world_size: int, timeout: float = 60.0, interval: float = 1.0,
                 quick: float | None = None, on_lost: Callable[[PeerLost], None] | None = None,
                 store_host: str = "rank 0") -> None:
        if timeout <= 0:
            raise ValueError(f"Invalid timeout: {timeout!r} (seconds, > 0)")
        if interval <= 0 or interval > timeout:
            raise ValueError(f"Invalid interval: {interval!r} (seconds, > 0 and <= timeout {timeout})")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = float(timeout)
        self.interval = float(interval)
        self.quick = min(self.timeout, 3 * self.interval if quick is None else float(quick))
        self.on_lost = on_lost or self.exit
        self.store_host = store_host
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        now = time.monotonic()
        self._seen: dict[int, tuple[int, float]] = {r: (-1, now) for r in range(world_size) if r != rank}
        self._store_down_since: float | None = None
        self._where: dict[int, str] = {}
        self._all_beating = False
        self._procs: dict[int, str] = {}
        self._status_version = 0
        self._status_cache: dict[int, str] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, timeout: float = 60.0, interval: float = 1.0, connect_timeout: float = 60.0,
                 **kwargs: Any) -> "Watchdog | None":
        """A watchdog on the launcher's store (``MASTER_ADDR``/``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``).

        Opens its own client connection, so heartbeats never queue behind the trainer's store
        calls. None for a one-rank job (nobody to watch).
        """
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        client = dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=connect_timeout),
                               wait_for_workers=False)
        # Once connected, no store call may block for long: a check must finish well within
        # the timeout even when the store's host has just died.
        client.set_timeout(datetime.timedelta(seconds=max(2.0, min(timeout / 4, 10.0))))
        # A torchrun restart reuses the store: keep each attempt's keys apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"{_PREFIX}/{attempt}", client)
        host = ("node 0's torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
                else "rank 0")
        return cls(store, int(os.environ["RANK"]), world, timeout=timeout, interval=interval,
                   store_host=f"{host} ({addr}:{port})", **kwargs)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "Watchdog":
        """Announce this rank (host, pid) and start the heartbeat thread."""
        self.store.set(f"where/{self.rank}", f"pid {os.getpid()} on {socket.gethostname()}")
        self.store.set(f"proc/{self.rank}", f"{_machine()} {os.getpid()}")
        self._beat()
        self._thread = threading.Thread(target=self._run, name="zoscale-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, status: str = "done") -> None:
        """Stop the thread and publish this rank's final status (``done`` after a normal end)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        self._publish(status)

    def failed(self, error: BaseException) -> None:
        """Publish that this rank fails with its own error (the others will name it)."""
        self.stop(f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500])

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if not self._stop.is_set():
            self.stop()

    # ------------------------------------------------------------------ checks
    def check(self, threshold: float | None = None) -> PeerLost | None:
        """Beat once, read every rank's counter and status; the first rank found dead, or None.

        A rank is dead when it published ``failed: ...``, or when its counter has been still
        for ``threshold`` seconds (default ``timeout``) and it has not published ``done`` or
        ``aborting``.
        """
        threshold = self.timeout if threshold is None else threshold
        now = time.monotonic()
        try:
            self._beat()
            peers = sorted(self._seen)
            counts = self._counters(peers)
            statuses = self._statuses(peers)
        except Exception as e:  # noqa: BLE001  (any store failure means the host is gone)
            with self._lock:
                if self._store_down_since is None:
                    self._store_down_since = now
                down = now - self._store_down_since
            if down >= threshold:
                return PeerLost(None, f"lost the rendezvous store hosted by {self.store_host} for {down:.1f} s "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                                      f"that process stopped")
            return None
        with self._lock:
            self._store_down_since = None
            for r, count in zip(peers, counts):
                if count != self._seen[r][0]:
                    self._seen[r] = (count, now)
            seen = dict(self._seen)
        for r in peers:
            status = statuses.get(r, "")
            if status.startswith("failed"):
                return PeerLost(r, f"rank {r} ({self._where_is(r)}) {status}")
        for r in peers:
            if r not in statuses and self._exited(r):
                return PeerLost(r, f"rank {r} ({self._where_is(r)}) is gone: its process exited without a word "
                                   "(killed, or crashed in native code)")
        for r in peers:
            status = statuses.get(r, "")
            silent = now - seen[r][1]
            if status or silent < threshold:
                continue
            if seen[r][0] <= 0:
                what = f"never sent a heartbeat in {silent:.1f} s"
            else:
                what = f"sent no heartbeat for {silent:.1f} s (heartbeat {seen[r][0]}): it died or hangs"
            return PeerLost(r, f"rank {r} ({self._where_is(r)}) {what}")
        return None

    def diagnose(self, wait: float | None = None) -> PeerLost | None:
        """After a collective failed: wait (at most ``wait`` s) until the rank that caused it is known.

        Polls :meth:`check` with the short threshold ``quick``; the thread keeps beating
        meanwhile, so the other survivors do not take this rank for the culprit.
        """
        deadline = time.monotonic() + (self.quick + 2 * self.interval if wait is None else wait)
        while True:
            found = self.check(self.quick)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(min(self.interval / 2, 0.5))

    def exit(self, lost: PeerLost, code: int = EXIT_PEER_LOST, context: str = "") -> None:
        """Print why this rank stops, publish ``aborting``, and end the process with ``code``."""
        self._stop.set()
        self._publish(f"aborting: {lost.message}")
        message = f"[zoscale rank {self.rank}] {lost.message}; {context}rank {self.rank} exits with code {code}\n"
        try:
            sys.stdout.flush()
            sys.stderr.write(message)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            os.write(2, message.encode())
        os._exit(code)

    # ------------------------------------------------------------------ internals
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            lost = self.check()
            if lost is not None and not self._stop.is_set():
                self.on_lost(lost)
                return

    def _beat(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)

    def _publish(self, status: str) -> None:
        try:
            self.store.set(f"status/{self.rank}", status)
            self.store.add("statuses", 1)
        except Exception:  # noqa: BLE001  (the store may be gone: nothing left to tell)
            pass

    def _counters(self, ranks: list[int]) -> list[int]:
        # Three store round trips per check whatever the world size, once every rank has
        # beaten: one multi_get of the counters (it would block on a missing key, hence the
        # per-key reads until then), the status version, and this rank's own beat.
        keys = [f"hb/{r}" for r in ranks]
        if not self._all_beating:
            self._all_beating = self.store.check(keys)
        if self._all_beating:
            return [int(v) for v in self.store.multi_get(keys)]
        return [int(self.store.add(k, 0)) if self.store.check([k]) else 0 for k in keys]

    def _statuses(self, ranks: list[int]) -> dict[int, str]:
        version = int(self.store.add("statuses", 0))
        if version != self._status_version:
            present = [r for r in ranks if self.store.check([f"status/{r}"])]
            self._status_cache = {r: self.store.get(f"status/{r}").decode() for r in present}
            self._status_version = version
        return self._status_cache

    def _exited(self, rank: int) -> bool:
        """True when ``rank`` runs on this machine and its process no longer runs (False: unknown)."""
        if rank not in self._procs:
            try:
                if not self.store.check([f"proc/{rank}"]):
                    return False
                self._procs[rank] = self.store.get(f"proc/{rank}").decode()
            except Exception:  # noqa: BLE001
                return False
        machine, _, pid = self._procs[rank].rpartition(" ")
        if machine != _machine():
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X")

    def _where_is(self, rank: int) -> str:
        if rank not in self._where:
            try:
                if self.store.check([f"where/{rank}"]):
                    self._where[rank] = self.store.get(f"where/{rank}").decode()
            except Exception:  # noqa: BLE001
                pass
        return self._where.get(rank, "location unknown")


def _machine() -> str:
    """This kernel and pid namespace: two processes with the same value can see each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"unknown-{socket.gethostname()}-{os.getpid()}"  # never equal across processes
    return f"{socket.gethostname()}/{boot}/{namespace}"
