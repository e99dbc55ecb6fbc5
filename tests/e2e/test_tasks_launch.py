"""Every task of the suite through the real launcher: `deepspeed --num_gpus 2 launch/train.py` on ZeRO-3.

One launch per task would cost ~15 s of start-up each; instead one DeepSpeed job trains the
generation task (SQuAD, the family with the most machinery: synced greedy decoding on shards)
through the launcher, `launch/evaluate.py` scores its final folder, and the whole suite trains
and evaluates from its fixtures on 2 ZeRO-3 ranks in one spawn, each task's losses equal to the
one-process run's (two ranks sum half batches: a few ulp, so 1e-5 relative, as in test_launch.py).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.distributed.spawn import run  # noqa: E402
from zoscale.train.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
VENV_BIN = Path(sys.executable).parent
SUITE = {"sst2": "SST-2", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC",
         "multirc": "MultiRC", "copa": "COPA", "record": "ReCoRD", "winogrande": "winogrande", "squad": "squad",
         "drop": "drop"}
STEPS = 2
DS = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "optimizer": {"type": "MeZO", "params": {"lr": 1e-3, "eps": 1e-3, "master_weights": True}},
      "steps_per_print": 10**6}

pytestmark = pytest.mark.distributed


def _overrides(task: str, out: Path) -> list[str]:
    generation = ["data.max_new_tokens=6"] if task in ("squad", "drop") else []
    return [f"data.task={task}", f"data.path={FIXTURES / SUITE[task]}", "model.name=tiny-llama", "model.trainable=all",
            f"steps={STEPS}", "eval_every=0", "data.n_train=8", "data.n_dev=2", "data.n_eval=5", "data.max_length=256",
            "eval_batch_size=2", f"output_dir={out}", "save_final=false", *generation]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line]


def _suite_worker(rank: int, world: int, root: str) -> None:
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from zoscale.engines.deepspeed import DeepSpeedBuilder
    from zoscale.train.trainer import train

    for task in SUITE:
        cfg = load_config(None, _overrides(task, Path(root) / task) + [
            "optimizer.params.lr=0.001", "optimizer.params.eps=0.001", "optimizer.params.master_weights=true"])
        cfg.batch_size = DS["train_micro_batch_size_per_gpu"]
        summary = train(cfg, progress=False, builder=DeepSpeedBuilder(DS))
        if rank == 0:
            (Path(root) / task / "summary.json").write_text(json.dumps(summary))


def test_every_task_trains_and_evaluates_on_zero3_like_one_process(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    from zoscale.train.trainer import train

    run(_suite_worker, 2, str(tmp_path / "zero3"))
    for task in SUITE:
        one = load_config(None, _overrides(task, tmp_path / "one" / task) + [
            "batch_size=4", "optimizer.params.lr=0.001", "optimizer.params.eps=0.001",
            "optimizer.params.master_weights=true"])
        want = train(one, progress=False)
        got = json.loads((tmp_path / "zero3" / task / "summary.json").read_text())
        assert _losses(tmp_path / "zero3" / task) == pytest.approx(_losses(tmp_path / "one" / task), rel=1e-5), task
        metrics = [k for k in want if k.endswith(("_before", "_after")) or k.startswith("dev_")]
        assert metrics, task
        for key in metrics:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (task, key)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
           "ZOSCALE_NOISE_BACKEND": "eager"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def test_generation_through_the_deepspeed_launcher_then_evaluate_py_scores_its_folder(tmp_path: Path) -> None:
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps(DS))
    out = tmp_path / "squad"
    args = [a for a in _overrides("squad", out) if not a.startswith("save_final")] + ["data.predictions=true"]
    port = str(29500 + os.getpid() % 1000)
    _run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, str(ROOT / "launch" / "train.py"),
          "--ds_config", str(ds), "--no-progress", *args])
    final = [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(predictions) == 5 and {"em", "f1", "prediction", "where"} <= set(predictions[0])
    assert final["eval_f1"] == pytest.approx(sum(p["f1"] for p in predictions) / 5)
    keep = [a for a in args if a.startswith("data.")]
    scored = _run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--model", str(out / "final"),
                   "--output_dir", str(tmp_path / "eval"), *keep])
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert summary["eval_f1"] == pytest.approx(final["eval_f1"], abs=1e-9), scored.stdout[-2000:]
    assert summary["eval_em"] == pytest.approx(final["eval_em"], abs=1e-9)
    assert summary["dev_f1"] == pytest.approx(final["dev_f1"], abs=1e-9)
