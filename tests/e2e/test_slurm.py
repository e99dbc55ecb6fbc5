"""The SLURM batch scripts on a real SLURM cluster of 2 emulated nodes on this machine.

The cluster (munge, slurmctld, two slurmd: ``tests/e2e/slurm_cluster.py``) is installed from
Debian's packages if missing, started for this module and torn down after it, also on failure.
Jobs run ``launch/slurm/*.sbatch`` as users do, one rank per node, with the tiny Llama, and are
compared with one process running the whole batch. Tolerances as in tests/e2e/test_launch.py:
two ranks sum half batches where one process sums the whole batch, a few ulp in the loss
(<= 1e-6 relative measured), so losses agree to 1e-5 relative.

Select with ``-m slurm``, leave out with ``-m "not slurm"``; needs root and apt (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import LocalSlurmCluster

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
STEPS, HALF = 8, 4

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]


def _env() -> dict[str, str]:
    # Exported into the jobs by sbatch (--export=ALL). Eager noise kernels: no torch.compile in
    # every rank of every job; the reference uses them too (same z to the bit).
    return {"ZOSCALE_NOISE_BACKEND": "eager", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
            "ZOSCALE_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}


def _toy_data(path: Path) -> Path:
    words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
    with path.open("w") as f:
        for i in range(80):
            f.write(json.dumps({"sentence": f"a {words[i % 2][i % 4]} film number {i}", "label": i % 2}) + "\n")
    return path


def _common(data: Path) -> list[str]:
    return ["--model", "tiny-llama", "--data", str(data), "--eval_every", "0", "data.n_train=48", "data.n_eval=16",
            "model.trainable=all", 'data.label_words=[" bad", " good"]']


def _ds_config(tmp: Path) -> Path:
    cfg = {"train_micro_batch_size_per_gpu": HALF,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "MeZO", "params": {"lr": 1e-3, "eps": 1e-3, "master_weights": True}},
           "steps_per_print": 10**6}
    path = tmp / "zero3.json"
    path.write_text(json.dumps(cfg))
    return path


def _losses(run: Path) -> dict[int, float]:
    """Loss per step; a step recorded twice (re-run after a resume) must have the same loss."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").open():
        row = json.loads(line)
        if "loss" in row:
            assert out.setdefault(row["step"], row["loss"]) == row["loss"], row
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("slurm_jobs")
    _toy_data(tmp / "toy.jsonl")
    _ds_config(tmp)
    (tmp / "runs" / "slurm").mkdir(parents=True)  # the scripts' log folder, as the README says
    return tmp


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm_cluster"), nodes=2, cpus_per_node=1) as c:
        yield c


@pytest.fixture(scope="module")
def reference(work: Path) -> dict[int, float]:
    """One process, the whole batch of 8, STEPS steps."""
    out = work / "one"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *_common(work / "toy.jsonl"), "--output_dir", str(out),
           "--no-progress", "--steps", str(STEPS), "batch_size=8", "optimizer.params.lr=0.001",
           "optimizer.params.eps=0.001", "optimizer.params.master_weights=true", "save_final=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, **_env(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(out)


def _why(cluster: LocalSlurmCluster, work: Path, name: str, job: int) -> str:
    """What a failure message needs: the job log's tail, the job's record and the daemons' logs."""
    info = cluster.job(job)
    record = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "ExitCode", "Restarts", "BeginTime"))
    return f"{_log(work, name, job)[-4000:]}\n--- job {job}: {record}\n{cluster.logs(lines=60)}"


def _job(cluster: LocalSlurmCluster, work: Path, script: str, *args: str,
         timeout: float = 300) -> tuple[int, str, str]:
    job = cluster.sbatch([str(SLURM / script), *args], cwd=work, env=_env())
    state, code = cluster.wait(job, timeout=timeout)
    return job, state, code


def _log(work: Path, name: str, job: int) -> str:
    path = work / "runs" / "slurm" / f"{name}-{job}.out"
    return path.read_text() if path.exists() else f"<no {path}>"


def _assert_trajectory(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_deepspeed_job_follows_the_single_process_run_and_resumes_after_requeue(
        cluster: LocalSlurmCluster, work: Path, reference: dict[int, float]) -> None:
    # The step count comes from a config file, so that the first run stops at step HALF as if
    # preempted there, and the same job, requeued, has the rest to do.
    cfg = work / "ds_run.json"
    cfg.write_text(json.dumps({"steps": HALF}))
    args = ["--ds_config", str(work / "zero3.json"), *_common(work / "toy.jsonl"), "--config", str(cfg),
            "--checkpoint_every", "2"]
    job, state, code = _job(cluster, work, "deepspeed.sbatch", *args)
    log = _log(work, "zoscale-ds", job)
    assert (state, code) == ("COMPLETED", "0:0"), _why(cluster, work, "zoscale-ds", job)
    # Where the README says: runs/slurm/<job name>-<job id>/ under the submission directory.
    run = work / "runs" / "slurm" / f"zoscale-ds-{job}"
    assert list((run / "checkpoints" / f"step_{HALF:08d}").glob("__1_*.distcp"))  # rank 1's chunks
    assert (run / "checkpoints" / f"step_{HALF:08d}" / "done").is_file()
    assert (run / "final" / "config.json").is_file()
    assert sorted(_losses(run)) == list(range(1, HALF + 1))
    assert "resuming" not in log

    cfg.write_text(json.dumps({"steps": STEPS}))
    cluster.requeue(job)
    state, code = cluster.wait(job, timeout=300)
    log = _log(work, "zoscale-ds", job)
    assert (state, code) == ("COMPLETED", "0:0"), _why(cluster, work, "zoscale-ds", job)
    assert log.count("starting on") == 2, log[-3000:]  # the batch script's first line, once per run
    assert cluster.job(job).get("Restarts") == "1"
    assert f"resuming from runs/slurm/zoscale-ds-{job}/checkpoints/step_{HALF:08d}" in log, log[-3000:]
    assert f'"start_step": {HALF}' in log
    _assert_trajectory(_losses(run), reference)
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "done").is_file()


def test_torchrun_fsdp_job_follows_the_single_process_run_and_a_resubmission_resumes(
        cluster: LocalSlurmCluster, work: Path, reference: dict[int, float]) -> None:
    out = work / "fsdp_run"
    args = ["--engine", "fsdp", "--ds_config", str(work / "zero3.json"), *_common(work / "toy.jsonl"),
            "--output_dir", str(out), "--checkpoint_every", "2"]
    job, state, code = _job(cluster, work, "torchrun.sbatch", *args, "--steps", str(HALF), "save_final=false")
    assert (state, code) == ("COMPLETED", "0:0"), _why(cluster, work, "zoscale-fsdp", job)
    assert (out / "checkpoints" / f"step_{HALF:08d}" / "done").is_file()
    # A new job on the same --output_dir picks up the checkpoint by itself.
    job2, state, code = _job(cluster, work, "torchrun.sbatch", *args, "--steps", str(STEPS))
    log = _log(work, "zoscale-fsdp", job2)
    assert (state, code) == ("COMPLETED", "0:0"), _why(cluster, work, "zoscale-fsdp", job2)
    assert f"resuming from {out}/checkpoints/step_{HALF:08d}" in log, log[-3000:]
    _assert_trajectory(_losses(out), reference)
    assert (out / "final" / "config.json").is_file()


def test_the_time_limit_signal_checkpoints_and_the_job_requeues_itself(
        cluster: LocalSlurmCluster, work: Path, reference: dict[int, float]) -> None:
    """What ``--signal=B:USR1@120`` sends 120 s before the time limit, sent now: the ranks stop
    after their step with a checkpoint, the job requeues itself and continues the trajectory."""
    cfg = work / "signal_run.json"
    cfg.write_text(json.dumps({"steps": 100000}))
    out = work / "signalled"
    args = ["--ds_config", str(work / "zero3.json"), *_common(work / "toy.jsonl"), "--config", str(cfg),
            "--checkpoint_every", "0", "--output_dir", str(out)]
    job = cluster.sbatch([str(SLURM / "deepspeed.sbatch"), *args], cwd=work, env=_env())
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or len(_losses(out)) < 2:
        assert time.monotonic() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            _why(cluster, work, "zoscale-ds", job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=cluster.env, timeout=60)
    while cluster.job(job).get("Restarts") != "1" or cluster.job(job).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, _why(cluster, work, "zoscale-ds", job)
        time.sleep(0.3)
    log = _log(work, "zoscale-ds", job)
    stopped = sorted(p.parent.name for p in (out / "checkpoints").glob("step_*/done"))
    assert len(stopped) == 1 and "SIGUSR1: the ranks stop" in log and "requeueing job" in log, log[-3000:]
    at = int(stopped[0].split("_")[1])
    assert f"preempted after step {at}" in log and sorted(_losses(out)) == list(range(1, at + 1)), log[-3000:]
    cfg.write_text(json.dumps({"steps": at + 2}))  # the requeued instance: two more steps
    cluster.release(job, time.time())  # its instance has ended (a pending job's EndTime is a forecast)
    state, code = cluster.wait(job, timeout=300)
    log = _log(work, "zoscale-ds", job)
    assert (state, code) == ("COMPLETED", "0:0"), _why(cluster, work, "zoscale-ds", job)
    assert f"resuming from {out}/checkpoints/step_{at:08d}" in log, log[-3000:]
    got = _losses(out)
    assert sorted(got) == list(range(1, at + 3))
    for step in set(got) & set(reference):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step


def test_a_killed_rank_fails_the_job_with_its_name(cluster: LocalSlurmCluster, work: Path) -> None:
    args = ["--ds_config", str(work / "zero3.json"), *_common(work / "toy.jsonl"), "--steps", "100000",
            "--checkpoint_every", "0", "--output_dir", str(work / "killed")]
    job = cluster.sbatch([str(SLURM / "deepspeed.sbatch"), *args], cwd=work, env=_env())
    metrics = work / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        assert time.monotonic() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            _log(work, "zoscale-ds", job)[-3000:]
        time.sleep(0.2)
    victim = _rank_pid(job, 1)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    state, code = cluster.wait(job, timeout=120)
    elapsed = time.monotonic() - t0
    log = _log(work, "zoscale-ds", job)
    assert state == "FAILED" and code != "0:0", (state, code, log[-3000:])
    assert f"rank 1 (pid {victim}" in log, log[-3000:]
    assert elapsed < 60, elapsed


def _rank_pid(job: int, rank: int) -> int:
    """The pid of the training process of ``rank`` in SLURM job ``job`` (from /proc environ)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            cmd = (entry / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        is_rank = any(a.endswith("launch/train.py") for a in cmd.split("\0")[1:3])
        if env.get("SLURM_JOB_ID") == str(job) and env.get("RANK") == str(rank) and is_rank:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process of job {job}")
