"""A rank that dies or hangs: the others stop within a bounded time, name it, and exit non-zero.

Unit part: :class:`zoscale.train.watchdog.Watchdog` on an in-process store, ranks simulated by
several watchdogs (silence, a published failure, a finished rank, an aborting survivor, an exited
process, a lost store). End-to-end part: ``launch/train.py`` on two "nodes" of this machine (one
launcher per node, as on a cluster, where no launcher sees the other node's processes):

* torchrun, rank 1 SIGKILLed mid-training: rank 0's collective fails at once (gloo sees the
  closed connection); it names rank 1 from the watchdog and exits with code 75.
* DeepSpeed launcher, rank 1 frozen (SIGSTOP: alive, sockets open, silent, like a hung NCCL
  kernel or a node that lost its network): rank 0 waits in a collective that would never return
  and the watchdog ends it after --heartbeat_timeout, naming rank 1.

The SLURM version (srun, a killed rank fails the job) is in tests/e2e/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.distributed.spawn import free_port
from tests.e2e.test_multinode import common, deepspeed_node, ds_config, env, torchrun_node
from zoscale.train.watchdog import EXIT_PEER_LOST, PeerLost, Watchdog, _machine, is_communication_error

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- unit: the watchdog's verdicts
def _pair(timeout: float = 0.4, interval: float = 0.05) -> tuple[Watchdog, Watchdog]:
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=5))
    lost: list[PeerLost] = []
    a = Watchdog(store, 0, 2, timeout=timeout, interval=interval, on_lost=lost.append)
    b = Watchdog(store, 1, 2, timeout=timeout, interval=interval, on_lost=lost.append)
    return a, b


def test_a_silent_rank_is_named_after_the_timeout_and_not_before() -> None:
    a, b = _pair()
    a.start()
    b.start()
    time.sleep(0.3)
    assert a.check() is None and b.check() is None  # both beating
    b._stop.set()  # rank 1 goes silent (its thread stops, as in a frozen process)
    b._thread.join()
    t0 = time.monotonic()
    found = None
    while found is None and time.monotonic() - t0 < 3:
        found = a.check()
        time.sleep(0.02)
    waited = time.monotonic() - t0
    assert found is not None and found.rank == 1, found
    assert "rank 1 (pid" in found.message and "no heartbeat" in found.message
    assert a.timeout - 2 * a.interval <= waited <= a.timeout + 0.5, waited
    a.stop()


def test_published_failure_is_named_at_once_and_finished_or_aborting_ranks_are_not_blamed() -> None:
    a, b = _pair(timeout=0.2)
    a.start()
    b.start()
    b.failed(ValueError("bad row 12"))
    found = a.check()
    assert found is not None and found.rank == 1 and "failed: ValueError: bad row 12" in found.message
    for status in ("done", "aborting: rank 2 ..."):
        a2, b2 = _pair(timeout=0.2)
        a2.start()
        b2.start()
        b2.stop(status)
        time.sleep(0.4)  # longer than the timeout: silent, but it said why
        assert a2.check() is None, status
        a2.stop()
    a.stop()


def test_a_rank_whose_process_exited_on_this_machine_is_named_at_once() -> None:
    a, _ = _pair(timeout=60)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # Rank 1 registered as a process of this machine that has since exited.
    a.store.set("proc/1", f"{_machine()} {gone.pid}")
    a.store.set("where/1", f"pid {gone.pid} on here")
    found = a.check()
    assert found is not None and found.rank == 1 and f"pid {gone.pid}" in found.message, found
    assert "is gone" in found.message
    # A live process of this machine (this one) is not declared dead.
    a.store.set("proc/1", f"{_machine()} {os.getpid()}")
    a._procs.clear()
    assert a.check() is None


def test_a_lost_store_is_reported_after_the_timeout() -> None:
    class Broken:
        def __getattr__(self, name: str):
            def fail(*args, **kwargs):
                raise RuntimeError("Connection reset by peer")
            return fail

    a = Watchdog(Broken(), 1, 2, timeout=0.2, interval=0.05, store_host="rank 0 (10.0.0.1:29500)")
    assert a.check() is None  # not yet
    time.sleep(0.25)
    found = a.check()
    assert found is not None and found.rank is None and "rank 0 (10.0.0.1:29500)" in found.message


def test_communication_errors_are_told_from_a_ranks_own_errors() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:23264")
    assert is_communication_error(gloo)
    assert is_communication_error(dist.DistBackendError("NCCL error"))
    assert not is_communication_error(ValueError("bad label 3"))
    assert not is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_invalid_settings_are_refused() -> None:
    store = dist.HashStore()
    with pytest.raises(ValueError, match="Invalid timeout"):
        Watchdog(store, 0, 2, timeout=0)
    with pytest.raises(ValueError, match="Invalid interval"):
        Watchdog(store, 0, 2, timeout=1, interval=2)


# ---------------------------------------------------------------------- end to end: launch/train.py
def _rank_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    """The training process of ``rank`` among ``launcher``'s descendants (RANK in its environment)."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmd = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # A rank runs `python [-u] .../launch/train.py ...` (launchers run their own scripts).
            is_rank = any(a.endswith(b"launch/train.py") for a in cmd.split(b"\0")[1:3])
            if is_rank and f"RANK={rank}".encode() in environ and _descends(int(entry.name), launcher.pid, stat):
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process under {launcher.pid}")


def _descends(pid: int, ancestor: int, stat: str) -> bool:
    for _ in range(8):
        if pid == ancestor:
            return True
        try:
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, IndexError, ValueError):
            return pid == ancestor
    return False


def _wait_for_steps(metrics: Path, procs: list[subprocess.Popen], n: int, deadline: float) -> None:
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > n):
        for p in procs:
            assert p.poll() is None, p.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def _start(cmds: list[list[str]]) -> list[subprocess.Popen]:
    return [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
                             start_new_session=True) for c in cmds]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            outs.append("<timeout>")
    return outs


def _cleanup(procs: list[subprocess.Popen], ranks: list[int]) -> None:
    """Kill what is left: the ranks (torchrun puts each in its own session) and the launchers."""
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher's own session
            except ProcessLookupError:
                pass
        p.wait()


@pytest.mark.distributed
def test_torchrun_survivor_names_a_killed_rank_and_exits(tmp_path: Path) -> None:
    port = free_port()
    args = ["--engine", "fsdp", "--ds_config", str(ds_config(tmp_path)), *common(tmp_path, "run"),
            "--steps", "1000000"]
    procs = _start([torchrun_node(n, port, args) for n in (0, 1)])
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 300
        _wait_for_steps(tmp_path / "run" / "metrics.jsonl", procs, 3, deadline)
        ranks = [_rank_pid(procs[0], 0, deadline), _rank_pid(procs[1], 1, deadline)]
        victim = ranks[1]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        node0, node1 = _finish(procs, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        _cleanup(procs, ranks)
    assert procs[0].returncode not in (0, None) and procs[1].returncode not in (0, None), (node0[-3000:], node1)
    line = next((x for x in node0.splitlines() if x.startswith("[zoscale rank 0]")), None)
    assert line is not None, node0[-4000:]
    assert f"rank 1 (pid {victim} " in line and f"exits with code {EXIT_PEER_LOST}" in line, line
    assert f"exitcode  : {EXIT_PEER_LOST}" in node0  # torchrun reports rank 0's code
    print(f"torchrun: killed rank 1; node 0's launcher exited {elapsed:.1f} s later")
    assert elapsed < 60, elapsed


@pytest.mark.distributed
def test_deepspeed_survivor_names_a_hung_rank_after_the_heartbeat_timeout(tmp_path: Path) -> None:
    port = free_port()
    timeout = 5
    args = ["--ds_config", str(ds_config(tmp_path)), *common(tmp_path, "run"), "--steps", "1000000",
            "--heartbeat_timeout", str(timeout)]
    procs = _start([deepspeed_node(tmp_path, n, port, args) for n in (0, 1)])
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 300
        _wait_for_steps(tmp_path / "run" / "metrics.jsonl", procs, 3, deadline)
        ranks = [_rank_pid(procs[0], 0, deadline), _rank_pid(procs[1], 1, deadline)]
        victim = ranks[1]
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        node0 = _finish(procs[:1], timeout=120)[0]
        elapsed = time.monotonic() - t0
    finally:
        _cleanup(procs, ranks)
    assert procs[0].returncode == EXIT_PEER_LOST, (procs[0].returncode, node0[-4000:])
    line = next((x for x in node0.splitlines() if x.startswith("[zoscale rank 0]")), None)
    assert line is not None, node0[-4000:]
    assert f"rank 1 (pid {victim} " in line and "sent no heartbeat" in line, line
    print(f"deepspeed: froze rank 1; node 0's launcher exited {elapsed:.1f} s later (timeout {timeout} s)")
    # Bounded: the heartbeat timeout plus the time to notice and exit (seconds on a busy machine).
    assert timeout - 1 <= elapsed < timeout + 30, elapsed
