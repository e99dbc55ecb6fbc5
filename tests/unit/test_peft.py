"""PEFT through peft: LoRA, prefix and prompt tuning on tiny OPT and tiny Llama, one process.

What would be false if the code were wrong: only adapter parameters change (base weights bitwise
equal after ZO steps), the loss on a fixed batch falls with MeZO and LeZO, the adapter folder
holds what peft's own ``save_pretrained`` writes and loads back into a fresh base model with the
trained model's outputs, a row scores the same whatever padding its batch has (prompt tuning on a
rotary model needs the positions fix in ``label_logits``), LoRA starts as the base model, the
adapters' initialisation is seeded without touching the global RNG, and bad ``model.peft``
sections fail naming the key.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import zoscale.data.tasks.forward as forward
from zoscale.data.tasks import Classification, Encoder, Task, label_logits, task_spec
from zoscale.models import tiny_llama, tiny_opt, tiny_tokenizer
from zoscale.optim.lezo import LeZO
from zoscale.optim.mezo import MeZO
from zoscale.peft import RECOMMENDED, adapter_parameters, apply_peft, check_peft, initialise_adapters, save_adapter
from zoscale.shards import LocalShards, ShardView

MODELS: dict[str, Callable[..., torch.nn.Module]] = {"llama": tiny_llama, "opt": tiny_opt}
# MeZO settings that make the tiny models' loss fall within 30 steps (the tiny models' scales are
# not OPT-13B's: see zoscale.peft.RECOMMENDED for real models).
SETTINGS = {"lora": {"lr": 2e-2, "eps": 1e-2}, "prefix": {"lr": 1.0, "eps": 1e-1}, "prompt": {"lr": 0.1, "eps": 1e-2}}
STEPS = 30


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")  # tiny tensors: no compile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft / transformers deprecation notices
        yield


def _rows(n: int = 8) -> list[dict[str, Any]]:
    words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
    return [{"sentence": f"a {words[i % 2][i % 4]} film" + " indeed" * (i % 3) + f" number {i}", "label": i % 2}
            for i in range(n)]


def _task() -> Task:
    return Task(task_spec("sst2"), Classification(), label_words=(" bad", " good"))


def _batch(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    task = _task()
    examples = task.examples([(row, f"rows[{i}]") for i, row in enumerate(rows)])
    return task.family.train_batch(examples, Encoder(tiny_tokenizer(), 48))


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The classification loss: cross-entropy over the label words' logits (the batch's label_ids)."""
    return Classification().loss(model, batch)


IDS = _batch(_rows(1))["label_ids"].tolist()


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_parameters(model)}


@pytest.mark.parametrize("mode", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_only_adapters_train_the_loss_falls_and_the_folder_round_trips(kind: str, mode: str, tmp_path: Path) -> None:
    from peft import PeftModel

    model = apply_peft(MODELS[kind](), {"type": mode}, seed=3)
    initialise_adapters(model, LocalShards(), {"type": mode}, seed=3)  # the trainer's path (prefix: real act.)
    named = adapter_parameters(model)
    base_count = sum(1 for _ in MODELS[kind]().parameters())
    assert named and all("lora_" in n or n.startswith("prompt_encoder.") for n, _ in named)
    assert len(_frozen(model)) == base_count  # every base weight frozen, none missing
    frozen, start = _frozen(model), _adapters(model)
    batch = _batch(_rows())
    with torch.no_grad():
        before = _loss(model, batch).item()
    opt = MeZO(named, seed=1, **SETTINGS[mode])
    for _ in range(STEPS):
        opt.step(lambda: _loss(model, batch))
    with torch.no_grad():
        after = _loss(model, batch).item()
    # Measured drops over noise seeds 1-3: >= 0.064 (prefix), 0.072 (prompt), 0.077 (LoRA).
    assert after < before - 0.03, (before, after)
    for n, p in _frozen(model).items():
        assert torch.equal(p, frozen[n]), n  # base weights bitwise unchanged
    for n, p in _adapters(model).items():
        assert not torch.equal(p, start[n]), n  # every adapter tensor moved

    # The folder: exactly peft's own format (keys and values of PeftModel.save_pretrained), and it
    # loads into a fresh base model giving the trained model's outputs.
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    save_adapter(model, ours, tiny_tokenizer())
    model.save_pretrained(theirs)
    from safetensors.torch import load_file

    a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), (sorted(a), sorted(b))
    assert (ours / "tokenizer.json").is_file()
    loaded = PeftModel.from_pretrained(MODELS[kind](), ours).eval()
    probe = _batch(_rows(5))
    with torch.no_grad():
        assert torch.equal(label_logits(loaded, probe, IDS), label_logits(model, probe, IDS))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_lezo_trains_lora_adapters_by_layer(kind: str) -> None:
    model = apply_peft(MODELS[kind](), {"type": "lora"}, seed=3)
    frozen, start = _frozen(model), _adapters(model)
    batch = _batch(_rows())
    with torch.no_grad():
        before = _loss(model, batch).item()
    opt = LeZO(adapter_parameters(model), sparsity=0.5, seed=1, **SETTINGS["lora"])
    assert opt.units == ["block.0", "block.1"]  # LoRA layers live in the transformer blocks
    opt.step(lambda: _loss(model, batch))
    (active,) = opt.active_units(0)
    moved = {n for n, p in _adapters(model).items() if not torch.equal(p, start[n])}
    assert moved and all(f"layers.{active.split('.')[1]}." in n for n in moved), (active, moved)
    for _ in range(STEPS - 1):
        opt.step(lambda: _loss(model, batch))
    with torch.no_grad():
        after = _loss(model, batch).item()
    # Half the layers per step: measured drops 0.026-0.058 over noise seeds 1-3.
    assert after < before - 0.01, (before, after)
    for n, p in _frozen(model).items():
        assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("mode", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_a_row_scores_the_same_whatever_its_padding(kind: str, mode: str) -> None:
    # Sharded runs collate smaller per-rank batches, padded differently from the whole batch.
    model = apply_peft(MODELS[kind](), {"type": mode}, seed=3)
    with torch.no_grad():
        for p in model.parameters():  # adapters away from their init (LoRA's B starts at zero)
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        rows = _rows()
        together = label_logits(model, _batch(rows), IDS)
        alone = torch.cat([label_logits(model, _batch([r]), IDS) for r in rows])
    # fp32 rounding of the same computation at other absolute offsets (measured <= 1e-6).
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_prompt_tuning_on_a_rotary_model_needs_the_positions_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # peft drops position ids for prompt tuning; without label_logits' hook the Llama's positions
    # are counted over the padding, and the same row scores differently in another batch.
    monkeypatch.setattr(forward, "_positions_from_mask", lambda module: contextlib.nullcontext())
    model = apply_peft(tiny_llama(), {"type": "prompt"}, seed=3)
    rows = _rows()
    with torch.no_grad():
        together = label_logits(model, _batch(rows), IDS)
        alone = torch.cat([label_logits(model, _batch([r]), IDS) for r in rows])
    assert (together - alone).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_lora_starts_as_the_base_model_and_prefix_prompt_change_it(kind: str) -> None:
    batch = _batch(_rows())
    with torch.no_grad():
        base = label_logits(MODELS[kind](), batch, IDS)
        lora = label_logits(apply_peft(MODELS[kind](), {"type": "lora"}, seed=3), batch, IDS)
        # B = 0: the same function (up to the order of fp32 additions, measured ~1e-7).
        torch.testing.assert_close(lora, base, rtol=0, atol=1e-5)
        for mode in ("prefix", "prompt"):  # virtual tokens are seen by the forward
            assert (label_logits(apply_peft(MODELS[kind](), {"type": mode}, seed=3), batch, IDS) - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_prefix_from_real_activations_scores_like_the_base_model_after_those_tokens(kind: str) -> None:
    # MeZO's init: the prefix is the base model's keys/values of random tokens T, so the prefix
    # model on x must equal the base model on [T, x] (an independent reference for peft's
    # cache-based prefix forward on transformers 5: mask, positions, key/value layout).
    model = apply_peft(MODELS[kind](), {"type": "prefix"}, seed=3)
    tokens = initialise_adapters(model, LocalShards(), {"type": "prefix"}, seed=11)
    assert tokens is not None and tokens.shape == (1, 5)
    base = MODELS[kind]()
    batch = _batch(_rows())
    with torch.no_grad():
        got = label_logits(model, batch, IDS)
        expected = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = torch.cat([tokens[0], ids[mask.bool()]])[None]
            expected.append(label_logits(base, {"input_ids": row, "attention_mask": torch.ones_like(row)}, IDS))
    # The same attention computed in another layout (measured <= 4e-7).
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-5)
    # Sharded: two ranks' views of the same tensor written separately give the same prefix.
    (name, param), = adapter_parameters(model)
    whole = param.detach().clone()
    with torch.no_grad():
        param.zero_()
    for rank in range(2):
        class Half:  # rank r's rows of the tensor, as a sharded provider hands them out
            loss_group = None

            def view(self, p: torch.Tensor, rank: int = rank) -> ShardView:
                rows = -(-p.shape[0] // 2)
                local = p.data[rank * rows:(rank + 1) * rows].view(-1)
                return ShardView(local=local, offset=rank * rows * p.shape[1], numel=p.numel(),
                                 global_shape=p.shape, replicated=False)

        initialise_adapters(model, Half(), {"type": "prefix"}, seed=11)
    assert torch.equal(param.detach(), whole)
    assert initialise_adapters(model, LocalShards(), {"type": "prefix", "init_by_real_act": False}) is None
    assert initialise_adapters(model, LocalShards(), {"type": "lora"}) is None


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    for mode in ("lora", "prompt"):
        state = torch.get_rng_state()
        a = _adapters(apply_peft(tiny_llama(), {"type": mode}, seed=3))
        assert torch.equal(torch.get_rng_state(), state)
        b = _adapters(apply_peft(tiny_llama(), {"type": mode}, seed=3))
        c = _adapters(apply_peft(tiny_llama(), {"type": mode}, seed=4))
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(not torch.equal(a[n], c[n]) for n in a)


def test_forwards_are_deterministic_in_eval_mode() -> None:
    model = apply_peft(tiny_opt(), {"type": "lora"}, seed=3)
    assert not any(m.training for m in model.modules())
    batch = _batch(_rows())
    with torch.no_grad():
        assert torch.equal(label_logits(model, batch, IDS), label_logits(model, batch, IDS))


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"r": 4}, "model.peft.type"),
        ({"type": "adapter"}, "model.peft.type"),
        ({"type": "lora", "rank": 4}, "model.peft.rank"),
        ({"type": "lora", "r": 0}, "model.peft.r"),
        ({"type": "lora", "lora_dropout": 0.1}, "model.peft.lora_dropout"),
        ({"type": "lora", "bias": "all"}, "model.peft.bias"),
        ({"type": "lora", "modules_to_save": ["lm_head"]}, "model.peft.modules_to_save"),
        ({"type": "lora", "task_type": "SEQ_CLS"}, "model.peft.task_type"),
        ({"type": "prefix", "prefix_projection": True}, "model.peft.prefix_projection"),
        ({"type": "prefix", "num_virtual_tokens": -1}, "model.peft.num_virtual_tokens"),
        ({"type": "prompt", "token_dim": 8}, "model.peft.token_dim"),
        ({"type": "prompt", "prompt_tuning_init": "TEXT"}, "tokenizer_name_or_path"),
        ("lora", "model.peft"),
        ({"type": "lora", "init_by_real_act": True}, "model.peft.init_by_real_act"),
        ({"type": "prefix", "init_by_real_act": "yes"}, "model.peft.init_by_real_act"),
    ],
)
def test_bad_peft_sections_are_named(spec: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_peft(spec)


def test_lora_targets_that_match_nothing_are_an_error() -> None:
    with pytest.raises(ValueError, match="model.peft"):
        apply_peft(tiny_llama(), {"type": "lora", "target_modules": ["no_such_proj"]})


def test_recommended_settings_cover_every_mode() -> None:
    assert set(RECOMMENDED) == {"full", "lora", "prefix", "prompt"}
    assert RECOMMENDED["lora"] == (1e-2, 1e-4) and RECOMMENDED["prefix"] == (1e-1, 1e-2)
    assert RECOMMENDED["full"] == (1e-3, 1e-6)
