"""The engines package: the ``--engine`` registry, shard providers' capabilities, the one save_pretrained.

The sharded providers' capabilities are checked against real ZeRO-3 / FSDP2 views in
tests/distributed/test_deepspeed.py and test_fsdp.py; here, what one process can show.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.builders import whole_views
from zoscale.engines import registry
from zoscale.engines.deepspeed import DeepSpeedShards
from zoscale.engines.fsdp import FSDPShards
from zoscale.engines.local import LocalBuilder, LocalEngine
from zoscale.models import tiny_llama, tiny_tokenizer
from zoscale.shards import LocalShards, ShardCapabilities
from zoscale.train.config import TrainConfig
from zoscale.train.launch import resolve_config

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the registry
def test_an_unknown_engine_is_refused_listing_the_known_ones() -> None:
    assert registry.engine_names() == ["local", "deepspeed", "fsdp"]
    with pytest.raises(ValueError, match=r"unknown engine 'ddp'; known engines: \['local', 'deepspeed', 'fsdp'\]"):
        registry.make_builder("ddp", TrainConfig(), None)
    # The launcher refuses it while resolving the config, before any model or process group.
    args = argparse.Namespace(config=None, ds_config=None, engine="ddp", hsdp=None, overrides=[])
    with pytest.raises(ValueError, match="unknown engine 'ddp'"):
        resolve_config(args)


def test_every_registered_name_builds_its_builder() -> None:
    cfg = TrainConfig()
    cfg.model.dtype = "bfloat16"
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    for name in registry.engine_names():
        builder = registry.make_builder(name, cfg, ds)
        assert builder.name == name
    assert isinstance(registry.make_builder("local", cfg, None), LocalBuilder)
    assert registry.make_builder("fsdp", cfg, None, (1, 1)).param_dtype == torch.bfloat16


def test_register_engine_adds_a_name_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "ENGINES", dict(registry.ENGINES))
    registry.register_engine("mine")(lambda cfg, ds, hsdp: LocalBuilder())
    assert registry.engine_names()[-1] == "mine"
    with pytest.raises(ValueError, match="'mine' is already registered"):
        registry.register_engine("mine")(lambda cfg, ds, hsdp: LocalBuilder())


def test_importing_the_engines_imports_neither_deepspeed_nor_dtensor() -> None:
    script = ("import sys, zoscale.engines, zoscale.engines.registry; "
              "print(sorted(m for m in ('deepspeed', 'torch.distributed.tensor') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- capabilities
def test_providers_state_capabilities_consistent_with_their_views() -> None:
    params = list(tiny_llama(seed=0).parameters())
    assert LocalShards().capabilities == ShardCapabilities(whole_parameters=True, reduces_gradients=False,
                                                           engine="local")
    assert all(whole_views(LocalShards(), params))
    # ZeRO 0-2: whole replicas through the DeepSpeed provider; ZeRO-3 (the default) may shard.
    replicas = DeepSpeedShards(zero_stage=0)
    assert replicas.capabilities == ShardCapabilities(True, False, "deepspeed")
    assert all(whole_views(replicas, params))
    assert DeepSpeedShards().capabilities == ShardCapabilities(False, False, "deepspeed")
    assert FSDPShards().capabilities == ShardCapabilities(False, True, "fsdp")
    with pytest.raises(AttributeError):
        LocalShards().capabilities.whole_parameters = False  # frozen


# ----------------------------------------------------------------------------- saving
def test_the_local_engine_saves_a_model_folder_or_a_peft_adapter_folder(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from zoscale.peft import apply_peft, save_adapter

    model = tiny_llama(seed=0)
    LocalEngine(model).save_pretrained(tmp_path / "full", tiny_tokenizer())
    saved = load_file(tmp_path / "full" / "model.safetensors")
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    assert all(torch.equal(saved[n], p) for n, p in model.state_dict().items() if n in saved)
    peft_model = apply_peft(tiny_llama(seed=0), {"type": "lora"}, seed=1)
    LocalEngine(peft_model).save_pretrained(tmp_path / "engine", None)
    save_adapter(peft_model, tmp_path / "direct")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "engine" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    assert not (tmp_path / "engine" / "model.safetensors").exists()
