"""The real launchers (python, deepspeed, torchrun) on a tiny model: same trajectory, resume, errors.

Tolerances: two ranks sum half batches in fp32 where one process sums the whole batch, so losses
differ by a few ulp (~1e-7 relative); through g = (l+ - l-) / (2 eps) that is ~1e-4 absolute in
the projected gradient, and ~1e-7 per update at lr 1e-3: after a handful of steps the weights
agree to ~1e-6 (measured up to 1.1e-5 on tiny Llama in tests/distributed/test_deepspeed.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN = str(ROOT / "launch" / "train.py")
STEPS = 6

pytestmark = pytest.mark.distributed


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}


def _toy_data(path: Path) -> Path:
    words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
    with path.open("w") as f:
        for i in range(80):
            f.write(json.dumps({"sentence": f"a {words[i % 2][i % 4]} film number {i}", "label": i % 2}) + "\n")
    return path


def _common(tmp: Path, out: str) -> list[str]:
    return ["--model", "tiny-llama", "--data", str(_toy_data(tmp / "toy.jsonl")), "--output_dir", str(tmp / out),
            "--no-progress", "--eval_every", "3", "data.n_train=48", "data.n_eval=16", "model.trainable=all",
            'data.label_words=[" bad", " good"]']


def _ds_config(tmp: Path, stage: int, micro: int = 4, optimizer: str = "MeZO", **params) -> Path:
    cfg = {"train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": stage},
           "optimizer": {"type": optimizer, "params": {"lr": 1e-3, "eps": 1e-3, "master_weights": True, **params}},
           "steps_per_print": 10**6}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _single(tmp: Path, out: str, *extra: str, optimizer: str = "MeZO") -> None:
    _run([sys.executable, TRAIN, *_common(tmp, out), "--steps", str(STEPS), "batch_size=8", f"optimizer.type={optimizer}",
          "optimizer.params.lr=0.001", "optimizer.params.eps=0.001", "optimizer.params.master_weights=true", *extra])


def _deepspeed(tmp: Path, out: str, ds: Path, *extra: str) -> None:
    port = str(free_port())
    _run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, TRAIN, "--ds_config", str(ds),
          *_common(tmp, out), *extra])


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(run / "final").named_parameters())


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_two_ranks_follow_the_single_process_trajectory(tmp_path: Path, stage: int) -> None:
    _single(tmp_path, "one")
    _deepspeed(tmp_path, "ds", _ds_config(tmp_path, stage), "--steps", str(STEPS))
    one, ds = _losses(tmp_path / "one"), _losses(tmp_path / "ds")
    assert sorted(ds) == list(range(1, STEPS + 1))
    for step in one:
        assert ds[step] == pytest.approx(one[step], rel=1e-5), step
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "ds")
    moved = 0.0
    for name, p in w1.items():
        torch.testing.assert_close(w2[name], p, rtol=0, atol=5e-5, msg=name)
    # The weights did move: the comparison is not between two untouched models.
    from zoscale.models import tiny_llama

    base = dict(tiny_llama().named_parameters())
    moved = max((w1[n] - base[n]).abs().max().item() for n in w1)
    assert moved > 1e-3


@pytest.mark.extended  # through the real launchers (67 s and 37 s); in-process resume: test_conformance
def test_deepspeed_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ds = _ds_config(tmp_path, 3)
    _deepspeed(tmp_path, "full", ds, "--steps", str(STEPS))
    _deepspeed(tmp_path, "parts", ds, "--steps", "4", "--checkpoint_every", "2", "save_final=false")
    assert list((tmp_path / "parts" / "checkpoints" / "step_00000004").glob("__1_*.distcp"))  # rank 1's chunks
    _deepspeed(tmp_path, "parts", ds, "--steps", str(STEPS), "--resume")
    assert _losses(tmp_path / "parts") == _losses(tmp_path / "full")
    w1, w2 = _weights(tmp_path / "full"), _weights(tmp_path / "parts")
    for name, p in w1.items():
        assert torch.equal(w2[name], p), name


def test_torchrun_replicas_follow_the_single_process_trajectory(tmp_path: Path) -> None:
    _single(tmp_path, "one")
    port = str(free_port())
    _run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, TRAIN, *_common(tmp_path, "tr"),
          "--steps", str(STEPS), "batch_size=4", "optimizer.type=MeZO", "optimizer.params.lr=0.001",
          "optimizer.params.eps=0.001", "optimizer.params.master_weights=true"])
    one, tr = _losses(tmp_path / "one"), _losses(tmp_path / "tr")
    for step in one:
        assert tr[step] == pytest.approx(one[step], rel=1e-5), step
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "tr")
    for name, p in w1.items():
        torch.testing.assert_close(w2[name], p, rtol=0, atol=5e-5, msg=name)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c.pop("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu"),
        (lambda c: c["optimizer"].update(type="SuperZO"), "SuperZO"),
        (lambda c: c["optimizer"]["params"].update(betas=[0.9, 0.9]), "betas"),
        (lambda c: c["optimizer"]["params"].update(eps=-1), "eps: -1"),
        (lambda c: c.pop("optimizer"), "no 'optimizer' section"),
    ],
)
def test_bad_deepspeed_config_stops_before_the_model_loads(tmp_path: Path, mutate, match) -> None:
    cfg = json.loads(_ds_config(tmp_path, 3).read_text())
    mutate(cfg)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    # A model that does not exist: reaching the model load would fail with a different message.
    out = subprocess.run([sys.executable, TRAIN, "--ds_config", str(bad), "--model", "/nonexistent/model"],
                         capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert out.returncode == 2 and match in out.stderr, out.stderr[-2000:]


def test_deepspeed_owned_settings_are_not_silently_ignored(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, TRAIN, "--ds_config", str(_ds_config(tmp_path, 3)), "batch_size=32"],
                         capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert out.returncode == 2 and "come from the DeepSpeed JSON" in out.stderr


def test_accelerate_launch_runs_the_same_deepspeed_job(tmp_path: Path) -> None:
    ds = _ds_config(tmp_path, 3)
    _deepspeed(tmp_path, "ds", ds, "--steps", "3")
    template = (ROOT / "launch" / "accelerate_zero3.yaml").read_text()
    acc_cfg = tmp_path / "accelerate.yaml"
    acc_cfg.write_text(template.replace("ds_configs/zero3_mezo.json", str(ds)))
    port = str(free_port())
    _run([str(VENV_BIN / "accelerate"), "launch", "--config_file", str(acc_cfg), "--main_process_port", port, TRAIN,
          *_common(tmp_path, "acc"), "--steps", "3"])
    # Same engine, same ranks, same seed: the same trajectory to the bit.
    assert _losses(tmp_path / "acc") == _losses(tmp_path / "ds")


def _torchrun(tmp: Path, out: str, nproc: int, *extra: str) -> None:
    port = str(free_port())
    _run([str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, TRAIN,
          *_common(tmp, out), *extra])


@pytest.mark.parametrize("nproc,hsdp", [(2, None), (4, "2,2")])
def test_fsdp_follows_the_single_process_trajectory(tmp_path: Path, nproc: int, hsdp: str | None) -> None:
    _single(tmp_path, "one")
    ds = _ds_config(tmp_path, 3, micro=8 // nproc)  # same JSON schema; zero_optimization is ignored
    extra = ["--hsdp", hsdp] if hsdp else []
    _torchrun(tmp_path, "fsdp", nproc, "--engine", "fsdp", "--ds_config", str(ds), "--steps", str(STEPS), *extra)
    one, fs = _losses(tmp_path / "one"), _losses(tmp_path / "fsdp")
    for step in one:
        assert fs[step] == pytest.approx(one[step], rel=1e-5), step
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "fsdp")
    for name, p in w1.items():
        torch.testing.assert_close(w2[name], p, rtol=0, atol=5e-5, msg=name)


@pytest.mark.extended  # through the real launchers (67 s and 37 s); in-process resume: test_conformance
def test_fsdp_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ds = _ds_config(tmp_path, 3)
    common = ["--engine", "fsdp", "--ds_config", str(ds)]
    _torchrun(tmp_path, "full", 2, *common, "--steps", str(STEPS))
    _torchrun(tmp_path, "parts", 2, *common, "--steps", "4", "--checkpoint_every", "2", "save_final=false")
    _torchrun(tmp_path, "parts", 2, *common, "--steps", str(STEPS), "--resume")
    assert _losses(tmp_path / "parts") == _losses(tmp_path / "full")
    w1, w2 = _weights(tmp_path / "full"), _weights(tmp_path / "parts")
    for name, p in w1.items():
        assert torch.equal(w2[name], p), name


def test_lezo_on_zero3_follows_the_single_process_trajectory(tmp_path: Path) -> None:
    _single(tmp_path, "one", "optimizer.params.sparsity=0.5", optimizer="LeZO")
    _deepspeed(tmp_path, "ds", _ds_config(tmp_path, 3, optimizer="LeZO", sparsity=0.5), "--steps", str(STEPS))
    one, ds = _losses(tmp_path / "one"), _losses(tmp_path / "ds")
    for step in one:
        assert ds[step] == pytest.approx(one[step], rel=1e-5), step
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "ds")
    for name, p in w1.items():
        torch.testing.assert_close(w2[name], p, rtol=0, atol=5e-5, msg=name)


def test_every_shipped_ds_config_is_valid() -> None:
    from zoscale.train.ds_config import load_ds_config

    configs = sorted((ROOT / "ds_configs").glob("*.json"))
    assert {c.name for c in configs} >= {"zero3_mezo.json", "zero2_mezo.json", "zero3_mezo_bf16.json", "zero3_lezo.json"}
    for c in configs:
        load_ds_config(c)


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("mode,engine", [("lora", "deepspeed"), ("prompt", "fsdp")])
def test_peft_two_ranks_follow_the_single_process_trajectory(tmp_path: Path, mode: str, engine: str) -> None:
    # MeZO's settings for the mode scaled to the tiny model (tests/unit/test_peft.py).
    lr, eps = {"lora": (0.02, 0.01), "prompt": (0.1, 0.01)}[mode]
    peft = f"model.peft.type={mode}"
    _single(tmp_path, "one", peft, f"optimizer.params.lr={lr}", f"optimizer.params.eps={eps}")
    ds = _ds_config(tmp_path, 3, lr=lr, eps=eps)
    if engine == "deepspeed":
        _deepspeed(tmp_path, "two", ds, "--steps", str(STEPS), peft)
    else:
        _torchrun(tmp_path, "two", 2, "--engine", "fsdp", "--ds_config", str(ds), "--steps", str(STEPS), peft)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # The final output of both is a peft adapter folder with the same adapters (tolerance: module docstring).
    a1, a2 = _adapters(tmp_path / "one"), _adapters(tmp_path / "two")
    assert set(a1) == set(a2) and a1
    for name, p in a1.items():
        torch.testing.assert_close(a2[name], p, rtol=0, atol=5e-5, msg=name)
    assert not (tmp_path / "two" / "final" / "model.safetensors").exists()
    # And the adapters moved far beyond that tolerance from their (seed 0) initialisation.
    from peft import PeftModel

    from zoscale.models import tiny_llama
    from zoscale.peft import adapter_parameters, apply_peft

    init = dict(adapter_parameters(apply_peft(tiny_llama(), {"type": mode}, seed=0)))
    loaded = dict(PeftModel.from_pretrained(tiny_llama(), tmp_path / "two" / "final").named_parameters())
    moved = max((loaded[n] - p).abs().max().item() for n, p in init.items())
    assert moved > 1e-2, moved
