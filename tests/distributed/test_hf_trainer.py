"""ZOTrainer on DeepSpeed ZeRO-3 and on accelerate's FSDP2 plugin, 2 gloo ranks: the one-process
trajectory, no first-order optimizer ever built.

The user's script as transformers documents it for ZeRO-3: ``TrainingArguments(deepspeed=<JSON>)``
first, then ``from_pretrained`` (partitioned while it loads), then the trainer. The JSON is a
zoscale one with ``"auto"`` values for transformers to fill in. For FSDP2:
``TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2})`` and a plainly loaded model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.cpu_deepspeed import import_deepspeed

deepspeed = import_deepspeed()

from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from tests.distributed.accelerate_on_cpu import cpu_as_a_device, cpu_as_a_gpu_for_fsdp  # noqa: E402
from tests.distributed.builders import full_params  # noqa: E402
from tests.distributed.spawn import run  # noqa: E402
from tests.unit.test_hf_trainer import (BATCH, EPS, INSTRUCTIONS, LR, SEED, SFT_LR, STEPS, _by_hand, _data,  # noqa: E402
                                       collate, sft_args, sft_trainer, with_lora)
from zoscale.engines import DeepSpeedShards  # noqa: E402
from zoscale.hf import ZO_CHECKPOINT_DIR, ZOTrainer  # noqa: E402
from zoscale.hf.agree import make_ranks_agree  # noqa: E402
from zoscale.models import tiny_llama  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
ATOL = 5e-5  # weights against one process: the README's engine tolerance (tests/distributed/test_deepspeed.py)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    # "auto" threshold: 10 x hidden (640) keeps the tiny Llama's norms whole and shards the rest.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto",
                          "stage3_prefetch_bucket_size": "auto"},
    "optimizer": {"type": "MeZO", "params": {"lr": "auto", "eps": EPS}},
}


def _args(out: str, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=out, per_device_train_batch_size=BATCH // WORLD, max_steps=STEPS, learning_rate=LR,
                lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                train_sampling_strategy="sequential", max_grad_norm=0.0, seed=SEED, disable_tqdm=True,
                deepspeed=DS_CONFIG)  # not use_cpu: accelerate then drops DeepSpeed (its DeepSpeed branch is "not cpu")
    return TrainingArguments(**{**base, **kw})


FSDP2 = dict(deepspeed=None, fsdp=True, fsdp_config={"version": 2})


def _trainer(folder: str, out: str, wrap: Any = None, **kw: Any) -> ZOTrainer:
    args = _args(out, **kw)  # before from_pretrained: transformers partitions the model as it loads
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert all(hasattr(p, "ds_tensor") for p in model.parameters()) == (args.deepspeed is not None)
    model = wrap(model) if wrap is not None else model
    return ZOTrainer(model=model, args=args, train_dataset=_data(n=STEPS * BATCH * 2), data_collator=collate)


class _StopAt(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 2:
            control.should_training_stop = True
        return control


def _check_zero3(trainer: ZOTrainer) -> None:
    engine, opt = trainer.model_wrapped, trainer.zo_optimizer
    # DeepSpeed built its parameter partitioning only: no ZeRO optimizer (no fp32 partitions,
    # no gradient buffers); the zoscale optimizer steps on the ZeRO-3 shards.
    assert isinstance(engine, deepspeed.DeepSpeedEngine) and trainer.deepspeed is engine
    assert type(engine.optimizer) is DeepSpeedZeRoOffload
    assert not hasattr(engine.optimizer, "fp32_partitioned_groups_flat")
    assert isinstance(opt.shards, DeepSpeedShards) and not opt.shards.capabilities.whole_parameters
    # "auto" values from the TrainingArguments and the model.
    assert engine.train_micro_batch_size_per_gpu() == BATCH // WORLD and engine.train_batch_size() == BATCH
    assert engine.zero_optimization_stage() == 3
    assert engine.zero_param_persistence_threshold() == 10 * trainer.model.config.hidden_size
    persistent = [p.ds_persist for p in trainer.model.parameters()]
    assert any(persistent) and not all(persistent), persistent
    assert all(p.data.numel() == 0 for p in trainer.model.parameters() if not p.ds_persist)  # partitioned


def _check_fsdp2(trainer: ZOTrainer) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from zoscale.engines.fsdp import FSDPShards

    assert trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 2
    model = trainer.model
    assert isinstance(model, FSDPModule) and trainer.model_wrapped is model
    assert isinstance(trainer.zo_optimizer.shards, FSDPShards)
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    # Sharded: each rank holds about half of every weight's rows.
    assert sum(p.to_local().numel() for p in params) < 0.6 * sum(p.numel() for p in params)
    # The ZO optimizer steps on the very DTensors the model holds (no copies).
    stepped = {id(p) for group in trainer.zo_optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in params}
    assert trainer.accelerator._models == [model]  # accelerate prepared no second copy of it


def _worker(rank: int, world: int, folder: str, out: str, engine: str) -> None:
    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"
    (cpu_as_a_gpu_for_fsdp if engine == "fsdp2" else cpu_as_a_device)()
    kw = FSDP2 if engine == "fsdp2" else {}
    results: dict[str, Any] = {}
    trainer = _trainer(folder, f"{out}/run", **kw)
    trainer.train()
    (_check_fsdp2 if engine == "fsdp2" else _check_zero3)(trainer)
    assert all(p.grad is None for p in trainer.model.parameters())
    results["log"] = trainer.zo_optimizer.step_log
    results["params"] = full_params(trainer.model)
    trainer.save_model(f"{out}/final")

    # Interrupted at step 2 (checkpoint-2 written), then resumed by a fresh trainer and model.
    cut = _trainer(folder, f"{out}/cut", save_strategy="steps", save_steps=2, **kw)
    cut.add_callback(_StopAt())
    cut.train()
    ckpt = f"{out}/cut/checkpoint-2"
    assert (Path(ckpt) / ZO_CHECKPOINT_DIR / "step_00000002" / "done").is_file()
    resumed = _trainer(folder, f"{out}/cut", save_strategy="steps", save_steps=2, **kw)
    resumed.train(resume_from_checkpoint=ckpt)
    results["resumed_log"] = resumed.zo_optimizer.step_log
    results["resumed_params"] = full_params(resumed.model)

    # Gradient accumulation: 2 micro-batches of 1 per rank and step, the same 4 rows per step.
    ga = _trainer(folder, f"{out}/ga", per_device_train_batch_size=BATCH // WORLD // 2, gradient_accumulation_steps=2,
                  **kw)
    ga.train()
    results["ga_log"] = ga.zo_optimizer.step_log
    results["ga_params"] = full_params(ga.model)

    # A user's LoRA model, its adapters drawn differently on each rank (no common seed): the
    # engine must start every rank from rank 0's adapters.
    lora = _trainer(folder, f"{out}/lora", wrap=lambda m: with_lora(m, seed=rank), **kw)
    lora.train()
    results["lora_log"] = lora.zo_optimizer.step_log
    results["lora_params"] = full_params(lora.model)
    lora.save_model(f"{out}/adapter")

    # trl's SFTTrainer with the ZO step: instruction records, completion-only loss, LoRA from its peft_config.
    # The JSON without its optimizer section: ZOSFTTrainer gets zo_config (both ways is refused).
    sharding = kw or {"deepspeed": {k: v for k, v in DS_CONFIG.items() if k != "optimizer"}}
    args = sft_args(Path(out) / "sft", STEPS, SFT_LR, per_device_train_batch_size=len(INSTRUCTIONS) // WORLD,
                    use_cpu=False, bf16=False, **sharding)  # trl defaults to bf16, which needs a GPU
    sft = sft_trainer(args, AutoModelForCausalLM.from_pretrained(folder))  # partitioned at load under ZeRO-3
    sft.train()
    results["sft_log"] = sft.zo_optimizer.step_log
    results["sft_params"] = full_params(sft.model)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_sharded_trainer_follows_the_single_process_trajectory(tmp_path: Path, engine: str) -> None:
    folder = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(folder)
    run(_worker, WORLD, str(folder), str(tmp_path), engine)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref_losses, ref_opt, ref_model = _by_hand()
    ref = {n: p.detach() for n, p in ref_model.named_parameters()}
    got = ranks[0]
    # Every rank saw the same averaged losses and holds the same full weights.
    assert got["log"] == ranks[1]["log"]
    for n, p in got["params"].items():
        assert torch.equal(p, ranks[1]["params"][n]), n
    # Against one process on the whole batch (the optimizer by hand, which ZOTrainer equals bit for
    # bit on one process): the loss of two half batches' token sums over the global token count,
    # averaged over ranks, differs from the whole batch's in the last bits; the projected gradient
    # amplifies that by 1/(2 eps). Within the engines' documented tolerance, far below how far the
    # weights moved.
    assert len(got["log"]) == STEPS
    for mine, want in zip(got["log"], ref_opt.step_log):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert mine["lr"] == want["lr"]
    assert got["params"].keys() == ref.keys()
    for n, p in ref.items():
        torch.testing.assert_close(got["params"][n], p, rtol=0, atol=ATOL, msg=n)
    start = dict(tiny_llama(seed=0).named_parameters())
    assert max((p - start[n].detach()).abs().max().item() for n, p in ref.items()) > 20 * ATOL
    # save_model consolidated the shards into a Hugging Face folder.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for n, p in loaded.named_parameters():
        assert torch.equal(p.detach(), got["params"][n]), n
    # The interrupted and resumed run equals the uninterrupted one bit for bit.
    assert got["resumed_log"] == got["log"]
    for n, p in got["params"].items():
        assert torch.equal(got["resumed_params"][n], p), n
    _check_accumulation(got)
    _check_lora(ranks, tmp_path / "adapter")
    _check_sft(got, tmp_path / "sft_ref")


def _check_sft(got: dict[str, Any], out: Path) -> None:
    """ZOSFTTrainer on the shards: the one-process ZOSFTTrainer run (whole batch of records)."""
    ref = sft_trainer(sft_args(out, STEPS, SFT_LR))
    ref.train()
    assert len(got["sft_log"]) == STEPS
    for mine, want in zip(got["sft_log"], ref.zo_optimizer.step_log):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for n, p in ref.model.named_parameters():
        torch.testing.assert_close(got["sft_params"][n], p.detach(), rtol=0, atol=ATOL, msg=n)


def _check_accumulation(got: dict[str, Any]) -> None:
    """One ZO step per optimizer step over both micro-batches of both ranks: the one-process run."""
    _, ref_opt, ref_model = _by_hand()
    assert len(got["ga_log"]) == STEPS
    for mine, want in zip(got["ga_log"], ref_opt.step_log):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(got["ga_params"][n], p.detach(), rtol=0, atol=ATOL, msg=n)


def _check_lora(ranks: list[dict[str, Any]], adapter: Path) -> None:
    """Rank 0's adapters trained on the one-process trajectory; the base never moved; the saved
    adapter folder holds the trained adapters."""
    from peft import PeftModel

    got = ranks[0]
    assert got["lora_log"] == ranks[1]["lora_log"]
    for n, p in got["lora_params"].items():
        assert torch.equal(p, ranks[1]["lora_params"][n]), n
    _, ref_opt, ref_model = _by_hand(model=with_lora(tiny_llama(seed=0), seed=0))
    for mine, want in zip(got["lora_log"], ref_opt.step_log):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
    ref = {n: p.detach() for n, p in ref_model.named_parameters()}
    assert got["lora_params"].keys() == ref.keys()
    for n, p in ref.items():
        torch.testing.assert_close(got["lora_params"][n], p, rtol=0, atol=ATOL, msg=n)
    start = {n: p.detach() for n, p in with_lora(tiny_llama(seed=0), seed=0).named_parameters()}
    moved = {n for n, p in got["lora_params"].items() if not torch.equal(p, start[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(adapter))
    for n, p in loaded.named_parameters():
        assert torch.equal(p.detach(), got["lora_params"][n]), n


def test_a_first_order_optimizer_in_the_json_is_refused(tmp_path: Path) -> None:
    cfg = {**DS_CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], deepspeed=cfg)
    try:
        with pytest.raises(ValueError, match="'AdamW', which is not a zoscale optimizer"):
            ZOTrainer(model=tiny_llama(seed=0), args=args, train_dataset=_data(), data_collator=collate)
    finally:  # this runs in pytest's process: later tests must not build models under ZeRO-3
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not is_deepspeed_zero3_enabled()


def _replica_worker(rank: int, world: int, out: str) -> None:
    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"
    # torchrun-style replicas on CPU: use_cpu gives accelerate's gloo multi-CPU state; no DeepSpeed.
    args = _args(out, deepspeed=None, use_cpu=True)
    assert args.world_size == WORLD
    trainer = ZOTrainer(model=tiny_llama(seed=rank), args=args, train_dataset=_data(), data_collator=collate)
    trainer.train()  # rank 1 starts from other weights: the trainer broadcasts rank 0's, as DDP would
    assert trainer.model_wrapped is trainer.model  # no DDP wrapper: replicas apply the same seeded update
    with pytest.raises(ValueError, match="the ranks hold different models"):  # and refused by name
        make_ranks_agree(torch.nn.Linear(4, 4 + rank))
    torch.save({"log": trainer.zo_optimizer.step_log, "params": full_params(trainer.model)}, f"{out}/rank{rank}.pt")


def test_replicas_follow_the_single_process_trajectory(tmp_path: Path) -> None:
    run(_replica_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["log"] == ranks[1]["log"]
    for n, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][n]), n  # the replicas stay identical, bit for bit
    ref_losses, ref_opt, ref_model = _by_hand()
    for mine, want in zip(ranks[0]["log"], ref_opt.step_log):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][n], p.detach(), rtol=0, atol=ATOL, msg=n)


def _hsdp_worker(rank: int, world: int, folder: str, out: str) -> None:
    from accelerate.parallelism_config import ParallelismConfig

    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"
    cpu_as_a_gpu_for_fsdp()
    hsdp = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)  # accelerate's HSDP: 2 replicas of 2 shards
    trainer = _trainer(folder, f"{out}/run", per_device_train_batch_size=BATCH // world, parallelism_config=hsdp,
                       **FSDP2)
    trainer.train()
    mesh = trainer.zo_engine.mesh
    assert mesh.mesh_dim_names == ("replicate", "shard") and tuple(mesh.shape) == (2, 2)
    local = {n: p.to_local().clone() for n, p in trainer.model.named_parameters()}
    torch.save({"log": trainer.zo_optimizer.step_log, "params": full_params(trainer.model), "local": local},
               f"{out}/rank{rank}.pt")


def test_hsdp_through_the_plugins_parallelism_config_follows_the_single_process_trajectory(tmp_path: Path) -> None:
    folder = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(folder)
    run(_hsdp_worker, 4, str(folder), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    # Ranks r and r + 2 are the same shard in the two replicas: equal local rows; r and r + 1 differ.
    for r in (0, 1):
        for n, p in ranks[r]["local"].items():
            assert torch.equal(p, ranks[r + 2]["local"][n]), (r, n)
    assert any(not torch.equal(p, ranks[1]["local"][n]) for n, p in ranks[0]["local"].items())
    _, ref_opt, ref_model = _by_hand()
    for mine, want in zip(ranks[0]["log"], ref_opt.step_log):
        assert mine["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][n], p.detach(), rtol=0, atol=ATOL, msg=n)
