"""The memory planner's arithmetic and its command (issue 13, item 3), against independent references:
the published parameter counts, the dry run's shard views (what FSDP2's ``fully_shard`` and
DeepSpeed's partition arithmetic give each rank), the state a real ZO-Adam / ZO-SGD-MMT step
keeps, and the README's measured traffic. Its accuracy against measured steps is
``tests/distributed/test_plan.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoscale.dry_run import meta_model, shard_views
from zoscale.model_configs import builtin_config
from zoscale.plan import PlanConfig, model_shape, plan
from zoscale.plan_cli import main


@pytest.fixture(scope="module")
def opt13():
    return model_shape(builtin_config("opt-1.3b"), "opt-1.3b")


@pytest.mark.parametrize("name,count", [("opt-66b", 65_719_701_504), ("llama-2-70b", 68_976_648_192)])
def test_parameter_counts_are_the_published_ones(name: str, count: int) -> None:
    assert model_shape(builtin_config(name)).params == count


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_the_shard_is_rank_0s_share_as_the_engines_cut_it(opt13, engine: str) -> None:
    views = shard_views(meta_model(builtin_config("opt-1.3b")), engine, 8)
    rank0 = sum(pieces[0][1] for pieces in views.values())
    p = plan(opt13, PlanConfig(engine=engine, world=8, dtype="fp16"))
    assert p.parts["weight_shard"] == 2 * rank0


def _state_bytes_after_a_step(name: str) -> int:
    from zoscale.models import tiny_llama
    from zoscale.optim import build_optimizer

    model = tiny_llama(vocab_size=64, seed=0)
    opt = build_optimizer(name, model.named_parameters(), {"lr": 1e-4, "eps": 1e-3})
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("name", ["zo_adam", "zo_sgd_mmt", "mezo"])
def test_optimizer_state_is_what_a_real_step_keeps(name: str) -> None:
    from zoscale.models import tiny_llama

    shape = model_shape(tiny_llama(vocab_size=64, seed=0).config)
    p = plan(shape, PlanConfig(engine="replicas", world=1, dtype="fp32", optimizer=name))
    assert p.parts["optimizer_state"] == _state_bytes_after_a_step(name)


def test_master_weights_add_one_fp32_shard_and_peft_trains_only_adapters(opt13) -> None:
    base = plan(opt13, PlanConfig(engine="fsdp", world=8, dtype="bf16"))
    master = plan(opt13, PlanConfig(engine="fsdp", world=8, dtype="bf16", master_weights=True))
    assert master.parts["master"] == 2 * base.parts["weight_shard"]
    lora = plan(opt13, PlanConfig(engine="fsdp", world=8, dtype="bf16", peft="lora", optimizer="zo_adam"))
    assert lora.trainable == 24 * 8 * 4 * 2048  # r=8 A and B on q and v, 24 layers
    assert lora.parts["optimizer_state"] == 2 * 4 * lora.trainable


def test_traffic_is_the_readmes_measured_formula() -> None:
    from transformers import LlamaConfig

    smol = model_shape(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True))
    t = plan(smol, PlanConfig(engine="zero3", world=8, dtype="fp32")).traffic
    assert t["all_gather_received"] == pytest.approx(2 * 7 / 8 * smol.params * 4)
    assert round(t["all_gather_received"] / 1e9, 2) == 0.94  # README's scaling table
    h = plan(smol, PlanConfig(engine="hsdp", world=64, dtype="fp32")).traffic
    assert h["all_gather_from_other_nodes"] == 0 and h["optimizer_all_reduce_payload"] == 16


def test_the_command_prints_a_table_json_and_the_largest_fitting(capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", "opt-13b", "--world", "8"]) == 0
    assert "peak per rank" in capsys.readouterr().out
    assert main(["--model", "all", "--engine", "replicas", "--world", "1", "--dtype", "fp16", "--seq-len", "400",
                 "--gpu-memory", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["largest_fitting"] == "opt-30b"  # MeZO: one 80 GB A100 fine-tunes OPT-30B
    by = {p["model"]: p for p in out["plans"]}
    assert by["opt-30b"]["peak_bytes"] <= 80 * 2**30 < by["opt-66b"]["peak_bytes"]


def test_a_ds_config_sets_dtype_optimizer_and_zero3_limits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2,
                               "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1e6},
                               "optimizer": {"type": "ZO-Adam", "params": {"master_weights": True}}}))
    assert main(["--model", "opt-1.3b", "--ds_config", str(cfg), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["plans"][0]["config"]
    assert (c["dtype"], c["optimizer"], c["master_weights"], c["micro_batch"], c["prefetch_bucket"]) == \
        ("bf16", "zo_adam", True, 2, 1_000_000)


def test_a_hugging_face_folder_is_planned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from zoscale.models import tiny_llama

    tiny_llama(vocab_size=64, seed=0).config.save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--engine", "fsdp", "--world", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"][0]["params"] == \
        sum(p.numel() for p in tiny_llama(vocab_size=64, seed=0).parameters())


@pytest.mark.parametrize("argv,message", [
    (["--model", "opt-7b"], "unknown built-in model 'opt-7b'"),
    (["--model", "{tmp}"], "has no config.json"),
    (["--model", "opt-1.3b", "--ds_config", "{tmp}/missing.json"], "missing.json: no such file"),
    (["--model", "opt-1.3b", "--ds_config", "{tmp}/bad.json"], "optimizer.type 'AdamW' is not one the planner knows"),
    (["--model", "opt-1.3b", "--engine", "hsdp", "--world", "12"], "multiple of gpus_per_node"),
])
def test_bad_input_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert message in capsys.readouterr().err
