"""``launch/hf_trainer.py`` (a plain Trainer script with ZOTrainer) under python and ``accelerate launch``.

``accelerate launch`` with the shipped configs, ``launch/accelerate_zero3.yaml`` (DeepSpeed
ZeRO-3, its optimizer from ``ds_configs/zero3_mezo.json``) and ``launch/accelerate_fsdp2.yaml``
(accelerate's FSDP2 plugin): the Trainer builds its DeepSpeed or FSDP plugin from the environment
accelerate exports, not from ``TrainingArguments``. accelerate takes those branches only on
accelerators, so the launched ranks run with ``tests/distributed/accelerate_on_cpu.py``'s shim
(through ``shim_site/sitecustomize.py``); zoscale is not patched. The two engines split each
global batch alike (8 rows a rank, the same padding), so they must follow one trajectory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.accelerate_on_cpu import ENV
from tests.distributed.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "launch" / "hf_trainer.py")
SHIM_SITE = ROOT / "tests" / "distributed" / "shim_site"
STEPS = 5  # the script logs every 5 steps: one logged loss (the mean of steps 1-5)
ATOL = 5e-5  # two engines on the same per-rank batches: the README's engine tolerance

pytestmark = pytest.mark.distributed


def _run(cmd: list[str], shim: str | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ZOSCALE_NOISE_BACKEND": "eager",
           "PYTHONPATH": os.pathsep.join([str(SHIM_SITE), str(ROOT)] if shim else [str(ROOT)])}
    if shim:
        env[ENV] = shim
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


def _accelerate(config: str, out: Path, shim: str) -> str:
    return _run([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", config,
                 "--main_process_port", str(free_port()), SCRIPT, "--max_steps", str(STEPS), "--save_steps", "2",
                 "--output_dir", str(out)], shim=shim)


def _losses(out: Path) -> list[float]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_accelerate_launch_zero3_and_fsdp2_follow_one_trajectory(tmp_path: Path) -> None:
    said = {"zero3": _accelerate("launch/accelerate_zero3.yaml", tmp_path / "zero3", "deepspeed"),
            "fsdp2": _accelerate("launch/accelerate_fsdp2.yaml", tmp_path / "fsdp2", "fsdp")}
    assert "(MeZO on DeepSpeedEngine, 2 rank(s))" in said["zero3"], said["zero3"]
    assert "(MeZO on FSDPEngine, 2 rank(s))" in said["fsdp2"], said["fsdp2"]
    for name in said:
        assert (tmp_path / name / f"checkpoint-{STEPS}" / "zoscale" / f"step_{STEPS:08d}" / "done").is_file()
    # On the same batches the engines agree.
    zero3, fsdp2 = _losses(tmp_path / "zero3"), _losses(tmp_path / "fsdp2")
    assert zero3 and zero3 == pytest.approx(fsdp2, rel=1e-5)
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in said)
    start = load_file(tmp_path / "zero3" / "checkpoint-2" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=key)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 0  # steps 3-5 moved the weights


def test_the_script_runs_on_one_process(tmp_path: Path) -> None:
    said = _run([sys.executable, SCRIPT, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(tmp_path)])
    assert "(MeZO on LocalEngine, 1 rank(s))" in said, said
    assert (tmp_path / "final" / "model.safetensors").is_file()
