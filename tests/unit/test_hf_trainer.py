"""ZOTrainer (transformers.Trainer with a zoscale optimizer) on one process, on the tiny Llama.

The reference everywhere is a plain loop calling the zoscale optimizer by hand on the same
batches: ``opt.step(lambda: model(**batch).loss)``. Trainer's loss for a causal LM is the summed
token loss divided by the step's token count (``num_items_in_batch``), the model's own mean in
another order of operations; on these batches (no padding) the two agree bit for bit, and so do
the trajectories (asserted with ``==`` / ``torch.equal``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from zoscale.hf import ZO_CHECKPOINT_DIR, LoopOptimizer, ZOTrainer, resolve_zo_config
from zoscale.models import tiny_llama
from zoscale.optim import MeZO

STEPS, BATCH, SEQ = 4, 4, 16
LR, EPS, SEED = 1e-3, 1e-3, 3


@pytest.fixture(autouse=True)
def _eager_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference implementation of the noise: no kernel compile in these short runs.
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _data(n: int = STEPS * BATCH, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(2, 260, (SEQ,), generator=g)} for _ in range(n)]
    for r in rows:
        r["labels"] = r["input_ids"].clone()
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                train_sampling_strategy="sequential", use_cpu=True, max_grad_norm=0.0, seed=SEED,
                disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _trainer(out: Path, zo: dict[str, Any] | None = None, data: Any = None, model: Any = None,
             **kw: Any) -> ZOTrainer:
    return ZOTrainer(model=model if model is not None else tiny_llama(seed=0), args=_args(out, **kw),
                     train_dataset=data if data is not None else _data(), data_collator=collate,
                     zo_config=zo if zo is not None else {"type": "MeZO", "params": {"eps": EPS}})


def with_lora(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with LoRA adapters on the attention query and value projections, as a user adds
    them (``peft.get_peft_model``); ``seed`` draws their initial values."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def _by_hand(lrs: list[float] | None = None, batch: int = BATCH,
             model: torch.nn.Module | None = None) -> tuple[list[float], MeZO, torch.nn.Module]:
    """The plain loop: MeZO on the same batches in the same order (on ``model``'s trainable
    parameters, the tiny Llama by default), lr set per step if given."""
    model = model if model is not None else tiny_llama(seed=0)
    model.eval()
    opt = MeZO([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=LR, eps=EPS, seed=SEED)
    data = _data()
    losses = []
    for s in range(STEPS):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[s]
        b = collate(data[s * batch:(s + 1) * batch])
        losses.append(opt.step(lambda: model(**b).loss))
    return losses, opt, model


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), (n, (a[n] - b[n]).abs().max().item())


def test_trajectory_equals_the_optimizer_by_hand(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.train()
    ref_losses, ref_opt, ref_model = _by_hand()
    opt = trainer.zo_optimizer
    assert isinstance(opt, MeZO) and isinstance(trainer.optimizer, LoopOptimizer)
    assert opt.step_count == STEPS  # one ZO step per optimizer step
    # Bitwise: the same losses (every SPSA pair), projected gradients and final weights.
    assert opt.step_log == ref_opt.step_log
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(ref_losses, rel=1e-6)  # the Trainer's log holds the ZO step's loss
    _assert_equal_weights(_params(trainer.model), _params(ref_model))
    start = _params(tiny_llama(seed=0))
    assert max((p - start[n]).abs().max().item() for n, p in _params(trainer.model).items()) > 1e-4  # it moved
    # No first-order machinery ran: no gradient exists anywhere.
    assert all(p.grad is None for p in trainer.model.parameters())


def test_weights_change_only_by_the_zo_rule(tmp_path: Path) -> None:
    """The step log, replayed onto the initial weights (noise passes only, no forward), gives the
    trained weights bit for bit: nothing but the ZO updates touched them."""
    trainer = _trainer(tmp_path)
    trainer.train()
    base = tiny_llama(seed=0)
    replayer = MeZO(base.named_parameters(), lr=LR, eps=EPS, seed=SEED)
    replayer.replay(trainer.zo_optimizer.step_log)
    _assert_equal_weights(_params(base), _params(trainer.model))


def test_the_lr_scheduler_drives_the_zo_lr(tmp_path: Path) -> None:
    warmup = 2
    trainer = _trainer(tmp_path, lr_scheduler_type="linear", warmup_steps=warmup)
    trainer.train()
    # transformers' linear schedule: lr * s / warmup, then lr * (T - s) / (T - warmup).
    want = [LR * s / warmup if s < warmup else LR * (STEPS - s) / (STEPS - warmup) for s in range(STEPS)]
    got = [r["lr"][0] for r in trainer.zo_optimizer.step_log]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[0] == 0.0 and got[2] == pytest.approx(LR)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx(want)
    ref_losses, ref_opt, ref_model = _by_hand(lrs=got)
    assert trainer.zo_optimizer.step_log == ref_opt.step_log
    _assert_equal_weights(_params(trainer.model), _params(ref_model))


def test_gradient_accumulation_is_one_zo_step_over_the_micro_batches(tmp_path: Path) -> None:
    calls: list[int] = []
    model = tiny_llama(seed=0)
    model.register_forward_hook(lambda mod, inp, out: calls.append(1))
    trainer = _trainer(tmp_path / "ga", model=model, per_device_train_batch_size=BATCH // 2,
                       gradient_accumulation_steps=2)
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.step_count == STEPS and len(opt.step_log) == STEPS
    assert len(calls) == STEPS * 2 * 2  # per step: 2 SPSA evaluations x 2 micro-batches
    # The same examples as one batch of 4 per step: the step's loss is the accumulated batch's
    # token mean (sum of the micro-batches' sums over the step's token count), equal to the
    # whole batch's up to rounding.
    ref_losses, ref_opt, ref_model = _by_hand()
    for got, want in zip(opt.step_log, ref_opt.step_log):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for n, p in _params(ref_model).items():
        torch.testing.assert_close(dict(trainer.model.named_parameters())[n].detach(), p, rtol=0, atol=1e-5)


def test_checkpoint_and_resume_continue_the_same_trajectory(tmp_path: Path) -> None:
    kw = dict(save_strategy="steps", save_steps=2, lr_scheduler_type="linear", train_sampling_strategy="random")
    data = _data(n=STEPS * BATCH * 2)  # two epochs' worth of batches, shuffled: the resume must skip right
    full = _trainer(tmp_path / "full", data=data, **kw)
    full.train()

    class StopAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step == 2:
                control.should_training_stop = True
            return control

    cut = _trainer(tmp_path / "cut", data=data, **kw)
    cut.add_callback(StopAt())
    cut.train()
    assert cut.zo_optimizer.step_count == 2
    ckpt = tmp_path / "cut" / "checkpoint-2"
    zo_dir = ckpt / ZO_CHECKPOINT_DIR / "step_00000002"
    assert (zo_dir / "done").is_file() and (zo_dir / "manifest.json").is_file()
    assert (ckpt / "scheduler.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "model.safetensors").is_file()

    resumed = _trainer(tmp_path / "cut", data=data, **kw)  # a fresh process would build the base model again
    resumed.train(resume_from_checkpoint=str(ckpt))
    opt = resumed.zo_optimizer
    assert opt.step_count == STEPS
    assert opt.step_log == full.zo_optimizer.step_log  # the logged steps 0-1 came back, 2-3 are the same
    _assert_equal_weights(_params(resumed.model), _params(full.model))


def test_resume_from_a_folder_without_zo_state_is_refused(tmp_path: Path) -> None:
    first = _trainer(tmp_path, save_strategy="steps", save_steps=2, save_only_model=True)
    first.train()
    with pytest.raises(ValueError, match="holds no zoscale checkpoint"):
        _trainer(tmp_path, save_strategy="steps").train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_save_model_writes_a_hugging_face_folder(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    _assert_equal_weights(_params(loaded), _params(trainer.model))


def test_a_peft_model_trains_its_adapters_only_and_saves_them(tmp_path: Path) -> None:
    """A user's LoRA model (``get_peft_model``) in ZOTrainer: the ZO step perturbs and updates the
    adapters only, on the trajectory of MeZO by hand on them, and save_model writes the adapter."""
    from peft import PeftModel

    trainer = _trainer(tmp_path, model=with_lora(tiny_llama(seed=0)))
    trainer.train()
    ref_losses, ref_opt, ref_model = _by_hand(model=with_lora(tiny_llama(seed=0)))
    assert trainer.zo_optimizer.step_log == ref_opt.step_log
    got = _params(trainer.model)
    _assert_equal_weights(got, _params(ref_model))
    start = _params(with_lora(tiny_llama(seed=0)))
    moved = {n for n in got if not torch.equal(got[n], start[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)  # the base weights never moved
    assert all(("lora_" in n) == p.requires_grad for n, p in trainer.model.named_parameters())
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "adapter"))
    _assert_equal_weights(_params(loaded), got)


def test_evaluate_reports_the_models_loss(tmp_path: Path) -> None:
    evals = _data(n=BATCH, seed=1)
    trainer = ZOTrainer(model=tiny_llama(seed=0), args=_args(tmp_path, per_device_eval_batch_size=BATCH),
                        train_dataset=_data(), eval_dataset=evals, data_collator=collate,
                        zo_config={"type": "MeZO", "params": {"eps": EPS}})
    trainer.train()
    metrics = trainer.evaluate()
    with torch.no_grad():
        want = trainer.model(**collate(evals)).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-6)


def test_options_from_the_training_arguments(tmp_path: Path) -> None:
    args = _args(tmp_path, learning_rate=2e-4, seed=9, weight_decay=0.1)
    name, options, _ = resolve_zo_config({"type": "zo_adam", "params": {"eps": 1e-2, "betas": "auto",
                                                                         "adam_eps": "auto"}}, args)
    assert name == "zo_adam"
    assert options == {"eps": 1e-2, "betas": [args.adam_beta1, args.adam_beta2], "adam_eps": args.adam_epsilon,
                       "lr": 2e-4, "seed": 9}
    # Trainer's weight decay, on the parameters Trainer decays (not norms), as its own groups.
    trainer = ZOTrainer(model=tiny_llama(seed=0), args=args, train_dataset=_data(), data_collator=collate,
                        zo_config={"type": "MeZO", "params": {"eps": EPS}})
    trainer.create_optimizer()
    groups = trainer.zo_optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all("norm" not in n for n in groups[0]["param_names"])
    assert any("norm" in n for n in groups[1]["param_names"])
    assert all(g["lr"] == 2e-4 and g["eps"] == EPS for g in groups)


@pytest.mark.parametrize(("zo", "match"), [
    ({"type": "MeZO", "params": {"eps": "auto"}}, "perturbation scale"),
    ({"type": "MeZO", "params": {"q": "auto"}}, "'q': 'auto'"),
    ({"type": "AdamW", "params": {}}, "Unknown optimizer type 'AdamW'"),
    ({"type": "MeZO", "params": {"learning_rate": 1e-3}}, "learning_rate"),
    ({"type": "MeZO", "parms": {}}, "parms"),
])
def test_bad_zo_config_is_refused_by_name(tmp_path: Path, zo: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, zo=zo)


def test_a_first_order_optimizer_in_the_deepspeed_json_is_refused() -> None:
    class Args:  # resolve_zo_config reads these fields only
        learning_rate, seed = LR, SEED
        deepspeed = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}

    with pytest.raises(ValueError, match="'AdamW', which is not a zoscale optimizer"):
        resolve_zo_config(None, Args())
    Args.deepspeed = {"optimizer": {"type": "MeZO", "params": {"eps": 1e-3}}}
    name, options, source = resolve_zo_config(None, Args())
    assert (name, options) == ("MeZO", {"eps": 1e-3, "lr": LR, "seed": SEED}) and "DeepSpeed" in source
    with pytest.raises(ValueError, match="one place only"):
        resolve_zo_config({"type": "MeZO"}, Args())


def test_torch_compile_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch_compile is not supported: Trainer compiles the model inside"):
        _trainer(tmp_path, torch_compile=True)


def test_activation_checkpointing_is_switched_off_with_the_reason(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="turns activation .gradient. checkpointing off.*keeps none"):
        trainer = _trainer(tmp_path, gradient_checkpointing=True)
    trainer.train()
    assert not trainer.model.is_gradient_checkpointing  # Trainer did not enable it on the model
    ref_losses, ref_opt, ref_model = _by_hand()
    assert trainer.zo_optimizer.step_log == ref_opt.step_log


def test_max_grad_norm_is_ignored_with_one_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, max_grad_norm=1.0)
        trainer.train()
    mine = [w for w in caught if "max_grad_norm" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    ref_losses, ref_opt, ref_model = _by_hand()
    _assert_equal_weights(_params(trainer.model), _params(ref_model))  # nothing was clipped or changed
    assert all(math.isfinite(h.get("loss", 0.0)) and "grad_norm" not in h for h in trainer.state.log_history)


def test_a_first_order_optimizer_object_is_refused(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="first-order optimizer"):
        ZOTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), data_collator=collate,
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_zo_sft_trainer_follows_the_optimizer_by_hand(tmp_path: Path) -> None:
    """trl's SFTTrainer with the ZO step: its batches, fed to MeZO by hand, give the same run."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from zoscale.hf.sft import ZOSFTTrainer
    from zoscale.models import tiny_tokenizer

    texts = Dataset.from_list([{"text": f"sample {i}: the film was {'great' if i % 2 else 'bad'} ({i * 7})"}
                               for i in range(STEPS * BATCH)])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                     lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                     train_sampling_strategy="sequential", use_cpu=True, max_grad_norm=0.0, seed=SEED,
                     disable_tqdm=True, max_length=48)
    trainer = ZOSFTTrainer(model=tiny_llama(seed=0), args=args, train_dataset=texts, processing_class=tiny_tokenizer(),
                           zo_config={"type": "MeZO", "params": {"eps": EPS}})
    batches: list[dict[str, torch.Tensor]] = []
    collator = trainer.data_collator
    trainer.data_collator = lambda rows: batches.append(collator(rows)) or batches[-1]
    trainer.train()
    assert len(batches) == STEPS and any((b["labels"] == -100).any() for b in batches)  # padded, masked

    model = tiny_llama(seed=0)
    model.eval()
    opt = MeZO(model.named_parameters(), lr=LR, eps=EPS, seed=SEED)
    for b in batches:
        opt.step(lambda: model(**{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}).loss)
    # trl's loss (summed token log-probs over the step's token count, from its fused head) against the
    # model's mean cross-entropy: equal up to rounding, then amplified by 1/(2 eps) in the projected gradient.
    for got, want in zip(trainer.zo_optimizer.step_log, opt.step_log):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(dict(trainer.model.named_parameters())[n].detach(), p.detach(), rtol=0, atol=1e-5)
    # trl's metrics are filed as training metrics, and each token is counted once (not once per forward).
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(train_logs) == STEPS
    assert all("mean_token_accuracy" in h and "entropy" in h and not any(k.startswith("eval_") for k in h)
               for h in train_logs)
    assert train_logs[-1]["num_tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)


SFT_LR = 1e-2  # MeZO on LoRA of the tiny Llama (see the test below)
#: Instruction records (trl's prompt-completion format): the loss is on the completion only.
INSTRUCTIONS = [{"prompt": f"Q: is {w} good or bad?\nA:", "completion": f" {'good' if i % 2 else 'bad'}"}
                for i, w in enumerate(["cake", "rain", "sun", "mud", "gold", "dust", "song", "noise"])]


def sft_args(out: Path, steps: int, lr: float, **kw: Any) -> Any:
    """trl's SFTConfig for :func:`sft_trainer`: one step is every record, a constant lr."""
    from trl import SFTConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=len(INSTRUCTIONS),
                per_device_eval_batch_size=len(INSTRUCTIONS), max_steps=steps, learning_rate=lr,
                lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                max_grad_norm=0.0, seed=SEED, disable_tqdm=True, max_length=48)
    return SFTConfig(**{**base, **kw})


def sft_trainer(args: Any, model: Any = None) -> Any:
    """ZOSFTTrainer on :data:`INSTRUCTIONS` (train and eval) with LoRA through trl's ``peft_config``,
    on ``model`` (the tiny Llama by default)."""
    from datasets import Dataset
    from peft import LoraConfig

    from zoscale.hf.sft import ZOSFTTrainer
    from zoscale.models import tiny_tokenizer

    records = Dataset.from_list(INSTRUCTIONS)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(SEED)  # the adapters' initial values
    return ZOSFTTrainer(model=model if model is not None else tiny_llama(seed=0), args=args, train_dataset=records,
                        eval_dataset=records, processing_class=tiny_tokenizer(), peft_config=config,
                        zo_config={"type": "MeZO", "params": {"eps": EPS}})


def test_zo_sft_trainer_learns_instructions_with_lora_on_the_completions(tmp_path: Path) -> None:
    """Instruction records, completion-only loss, LoRA from trl's peft_config: the held-out loss
    (here the records themselves) falls, only the adapters move, and the prompt is not scored."""
    pytest.importorskip("trl")
    from peft import PeftModel

    trainer = sft_trainer(sft_args(tmp_path, steps=30, lr=SFT_LR))
    assert isinstance(trainer.model, PeftModel)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(INSTRUCTIONS))])
    tokenizer = trainer.processing_class
    for row, labels in zip(INSTRUCTIONS, batch["labels"]):
        scored = tokenizer.decode(labels[labels != -100])
        assert scored.startswith(row["completion"]) and "Q:" not in scored, scored  # completion only
    start = _params(trainer.model)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    # MeZO on LoRA, lr 1e-2, eps 1e-3, 30 steps of the 8 records: 5.36 -> 4.51 on one machine,
    # 5.36 -> 4.97 on another (the trajectory follows the CPU's rounding); over 9 other trainer
    # seeds here the ratio was 0.81-0.975. A wrong-signed or lost update leaves it >= 1.
    assert after < 0.97 * before, (before, after)
    got = _params(trainer.model)
    moved = {n for n in got if not torch.equal(got[n], start[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)


def test_hsdp_shape_from_accelerates_parallelism_config() -> None:
    from accelerate.parallelism_config import ParallelismConfig

    from zoscale.hf.trainer import _hsdp_shape

    assert _hsdp_shape(None) is None
    assert _hsdp_shape(ParallelismConfig(dp_shard_size=4)) is None  # FSDP over the world
    assert _hsdp_shape(ParallelismConfig(dp_replicate_size=2, dp_shard_size=4)) == (2, 4)
    with pytest.raises(ValueError, match=r"parallelism_config \{'tp_size': 2\} is not supported"):
        _hsdp_shape(ParallelismConfig(dp_shard_size=2, tp_size=2))


def test_a_bf16_model_trains_on_fp32_master_weights(tmp_path: Path) -> None:
    """A model loaded in bf16 with ``master_weights`` in the zo_config: the ZO update accumulates
    in fp32 masters and the bf16 weights are their casts; MeZO by hand with the same option gives
    the same run bit for bit."""
    zo = {"type": "MeZO", "params": {"eps": EPS, "master_weights": True}}
    lr = 1e-5
    trainer = _trainer(tmp_path, zo=zo, model=tiny_llama(seed=0, dtype=torch.bfloat16), learning_rate=lr)
    trainer.train()
    model = tiny_llama(seed=0, dtype=torch.bfloat16)
    model.eval()
    opt = MeZO(model.named_parameters(), lr=lr, eps=EPS, seed=SEED, master_weights=True)
    data = _data()
    for s in range(STEPS):
        b = collate(data[s * BATCH:(s + 1) * BATCH])
        opt.step(lambda: model(**b).loss)
    assert trainer.zo_optimizer.step_log == opt.step_log
    got = _params(trainer.model)
    _assert_equal_weights(got, _params(model))
    assert all(p.dtype == torch.bfloat16 for p in got.values())
    # The optimizer holds fp32 masters, and the bf16 weights (their casts) moved.
    start = _params(tiny_llama(seed=0, dtype=torch.bfloat16))
    masters = [s["master"] for s in trainer.zo_optimizer.state.values() if "master" in s]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert any(not torch.equal(got[n], start[n]) for n in got)


def test_metrics_jsonl_holds_zoscale_records_resumes_and_plots(tmp_path: Path) -> None:
    """``<output_dir>/metrics.jsonl``: zoscale's records (loss, lr, projected gradient, step time
    and its phases, evaluations), trimmed on resume like launch/train.py's, drawn by launch/plot.py."""
    from zoscale.plots import plot_runs, read_metrics

    evals = _data(n=BATCH, seed=1)

    def trainer() -> ZOTrainer:
        return ZOTrainer(model=tiny_llama(seed=0), args=_args(tmp_path, save_strategy="steps", save_steps=2,
                                                             per_device_eval_batch_size=BATCH),
                         train_dataset=_data(), eval_dataset=evals, data_collator=collate,
                         zo_config={"type": "MeZO", "params": {"eps": EPS}})

    full = trainer()
    full.evaluate()
    full.train()
    records = read_metrics(tmp_path)
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the evaluation before training
    steps = [r for r in records if "loss" in r]
    logged = [h for h in full.state.log_history if "loss" in h]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss"] for r in steps] == [h["loss"] for h in logged]
    assert [r["lr"] for r in steps] == [LR] * STEPS
    assert steps[-1]["projected_grad"] == pytest.approx(full.zo_optimizer.step_log[-1]["grad"][0], rel=1e-6)
    for r in steps:
        assert r["step_s"] > 0 and r["forward_s"] > 0 and r["perturb_s"] > 0
        assert r["forward_s"] + r["perturb_s"] <= r["step_s"]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)
    plot_runs([tmp_path], x="both")  # launch/plot.py's figure of this run

    # A fresh trainer evaluates, then resumes at step 2: steps 3-4 are written once more, not twice.
    again = trainer()
    again.evaluate()
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = read_metrics(tmp_path)
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in steps]  # the same trajectory
    assert sum("eval_loss" in r for r in resumed) == 2  # the first run's and this session's evaluation


def test_report_to_tensorboard_receives_the_zo_scalars(tmp_path: Path) -> None:
    """``report_to=["tensorboard"]``: transformers' own callback writes the ZO keys of each log."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tmp_path, report_to=["tensorboard"])
    trainer.train()
    (folder,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/zo_projected_grad", "train/zo_step_s", "train/zo_forward_s"} <= tags, tags
    grads = [e.value for e in acc.Scalars("train/zo_projected_grad")]
    want = [r["grad"][0] for r in trainer.zo_optimizer.step_log]
    assert grads == pytest.approx(want, rel=1e-6)


def test_a_zoscale_optimizer_in_a_plain_trainer_is_one_clear_error(tmp_path: Path) -> None:
    """transformers.Trainer calls ``optimizer.step()`` after its backward: the ZO optimizer refuses,
    naming ZOTrainer, before any weight moved."""
    from transformers import Trainer

    model = tiny_llama(seed=0)
    start = _params(model)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), data_collator=collate,
                      optimizers=(MeZO(model.named_parameters(), lr=LR, eps=EPS), None))
    with pytest.raises(ValueError, match=r"MeZO.step requires a closure.*use zoscale.hf.ZOTrainer"):
        trainer.train()
    _assert_equal_weights(_params(model), start)


def test_the_fsdp2_compute_dtype_is_the_plugins_mixed_precision() -> None:
    """``bf16=True`` reaches ZOTrainer's FSDP2 engine as accelerate sets it on the plugin
    (``AcceleratorState`` calls ``fsdp_plugin.set_mixed_precision``); fp32 without it. bf16 compute
    over fp32 shards itself: tests/distributed/test_fsdp.py."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from zoscale.hf.trainer import _fsdp_param_dtype

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert _fsdp_param_dtype(plugin) is None  # compute in the shards' dtype
    plugin.set_mixed_precision("bf16")
    assert _fsdp_param_dtype(plugin) == torch.bfloat16
