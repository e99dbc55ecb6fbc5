"""Defects found in review of the launcher's config handling (issue 11), each shown by a test.

* a ``--config`` file's DeepSpeed-owned keys were silently replaced by the DeepSpeed JSON;
* an FSDP2 run with bf16 compute recorded ``float32`` in its ``config.json``;
* an invalid ``zero_optimization.stage`` failed inside DeepSpeed after the model had loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from tests.distributed.spawn import free_port
from zoscale.train.ds_config import load_ds_config
from zoscale.train.launch import make_builder, resolve_config, run_from_args


def _ds(tmp: Path, **extra) -> Path:
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "MeZO", "params": {"lr": 1e-3, "eps": 1e-3}}, **extra}
    path = tmp / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


def _args(**kw) -> argparse.Namespace:
    base = dict(config=None, ds_config=None, engine=None, hsdp=None, overrides=[], no_progress=True,
                dist_timeout=None, heartbeat_timeout=0)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("section, key", [({"optimizer": {"type": "LeZO"}}, "optimizer"),
                                          ({"batch_size": 32}, "batch_size"),
                                          ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
                                          ({"model": {"dtype": "bfloat16"}}, "model.dtype")])
def test_a_config_file_setting_what_the_deepspeed_json_owns_is_refused(tmp_path: Path, section: dict,
                                                                        key: str) -> None:
    run_cfg = tmp_path / "run.json"
    run_cfg.write_text(json.dumps(section))
    ds = _ds(tmp_path)
    with pytest.raises(ValueError, match=rf"\['{key}'\] in --config {run_cfg} .*DeepSpeed JSON \({ds}\)"):
        resolve_config(_args(config=str(run_cfg), ds_config=str(ds)))
    run_cfg.write_text(json.dumps({"steps": 7}))  # keys the JSON does not own are fine
    assert resolve_config(_args(config=str(run_cfg), ds_config=str(ds)))[0].steps == 7


@pytest.mark.parametrize("stage", [4, -1, "3", True])
def test_an_invalid_zero_stage_is_refused_naming_the_file(tmp_path: Path, stage) -> None:
    ds = _ds(tmp_path, zero_optimization={"stage": stage})
    with pytest.raises(ValueError, match=rf"{ds}: 'zero_optimization.stage' must be 0, 1, 2 or 3"):
        load_ds_config(ds)


def test_fsdp_with_bf16_compute_records_bfloat16_and_keeps_fp32_shards(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    # A process group of one (what _init_distributed would set up), undone after the test.
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    ds = _ds(tmp_path, bf16={"enabled": True})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"sentence": f"a film {i}", "label": i % 2}) + "\n" for i in range(24)))
    out = tmp_path / "run"
    run_from_args(_args(ds_config=str(ds), engine="fsdp", overrides=[
        "model.name=tiny-llama", f"data.path={data}", "data.n_train=16", "data.n_eval=8", "steps=1", "eval_every=0",
        f"output_dir={out}", "save_final=false", 'data.label_words=[" bad", " good"]']))
    assert json.loads((out / "config.json").read_text())["model"]["dtype"] == "bfloat16"
    cfg, ds_config = resolve_config(_args(ds_config=str(ds), engine="fsdp"))
    builder = make_builder("fsdp", cfg, ds_config)
    assert (builder.load_dtype, builder.param_dtype, cfg.model.dtype) == (torch.float32, torch.bfloat16, "bfloat16")
