"""The step log as a checkpoint (issue 12), through the real launchers on the tiny model.

* A SIGKILL of the whole job at a random step loses no completed step: the resumed run's losses
  and final weights equal the uninterrupted run's, bit for bit (one process, no master weights,
  no full checkpoint at all: the log alone).
* The same when one rank of a 2-rank ZeRO-3 run is SIGKILLed: the survivor names it and exits,
  and the resumed run equals the uninterrupted one.
* A log written by 2 DeepSpeed ZeRO-3 ranks resumes on one process: replayed there, the weights at
  the last logged step are the ZeRO-3 run's, bit for bit (the noise and every pass are
  elementwise in the global index), and the run continues.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.test_launch import (STEPS, TRAIN, _common, _deepspeed, _ds_config, _env, _losses, _run, _single,
                                   _weights)

# Real launchers, several runs per test (~5 min in all): outside the default run, in .ci/run.
pytestmark = [pytest.mark.distributed, pytest.mark.extended]

NO_MASTER = "optimizer.params.master_weights=false"


def _logged_steps(run: Path) -> int:
    log = run / "steps.jsonl"
    return max(0, log.read_text().count("\n") - 1) if log.is_file() else 0


def test_sigkill_loses_no_completed_step(tmp_path: Path) -> None:
    steps = 30  # enough that the kill lands before the end, however fast the steps
    _single(tmp_path, "full", NO_MASTER, "--steps", str(steps))
    kill_after = random.Random(os.getpid()).randint(2, 10)
    cmd = [sys.executable, TRAIN, *_common(tmp_path, "killed"), "--steps", str(steps), "batch_size=8",
           "optimizer.type=MeZO", "optimizer.params.lr=0.001", "optimizer.params.eps=0.001", NO_MASTER]
    proc = subprocess.Popen(cmd, env=_env(), cwd=Path(TRAIN).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _logged_steps(tmp_path / "killed") < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = _logged_steps(tmp_path / "killed")
    assert kill_after <= logged < steps, (kill_after, logged)
    assert not (tmp_path / "killed" / "checkpoints").exists()  # no full checkpoint: the log alone
    out = _run([*cmd, "--resume"])
    assert f"replayed steps 1-{logged}" in out.stderr
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    w1, w2 = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    for name, p in w1.items():
        assert torch.equal(w2[name], p), name


def test_sigkill_of_one_zero3_rank_loses_no_completed_step(tmp_path: Path) -> None:
    """Rank 1 of a 2-rank ZeRO-3 run SIGKILLed at a random step: the survivor exits, and the run
    resumed on the same layout replays every logged step and ends as the uninterrupted run."""
    from tests.distributed.spawn import free_port
    from tests.e2e.test_failure import _rank_pid
    from tests.e2e.test_launch import VENV_BIN

    steps = 30
    ds = _ds_config(tmp_path, 3)
    _deepspeed(tmp_path, "full", ds, "--steps", str(steps), "--eval_every", "0")
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
           "--ds_config", str(ds), *_common(tmp_path, "killed"), "--steps", str(steps), "--eval_every", "0",
           "--heartbeat_timeout", "10"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=Path(TRAIN).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    kill_after = random.Random(os.getpid()).randint(2, 10)
    deadline = time.time() + 300
    victim = _rank_pid(proc, 1, time.monotonic() + 300)
    while _logged_steps(tmp_path / "killed") < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "rank 1" in err, err[-3000:]
    logged = _logged_steps(tmp_path / "killed")
    assert kill_after <= logged < steps, (kill_after, logged)
    port = str(free_port())
    out = _run([*cmd[:4], port, *cmd[5:], "--resume"])
    assert f"replayed steps 1-{logged}" in out.stderr
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    w1, w2 = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    for name, p in w1.items():
        assert torch.equal(w2[name], p), name


def test_a_zero3_log_resumes_on_one_process(tmp_path: Path) -> None:
    ds = _ds_config(tmp_path, 3)  # 2 ranks x 4 = the global batch of 8 of the one-process run
    _deepspeed(tmp_path, "ds", ds, "--steps", "4")
    ds_weights = _weights(tmp_path / "ds")
    (tmp_path / "ds" / "final").rename(tmp_path / "ds_final_step4")
    # The same run, resumed on one process at its last logged step: only the replay happens.
    out = _run([sys.executable, TRAIN, *_common(tmp_path, "ds"), "--steps", "4", "batch_size=8",
                "optimizer.type=MeZO", "optimizer.params.lr=0.001", "optimizer.params.eps=0.001",
                "optimizer.params.master_weights=true", "--resume"])
    assert "replayed steps 1-4" in out.stderr and "from the base weights" in out.stderr
    for name, p in _weights(tmp_path / "ds").items():
        assert torch.equal(p, ds_weights[name]), name
    # And it continues there: steps 5-6 on one process, logged after the replayed ones.
    _run([sys.executable, TRAIN, *_common(tmp_path, "ds"), "--steps", str(STEPS), "batch_size=8",
          "optimizer.type=MeZO", "optimizer.params.lr=0.001", "optimizer.params.eps=0.001",
          "optimizer.params.master_weights=true", "--resume"])
    assert sorted(_losses(tmp_path / "ds")) == list(range(1, STEPS + 1))
    assert _logged_steps(tmp_path / "ds") == STEPS


REPLAY = str(Path(TRAIN).parent / "replay.py")


def test_replay_writes_the_run_from_its_log_on_one_process_and_on_zero3(tmp_path: Path) -> None:
    """launch/replay.py: the base model plus the log give the run's own final weights, bit for bit."""
    from tests.distributed.spawn import free_port
    from tests.e2e.test_launch import VENV_BIN

    _single(tmp_path, "run", NO_MASTER)
    log = tmp_path / "run" / "steps.jsonl"
    out = _run([sys.executable, REPLAY, "--log", str(log), "--output_dir", str(tmp_path / "one")])
    assert '"steps": 6' in out.stdout
    ds = _ds_config(tmp_path, 3, master_weights=False)
    _run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), REPLAY,
          "--ds_config", str(ds), "--log", str(log), "--output_dir", str(tmp_path / "zero3")])
    want = _weights(tmp_path / "run")
    for where in ("one", "zero3"):
        got = _weights(tmp_path / where)
        for name, p in want.items():
            assert torch.equal(got[name], p), (where, name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, "stop file"])
def test_a_preemption_signal_checkpoints_and_exits_75_and_the_resume_equals_the_run(tmp_path: Path, sig) -> None:
    """What SLURM sends before a time limit or a preemption (or the PREEMPT file the SLURM scripts
    create for it): the run finishes its step, writes a full checkpoint, exits with 75; resumed,
    it equals the uninterrupted run bit for bit."""
    from zoscale.train.preemption import EXIT_PREEMPTED, STOP_FILE

    steps = 30  # enough that the signal lands before the end, however fast the steps (6 did not on CI)
    _single(tmp_path, "full", NO_MASTER, "--steps", str(steps))
    cmd = [sys.executable, TRAIN, *_common(tmp_path, "stopped"), "--steps", str(steps), "batch_size=8",
           "optimizer.type=MeZO", "optimizer.params.lr=0.001", "optimizer.params.eps=0.001", NO_MASTER]
    proc = subprocess.Popen(cmd, env=_env(), cwd=Path(TRAIN).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _logged_steps(tmp_path / "stopped") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if sig == "stop file":
        (tmp_path / "stopped" / STOP_FILE).touch()
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert not (tmp_path / "stopped" / STOP_FILE).exists()  # consumed: the resumed run goes on
    stopped_at = _logged_steps(tmp_path / "stopped")
    assert 2 <= stopped_at < steps and f"preempted after step {stopped_at}" in err
    assert (tmp_path / "stopped" / "checkpoints" / f"step_{stopped_at:08d}" / "done").is_file()
    _run([*cmd, "--resume"])
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "full")
    w1, w2 = _weights(tmp_path / "full"), _weights(tmp_path / "stopped")
    for name, p in w1.items():
        assert torch.equal(w2[name], p), name


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (the launcher's tree: it was started in a new session)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(pid) for pid, stat in (line.split()[:2] for line in out.splitlines() if line.strip())
            if not stat.startswith("Z")]


def test_sigterm_to_the_deepspeed_launcher_leaves_no_rank_running(tmp_path: Path) -> None:
    """The deepspeed launcher returns at once on SIGTERM; its ranks notice that their parent is
    gone, finish the step, write a checkpoint and exit: nothing keeps running, nothing is lost."""
    from tests.distributed.spawn import free_port
    from tests.e2e.test_launch import VENV_BIN

    ds = _ds_config(tmp_path, 3)
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
           "--ds_config", str(ds), *_common(tmp_path, "ds"), "--steps", "100000", "--eval_every", "0"]
    err = (tmp_path / "launcher.err").open("w")
    proc = subprocess.Popen(cmd, env=_env(), cwd=Path(TRAIN).parents[1], stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True)
    deadline = time.time() + 300
    while _logged_steps(tmp_path / "ds") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "launcher.err").read_text()[-3000:]
    assert len(_session(proc.pid)) >= 4, _session(proc.pid)  # deepspeed, its per-node launcher, 2 ranks
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 240  # a step, a checkpoint and the exit, on a loaded machine
    while _session(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = _session(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes {left} still running 240 s after SIGTERM to the launcher"
    logged = _logged_steps(tmp_path / "ds")
    done = sorted(p.parent.name for p in (tmp_path / "ds" / "checkpoints").glob("step_*/done"))
    err.close()
    assert done and done[-1] == f"step_{logged:08d}", (logged, done, (tmp_path / "launcher.err").read_text()[-4000:])
