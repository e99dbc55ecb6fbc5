"""Two "nodes" on this machine, without SLURM: one launcher per node, as on a cluster.

* DeepSpeed: a hostfile with two hosts of one slot each, and on each node
  ``deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1`` (no ssh, no pdsh);
  ZeRO-3 shards every tensor across the two nodes.
* torchrun: ``torchrun --nnodes 2 --node_rank N --master_addr 127.0.0.1`` (static rendezvous);
  FSDP2 shards across the two nodes.

Both follow the single-process trajectory (the whole batch in one process). Tolerance as in
tests/e2e/test_launch.py: the mean of two half-batch fp32 means differs from the whole-batch mean
by a few ulp (<= 1e-6 relative measured), so the losses agree to 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN = str(ROOT / "launch" / "train.py")
STEPS = 5

pytestmark = pytest.mark.distributed


def env() -> dict[str, str]:
    # Eager noise kernels: no torch.compile in each of the ranks; the reference uses them too.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
            "ZOSCALE_NOISE_BACKEND": "eager"}


def toy_data(path: Path) -> Path:
    words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
    with path.open("w") as f:
        for i in range(80):
            f.write(json.dumps({"sentence": f"a {words[i % 2][i % 4]} film number {i}", "label": i % 2}) + "\n")
    return path


def common(tmp: Path, out: str) -> list[str]:
    data = tmp / "toy.jsonl"
    if not data.exists():
        toy_data(data)
    return ["--model", "tiny-llama", "--data", str(data), "--output_dir", str(tmp / out), "--no-progress",
            "--eval_every", "0", "data.n_train=48", "data.n_eval=16", "model.trainable=all",
            'data.label_words=[" bad", " good"]', "save_final=false"]


def ds_config(tmp: Path, micro: int = 4) -> Path:
    cfg = {"train_micro_batch_size_per_gpu": micro,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "MeZO", "params": {"lr": 1e-3, "eps": 1e-3, "master_weights": True}},
           "steps_per_print": 10**6}
    path = tmp / "zero3.json"
    path.write_text(json.dumps(cfg))
    return path


def deepspeed_node(tmp: Path, node: int, port: int, args: list[str]) -> list[str]:
    """One node's DeepSpeed launcher for a job of 2 nodes x 1 rank."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    return [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN, *args]


def torchrun_node(node: int, port: int, args: list[str], nproc: int = 1) -> list[str]:
    """One node's torchrun for a job of 2 nodes x ``nproc`` ranks."""
    return [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN, *args]


def run_nodes(cmds: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every node's launcher at once; wait for all; all must succeed."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
             for c in cmds]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for o in outs:
        assert o.returncode == 0, "\n".join(f"--- node {i} (rc {x.returncode})\n{x.stdout[-4000:]}"
                                            for i, x in enumerate(outs))
    return outs


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("multinode_ref")
    cmd = [sys.executable, TRAIN, *common(tmp, "one"), "--steps", str(STEPS), "batch_size=8",
           "optimizer.params.lr=0.001", "optimizer.params.eps=0.001", "optimizer.params.master_weights=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(tmp / "one")


def _assert_same(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    assert len(set(want.values())) > 1  # the loss moves: the comparison is not between constants


def test_deepspeed_launcher_on_two_nodes_follows_the_single_process_run(tmp_path: Path,
                                                                         reference: dict[int, float]) -> None:
    port = free_port()
    args = ["--ds_config", str(ds_config(tmp_path)), *common(tmp_path, "ds"), "--steps", str(STEPS),
            "--checkpoint_every", str(STEPS)]
    outs = run_nodes([deepspeed_node(tmp_path, n, port, args) for n in (0, 1)])
    assert "--node_rank=1" in outs[1].stdout and '"world_size": 2' in outs[0].stdout
    _assert_same(losses(tmp_path / "ds"), reference)
    # Each node's rank wrote its ZeRO-3 chunks of the checkpoint.
    ckpt = tmp_path / "ds" / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name.split("_")[2] for p in ckpt.glob("__*.distcp")) == ["0", "1"]


def test_torchrun_on_two_nodes_follows_the_single_process_run(tmp_path: Path, reference: dict[int, float]) -> None:
    port = free_port()
    args = ["--engine", "fsdp", "--ds_config", str(ds_config(tmp_path)), *common(tmp_path, "fsdp"), "--steps",
            str(STEPS)]
    outs = run_nodes([torchrun_node(n, port, args) for n in (0, 1)])
    assert '"world_size": 2' in outs[0].stdout
    _assert_same(losses(tmp_path / "fsdp"), reference)


def test_across_two_nodes_hsdp_and_replicas_send_only_the_loss_pair(tmp_path: Path) -> None:
    """benchmarks/bench_scaling.py on 2 nodes x 2 ranks (torchrun launchers): counted bytes per step.

    The optimizer issues one all-reduce of the loss pair (2 float64) per step, whatever the
    engine; ZeRO-3's forwards all-gather every parameter twice per step across the nodes; HSDP's
    all-gathers stay inside a node and replicas gather nothing, so what crosses the nodes is the
    loss pair only.
    """
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scaling.py"), "--shape", "tiny",
                           "--layouts", "2x2", "--engines", "zero3", "hsdp", "replicas", "--steps", "2",
                           "--timeout", "400"],
                          capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    records = {r["engine"]: r for r in json.loads(done.stdout)["records"]}
    assert set(records) == {"zero3", "hsdp", "replicas"}
    ring = 2 * (4 - 1) / 4  # a ring all-reduce moves 2(g-1)/g of the tensor through each rank
    for engine, r in records.items():
        assert (r["nodes"], r["ranks_per_node"]) == (2, 2)
        assert r["optimizer"]["ops"] == ["all_reduce"] and r["optimizer"]["calls_per_step"] == 1, engine
        assert r["optimizer"]["payload_bytes_per_step"] == 16, engine
        assert r["optimizer"]["inter_node_wire_bytes_per_step"] == ring * 16, engine
    param_bytes = records["zero3"]["param_bytes"]
    # ZeRO-3: each of the 2 forwards gathers every parameter over all 4 ranks, across the nodes.
    assert records["zero3"]["forward"]["payload_bytes_per_step"] == 2 * param_bytes
    assert records["zero3"]["forward"]["inter_node_wire_bytes_per_step"] == 2 * param_bytes * 3 / 4
    # HSDP: the same parameters gathered inside each node's 2-rank shard group, nothing across.
    assert records["hsdp"]["forward"]["payload_bytes_per_step"] >= 2 * param_bytes  # FSDP pads rows
    assert records["hsdp"]["forward"]["inter_node_wire_bytes_per_step"] == 0
    assert records["hsdp"]["forward"]["wire_bytes_per_step"] > 0
    assert records["replicas"]["forward"]["calls_per_step"] == 0
