"""Building without the whole model (issue 13, items 1-2): FSDP2 from the meta device and ZeRO-3
from its partitions, each rank reading only its part of each weight from safetensors, give exactly
the model of the whole-model load (``from_pretrained`` on every rank, then ``fully_shard``; or
``from_pretrained`` under ``zero.Init``): the same shards, buffers (rotary ``inv_freq``), tied
embedding, forward outputs and MeZO trajectory. On 2 gloo ranks, for a saved tiny Llama and for the
bundled SmolLM2-135M (converted from GGUF)."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.distributed.spawn import run  # noqa: E402
from zoscale.engines import FSDPEngine  # noqa: E402
from zoscale.engines.meta_init import meta_causal_lm  # noqa: E402
from zoscale.models import load_causal_lm, prepare_model, tiny_llama, weights_folder  # noqa: E402
from zoscale.optim import build_optimizer  # noqa: E402

pytestmark = pytest.mark.distributed


def _state(engine: object, ids: torch.Tensor) -> dict:
    """Logits, two MeZO steps, the tie, the whole weights and the buffers of an engine's model."""
    m = engine.module
    opt = build_optimizer("mezo", m.named_parameters(), {"lr": 1e-3, "eps": 1e-3, "seed": 3}, shards=engine.shards,
                          module=m)
    with torch.no_grad():
        logits = m(input_ids=ids).logits.clone()
    losses = [opt.step(lambda: m(input_ids=ids, labels=ids).loss) for _ in range(2)]
    return {"logits": logits, "losses": losses, "tied": m.lm_head.weight is m.model.embed_tokens.weight,
            "params": _whole(m), "buffers": {n: b.clone() for n, b in m.named_buffers()}}


def _whole(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = list(m.named_parameters())
    if not hasattr(named[0][1], "ds_shape"):  # FSDP2 DTensors
        return {n: p.full_tensor().clone() for n, p in named}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone().reshape(p.ds_shape) for n, p in named}


def _worker(rank: int, world: int, name: str, out: str) -> None:
    from zoscale.engines.deepspeed import DeepSpeedBuilder

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    whole, _ = load_causal_lm(name)
    got = {"whole": _state(FSDPEngine(whole), ids)}
    meta = meta_causal_lm(weights_folder(name), torch.float32)
    assert all(p.is_meta for p in meta.parameters())
    got["meta"] = _state(FSDPEngine(meta), ids)
    ds = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    builder = DeepSpeedBuilder(ds)
    with builder.loading():
        whole = load_causal_lm(name)[0]
    got["zero3_whole"] = _state(builder.build(whole), ids)
    builder = DeepSpeedBuilder(ds)
    got["zero3_files"] = _state(builder.build(builder.model_from_files(weights_folder(name), torch.float32)), ids)
    torch.save(got, f"{out}/rank{rank}.pt")


# SmolLM2 (~2 min: four builds of 135M on 2 ranks) in the extended suite, which .ci/run runs too.
@pytest.mark.parametrize("model", ["tiny folder", pytest.param("smollm2-135m", marks=pytest.mark.extended)])
def test_meta_init_equals_the_whole_model_load(tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    name = model
    if model == "tiny folder":
        name = str(tmp_path / "tiny")
        tiny_llama().save_pretrained(name)  # safetensors, as a Hugging Face folder
    else:  # a fresh machine has the GGUF file only: convert it here, as a launcher would
        prepare_model(model)
        assert weights_folder(model) is not None, "the SmolLM2 conversion left no safetensors file"
    run(_worker, 2, name, str(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for whole, meta in ((got["whole"], got["meta"]), (got["zero3_whole"], got["zero3_files"])):
            _assert_same(whole, meta, model)


def _assert_same(whole: dict, meta: dict, model: str) -> None:
    assert meta["tied"] == whole["tied"]
    assert set(meta["params"]) == set(whole["params"]) and set(meta["buffers"]) == set(whole["buffers"])
    for n, p in whole["params"].items():
        assert torch.equal(meta["params"][n], p), (model, n)
    for n, b in whole["buffers"].items():
        assert torch.equal(meta["buffers"][n], b), (model, n)
    assert torch.equal(meta["logits"], whole["logits"]) and meta["losses"] == whole["losses"], model


def _train_worker(rank: int, world: int, folder: str, out: str) -> None:
    """The trainer with a model folder on FSDP2 and ZeRO-3: built from the files (the default),
    then loaded whole; the builds that stream call their fill function once, the others never."""
    import json

    import zoscale.engines.fsdp as fsdp
    import zoscale.engines.meta_init as meta_init
    from zoscale.engines import FSDPBuilder
    from zoscale.engines.deepspeed import DeepSpeedBuilder
    from zoscale.train.config import load_config
    from zoscale.train.trainer import train

    data = Path(out) / "toy.jsonl"
    if rank == 0:
        data.write_text("".join(json.dumps({"sentence": f"a film {i}", "label": i % 2}) + "\n" for i in range(24)))
    torch.distributed.barrier()
    fills: list[str] = []
    fill_rows, fill_parts = fsdp.fill_from_safetensors, meta_init.fill_zero3_partitions
    fsdp.fill_from_safetensors = lambda *a: fills.append("fsdp") or fill_rows(*a)
    meta_init.fill_zero3_partitions = lambda *a: fills.append("zero3") or fill_parts(*a)
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    for engine, make in (("fsdp", FSDPBuilder), ("zero3", lambda: DeepSpeedBuilder(ds))):
        for stream in (True, False):
            builder = make()
            builder.stream_weights = stream
            cfg = load_config(None, [f"model.name={folder}", f"data.path={data}", "data.n_train=16", "data.n_eval=8",
                                     'data.label_words=[" bad", " good"]', "batch_size=2", "eval_every=0", "steps=2",
                                     f"output_dir={out}/{engine}_{'files' if stream else 'whole'}", "save_final=false"])
            train(cfg, progress=False, builder=builder)
            assert fills.count(engine) == 1, (engine, stream, fills)


def test_the_trainer_builds_a_folder_model_from_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from zoscale.models import tiny_tokenizer

    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    run(_train_worker, 2, str(folder), str(tmp_path))
    for engine in ("fsdp", "zero3"):
        losses = {}
        for way in ("files", "whole"):
            rows = [json.loads(line) for line in (tmp_path / f"{engine}_{way}" / "metrics.jsonl").open()]
            losses[way] = [r["loss"] for r in rows if "loss" in r]
        assert len(losses["files"]) == 2 and losses["files"] == losses["whole"], engine


def _status_mib(key: str) -> float:
    import re

    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024.0


def _construct_worker(rank: int, world: int, config: object, out: str) -> None:
    """Build ``config`` partitioned (no fill) with every parameter ever created watched: count the
    gathers, check which parameters outlive the build, and the build's VmHWM growth."""
    import ctypes
    import gc
    import json
    import weakref

    import deepspeed

    from zoscale.engines.deepspeed import DeepSpeedBuilder
    from zoscale.engines.meta_init import _zero3_construct

    created: list[weakref.ref] = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: created.append(weakref.ref(param)))
    gathers = []
    enter = deepspeed.zero.GatheredParameters.__enter__
    deepspeed.zero.GatheredParameters.__enter__ = lambda self: gathers.append(1) or enter(self)
    builder = DeepSpeedBuilder({"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
                                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    builder.loading()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    model = _zero3_construct(config, torch.float32)
    peak = _status_mib("VmHWM") - before
    hook.remove()
    deepspeed.zero.GatheredParameters.__enter__ = enter
    params = list(model.parameters())
    alive = [r() for r in created if r() is not None]
    mib = 2.0**20
    largest = max(params, key=lambda p: p.ds_numel)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "gathers": len(gathers), "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "created": len(created), "alive_not_in_model": sum(all(a is not p for p in params) for a in alive),
        "partitioned": all(p.ds_tensor.numel() < p.ds_numel and p.numel() == 0 for p in params),
        "peak_mib": peak, "shard_mib": sum(p.ds_tensor.numel() * 4 for p in params) / mib,
        "largest_mib": largest.ds_numel * 4 / mib, "largest_part_mib": largest.ds_tensor.numel() * 4 / mib}))


def _smollm2_config() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_zero3_construction_gathers_nothing_keeps_no_untied_head_and_peaks_at_shard_plus_one_tensor(
        tmp_path: Path) -> None:
    """SmolLM2's shapes, 2 ranks, no weights read: no parameter is gathered (transformers'
    ``initialize_weights_zero3`` would gather each module's, the 113 MB embedding and the untied
    ``lm_head`` at once, +250 MiB), the untied ``lm_head`` is collected, and a rank's build peak
    is its partitions plus one whole tensor (the largest, broadcast by ``zero.Init``) and its
    partition, within 48 MiB (measured: 10 MiB over that on the receiving rank). The heap trim's
    gain varies from run to run (~10-200 MiB, see ``meta_init._heap_trimmed``), so not asserted here."""
    import json

    run(_construct_worker, 2, _smollm2_config(), str(tmp_path))
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["gathers"] == 0 and got["tied"] and got["partitioned"], got
        # 273 parameters registered, and the embedding once more as lm_head.weight by the tie
        assert got["created"] == 30 * 9 + 2 + 1 + 1 and got["alive_not_in_model"] == 0, got
        bound = got["shard_mib"] + got["largest_mib"] + got["largest_part_mib"] + 48
        assert got["peak_mib"] < bound, (r, got)
