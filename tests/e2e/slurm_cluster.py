"""A real SLURM cluster on this machine, for tests: munge, slurmctld and one slurmd per emulated node.

Debian's Slurm (22.05, built with multiple-slurmd support) runs several ``slurmd`` on one host
when each has its own node name and port; the nodes share ``NodeAddr=127.0.0.1``. Everything the
cluster writes (configuration, munge key and socket, state, spool, logs) lives under one work
directory, on free ports, so it touches nothing of the machine's and two clusters can coexist.
Needs root (``SlurmUser=root``) and ``apt-get`` for the first install (about 10-20 s).

    with LocalSlurmCluster(tmp_path / "slurm", nodes=2) as cluster:
        job = cluster.sbatch(["launch/slurm/torchrun.sbatch", ...], cwd=repo)
        state, exit_code = cluster.wait(job)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.distributed.spawn import free_ports

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE"}


def installed() -> bool:
    """Whether the Debian packages and their binaries are present."""
    ok = subprocess.run(["dpkg", "-s", *PACKAGES], capture_output=True).returncode == 0
    return ok and all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey"))


def install() -> None:
    """``apt-get install`` Slurm and munge (no recommends: ~8 packages) unless already there."""
    if installed():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("installing Slurm needs root and apt-get (Debian/Ubuntu)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)


class LocalSlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd daemons (nodes ``n1``, ``n2``, ...), all under ``workdir``.

    Args:
        workdir: a fresh directory for everything the cluster writes.
        nodes: emulated nodes.
        cpus_per_node: CPUs each node offers (default: this machine's cores divided among the nodes).
    """

    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int | None = None) -> None:
        self.dir = Path(workdir)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // nodes)
        self.conf = self.dir / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pidfiles: list[Path] = []
        self._socket_dir: Path | None = None

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and the slurmd daemons; wait until every node is idle."""
        install()
        d = self.dir
        for sub in ("etc", "state", "log", "run", "munge", "key", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        os.chmod(d / "key", 0o700)
        # munged wants every directory above its socket searchable by all; pytest's tmp_path is
        # private (0700), so the socket gets its own directory in /tmp.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="zoscale-munge-", dir="/tmp"))
        os.chmod(self._socket_dir, 0o755)
        key, sock = d / "key" / "munge.key", self._socket_dir / "munge.socket.2"
        if not key.exists():
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        subprocess.run(["munged", "-S", str(sock), f"--key-file={key}", f"--log-file={d / 'log' / 'munged.log'}",
                        f"--pid-file={d / 'run' / 'munged.pid'}", f"--seed-file={d / 'key' / 'munged.seed'}"],
                       check=True, capture_output=True)
        self._pidfiles.append(d / "run" / "munged.pid")
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        lines = [
            f"ClusterName=zoscale{ctld_port}", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={sock}", f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "InactiveLimit=0", "MinJobAge=300", "KillWait=5", "Waittime=0", "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                         "RealMemory=1000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        self._run(["slurmctld", "-c", "-f", str(self.conf)])
        self._pidfiles.append(d / "run" / "slurmctld.pid")
        for name in self.nodes:
            (d / "spool" / name).mkdir(exist_ok=True)
            self._run(["slurmd", "-f", str(self.conf), "-N", name])
            self._pidfiles.append(d / "run" / f"slurmd-{name}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = self._run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False).stdout.split()
            if len(set(idle)) >= len(self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM nodes not idle after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL) and munged."""
        pids = []
        for f in self._pidfiles:
            try:
                pids.append(int(f.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        if self.conf.exists():
            self._run(["scancel", "--quiet", "--full", "-u", "root"], check=False, timeout=20)
            self._run(["scontrol", "shutdown"], check=False, timeout=20)
        for pid in pids:
            self._terminate(pid)
        self._pidfiles.clear()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    @staticmethod
    def _terminate(pid: int, grace: float = 15.0) -> None:
        deadline = time.monotonic() + grace
        sent = False
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if not sent and time.monotonic() > deadline - grace + 3:
                os.kill(pid, signal.SIGTERM)
                sent = True
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ jobs
    def _run(self, cmd: list[str], check: bool = True, timeout: float = 60.0,
             **kwargs: object) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit a batch job (``sbatch --parsable ARGS``) from ``cwd``; its id."""
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed:\n{out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for item in out.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: int, timeout: float = 600.0, poll: float = 0.5) -> tuple[str, str]:
        """Poll until the job has finished; ``(JobState, ExitCode)``. Cancels it on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in _FINISHED:
                return state, info.get("ExitCode", "")
            if time.monotonic() > deadline:
                self._run(["scancel", str(job_id)], check=False)
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s:\n{self.logs()}")
            time.sleep(poll)

    def requeue(self, job_id: int, now: bool = True) -> None:
        """``scontrol requeue``: what a preemption does (the job is killed and queued again, same id).

        Slurm holds a requeued job for about 2 minutes (its BeginTime); with ``now`` the hold is
        shortened, as an administrator would, so tests do not wait. Not to zero: when a job ends,
        each slurmd revokes its job credential with a timestamp of whole seconds and refuses any
        credential of that job id created in the same second or earlier (slurmd's
        ``cred_revoked``: ``ctime <= revoked``). A requeued instance scheduled within the second
        its predecessor ended is refused before its batch script starts: the job ends FAILED
        1:0 with nothing in its log. Slurm's own hold exists to step over that window, so the
        release time here is the later of now and two seconds after the previous instance's end.
        """
        end = self._end_time(job_id)
        self._run(["scontrol", "requeue", str(job_id)])
        if now:
            self.release(job_id, end)

    def release(self, job_id: int, end: float) -> None:
        """Shorten a requeued job's hold to 2 s after ``end``, its previous instance's end (see
        :meth:`requeue`): also for a job that requeued itself."""
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(max(time.time(), end) + 2))
        deadline = time.monotonic() + 30
        while True:  # the update is refused while the job is still completing
            if self._run(["scontrol", "update", f"JobId={job_id}", f"StartTime={start}"], check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not release requeued job {job_id}:\n{self.logs()}")
            time.sleep(0.3)

    def _end_time(self, job_id: int) -> float:
        """The job's ``EndTime`` as a Unix time (now if it has none yet)."""
        value = self.job(job_id).get("EndTime", "")
        try:
            return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return time.time()

    def logs(self, lines: int = 30) -> str:
        """The tail of every daemon log, for failure messages (a job refused before its script ran
        shows up only here)."""
        parts = []
        for f in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)
