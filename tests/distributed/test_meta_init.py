"""FSDP2 from the meta device (issue 13, item 1): each rank reads only its rows from safetensors,
and the model comes out exactly as when every rank loads it whole before ``fully_shard``: the same
shards, buffers (rotary ``inv_freq``), tied embedding, forward outputs and MeZO trajectory. On
2 gloo ranks, for a saved tiny Llama and for the bundled SmolLM2-135M (converted from GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.spawn import run
from zoscale.engines import FSDPEngine
from zoscale.engines.meta_init import meta_causal_lm
from zoscale.models import load_causal_lm, tiny_llama, weights_folder
from zoscale.optim import build_optimizer

pytestmark = pytest.mark.distributed


def _state(engine: FSDPEngine, ids: torch.Tensor) -> dict:
    m = engine.module
    opt = build_optimizer("mezo", m.named_parameters(), {"lr": 1e-3, "eps": 1e-3, "seed": 3}, shards=engine.shards,
                          module=m)
    with torch.no_grad():
        logits = m(input_ids=ids).logits.clone()
    losses = [opt.step(lambda: m(input_ids=ids, labels=ids).loss) for _ in range(2)]
    return {"logits": logits, "losses": losses, "tied": m.lm_head.weight is m.model.embed_tokens.weight,
            "params": {n: p.full_tensor().clone() for n, p in m.named_parameters()},
            "buffers": {n: b.clone() for n, b in m.named_buffers()}}


def _worker(rank: int, world: int, name: str, out: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    whole, _ = load_causal_lm(name)
    got = {"whole": _state(FSDPEngine(whole), ids)}
    meta = meta_causal_lm(weights_folder(name), torch.float32)
    assert all(p.is_meta for p in meta.parameters())
    got["meta"] = _state(FSDPEngine(meta), ids)
    torch.save(got, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("model", ["tiny folder", "smollm2-135m"])
def test_meta_init_equals_the_whole_model_load(tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    name = model
    if model == "tiny folder":
        name = str(tmp_path / "tiny")
        tiny_llama().save_pretrained(name)  # safetensors, as a Hugging Face folder
    elif weights_folder(model) is None:
        pytest.skip("SmolLM2 is not converted yet (bash launch/setup.sh)")
    run(_worker, 2, name, str(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        whole, meta = got["whole"], got["meta"]
        assert meta["tied"] == whole["tied"]
        assert set(meta["params"]) == set(whole["params"]) and set(meta["buffers"]) == set(whole["buffers"])
        for n, p in whole["params"].items():
            assert torch.equal(meta["params"][n], p), (model, n)
        for n, b in whole["buffers"].items():
            assert torch.equal(meta["buffers"][n], b), (model, n)
        assert torch.equal(meta["logits"], whole["logits"]) and meta["losses"] == whole["losses"], model


def _train_worker(rank: int, world: int, folder: str, out: str) -> None:
    """The trainer on FSDP2 with a model folder: built from meta (its default), then whole."""
    import json

    import zoscale.engines.fsdp as fsdp
    from zoscale.engines import FSDPBuilder
    from zoscale.train.config import load_config
    from zoscale.train.trainer import train

    data = Path(out) / "toy.jsonl"
    if rank == 0:
        data.write_text("".join(json.dumps({"sentence": f"a film {i}", "label": i % 2}) + "\n" for i in range(24)))
    torch.distributed.barrier()
    fills = []
    fill = fsdp.fill_from_safetensors
    fsdp.fill_from_safetensors = lambda *a: fills.append(1) or fill(*a)
    for meta in (True, False):
        builder = FSDPBuilder()
        builder.meta_init = meta
        cfg = load_config(None, [f"model.name={folder}", f"data.path={data}", "data.n_train=16", "data.n_eval=8",
                                 'data.label_words=[" bad", " good"]', "batch_size=4", "eval_every=0", "steps=2",
                                 f"output_dir={out}/{'meta' if meta else 'whole'}", "save_final=false"])
        train(cfg, progress=False, builder=builder)
        assert len(fills) == 1, (meta, fills)  # the meta build read the files, the whole one did not


def test_the_trainer_builds_a_folder_model_from_meta_on_fsdp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from zoscale.models import tiny_tokenizer

    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    run(_train_worker, 2, str(folder), str(tmp_path))
    rows = {way: [json.loads(line) for line in (tmp_path / way / "metrics.jsonl").open()] for way in ("meta", "whole")}
    losses = {way: [r["loss"] for r in rs if "loss" in r] for way, rs in rows.items()}
    assert len(losses["meta"]) == 2 and losses["meta"] == losses["whole"]
