"""PEFT (LoRA, prefix, prompt tuning) on ZeRO-3 and FSDP2 follows the single-process trajectory.

Two spawned gloo ranks (one thread each) train the adapters of a tiny model with MeZO on the
prompt task's label-word loss, each rank on its half of the batch (collated separately, so with
its own padding), through the trainer's own path: the model is loaded by the engine builder
(under ZeRO-3 from a Hugging Face folder while ``HfDeepSpeedConfig`` is alive, so the base model
is partitioned at load and the adapters are created afterwards), ``apply_peft``, the engine, the
optimizer on ``adapter_parameters``. DeepSpeed uses the CPU accelerator and skips its shm comm
op build (see tests/distributed/test_deepspeed.py). Workers and the reference use the eager noise
kernels, so every run applies bit-identical z. The LoRA run is also checkpointed and resumed in
a fresh engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

deepspeed = pytest.importorskip("deepspeed")
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from tests.distributed.builders import assert_near_one_process, assert_ranks_agree  # noqa: E402
from tests.distributed.spawn import run  # noqa: E402
# The unit tests' sentences (of different lengths, so each half batch is padded differently from
# the whole), task and batches.
from tests.unit.test_peft import _batch, _rows  # noqa: E402
from zoscale.data.tasks import Classification, label_logits  # noqa: E402
from zoscale.models import load_causal_lm, tiny_llama, tiny_opt  # noqa: E402
from zoscale.optim.mezo import MeZO  # noqa: E402
from zoscale.peft import adapter_parameters, adapter_state_dict, apply_peft, initialise_adapters  # noqa: E402
from zoscale.shards import LocalShards  # noqa: E402
from zoscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.distributed

STEPS, BATCH = 4, 8
ATOL = 5e-5  # adapters against one process; derivation in the test
# Per mode: options and MeZO settings that move the tiny model's adapters visibly in 4 steps.
MODES: dict[str, dict[str, Any]] = {
    "lora": {"lr": 1e-2, "eps": 1e-2},
    "prefix": {"lr": 0.3, "eps": 1e-1},
    "prompt": {"lr": 0.1, "eps": 1e-2},
}
# (model, mode) pairs: every mode on the Llama, LoRA on OPT too.
CASES = (("llama", "lora"), ("llama", "prefix"), ("llama", "prompt"), ("opt", "lora"))
# Engines: ZeRO-3 with every parameter partitioned, ZeRO-3 with the default persistence threshold
# (1e5: the tiny models' parameters, adapters included, are kept whole), FSDP2.
ENGINES = ("zero3", "zero3_persist", "fsdp")
SEED = 7
RESUMED, RESUME_AT = ("llama", "lora"), 2  # checkpointed after step 2, resumed in a fresh engine


def _label_ids() -> list[int]:
    return _batch(_rows()[:1])["label_ids"].tolist()


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The classification loss: cross-entropy over the label words' logits (the batch's label_ids)."""
    return Classification().loss(model, batch)


def _build(engine: str, folder: str) -> tuple[Any, torch.nn.Module]:
    """(builder, loaded model) the way the trainer does it."""
    if engine == "fsdp":
        from zoscale.engines.fsdp import FSDPBuilder

        builder: Any = FSDPBuilder()
    else:
        from zoscale.engines.deepspeed import DeepSpeedBuilder

        zero: dict[str, Any] = {"stage": 3}
        if engine == "zero3":
            zero["stage3_param_persistence_threshold"] = 0
        builder = DeepSpeedBuilder({"train_micro_batch_size_per_gpu": BATCH // 2, "zero_optimization": zero})
    with builder.loading():
        model, _ = load_causal_lm(folder)
    return builder, model.eval()


def _worker(rank: int, world: int, folders: dict[str, str], out: str) -> None:
    from torch.distributed.tensor import DTensor
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from zoscale.engines.fsdp import find_blocks

    warnings.simplefilter("ignore")
    rows = _rows()
    part = _batch(rows[rank * BATCH // world:(rank + 1) * BATCH // world])
    results: dict[str, Any] = {}
    for kind, mode in CASES:
        for engine_name in ENGINES:
            builder, model = _build(engine_name, folders[kind])
            if engine_name != "fsdp":
                # Partitioned while loading: the adapters are created on a ZeRO-3 model.
                assert all(hasattr(p, "ds_tensor") for p in model.parameters())
            model = apply_peft(model, {"type": mode}, seed=SEED)
            engine = builder.build(model)
            unset_hf_deepspeed_config()
            module = engine.module
            # Prefix from real activations: a forward on every rank, each writing its own range.
            initialise_adapters(module, engine.shards, {"type": mode}, seed=SEED)
            if engine_name == "fsdp":
                assert len(find_blocks(module)) == 2  # the decoder layers of the wrapped model
                assert all(isinstance(p, DTensor) for p in module.parameters())
            named = adapter_parameters(module)
            opt = MeZO(named, shards=engine.shards, seed=SEED, **MODES[mode])
            views = [opt.shards.view(p) for _, p in named]
            if engine_name == "zero3":
                assert not any(v.replicated for v in views)  # adapters partitioned by deepspeed.initialize
            if engine_name == "zero3_persist":
                assert all(p.ds_persist for _, p in named)
            losses = []
            for step in range(1, STEPS + 1):
                losses.append(opt.step(lambda: _loss(module, part)))
                if step == RESUME_AT and (kind, mode) == RESUMED:
                    save_checkpoint(Path(out) / f"ckpt-{engine_name}", step, opt, rank, world, keep=1)
            adapters = adapter_state_dict(module)
            base = {n: p for n, p in module.named_parameters() if not p.requires_grad}
            zero3 = [p for p in base.values() if hasattr(p, "ds_tensor")]
            with deepspeed.zero.GatheredParameters(zero3, enabled=bool(zero3)), torch.no_grad():
                base_full = {n: (p.full_tensor() if isinstance(p, DTensor) else p.data).detach().clone()
                             for n, p in base.items()}
            saved = Path(out) / f"{kind}-{mode}-{engine_name}"
            engine.save_pretrained(saved, None)  # delegates to save_adapter for a peft model
            results[f"{kind}/{mode}/{engine_name}"] = {"losses": losses, "adapters": adapters, "base": base_full,
                                                       "saved": str(saved)}
            del engine, module, model, opt
    # Resume: a fresh engine and optimizer loaded from the checkpoint continue the same run.
    kind, mode = RESUMED
    for engine_name in ENGINES:
        builder, model = _build(engine_name, folders[kind])
        engine = builder.build(apply_peft(model, {"type": mode}, seed=SEED + 1))  # other init: all must be loaded
        unset_hf_deepspeed_config()
        module = engine.module
        opt = MeZO(adapter_parameters(module), shards=engine.shards, seed=SEED, **MODES[mode])
        start = load_checkpoint(latest_checkpoint(Path(out) / f"ckpt-{engine_name}"), opt, rank, world)
        for p in opt.param_groups[0]["params"]:
            if getattr(p, "ds_persist", False):
                # A whole (persistent) adapter: its partition, which DeepSpeed re-gathers from
                # whenever it releases the parameter, got the loaded values too.
                ps = p.ds_tensor.numel()
                valid = max(0, min(ps, p.ds_numel - rank * ps))
                full = opt.shards.view(p).local
                assert torch.equal(p.ds_tensor[:valid], full[rank * ps:rank * ps + valid])
        losses = [opt.step(lambda: _loss(module, part)) for _ in range(start, STEPS)]
        results[f"resumed/{engine_name}"] = {"losses": losses, "adapters": adapter_state_dict(module)}
        del engine, module, model, opt
    torch.save(results, f"{out}/rank{rank}.pt")


def _base_model(kind: str) -> torch.nn.Module:
    return tiny_llama(seed=0) if kind == "llama" else tiny_opt(seed=0)


def _reference(kind: str, mode: str) -> tuple[list[float], torch.nn.Module]:
    """One process, the whole batch, no engine."""
    model = apply_peft(_base_model(kind), {"type": mode}, seed=SEED)
    initialise_adapters(model, LocalShards(), {"type": mode}, seed=SEED)
    batch = _batch(_rows())
    opt = MeZO(adapter_parameters(model), seed=SEED, **MODES[mode])
    losses = [opt.step(lambda: _loss(model, batch)) for _ in range(STEPS)]
    return losses, model


def test_peft_on_zero3_and_fsdp2_follows_the_single_process_trajectory(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel

    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    warnings.simplefilter("ignore")
    folders = {}
    for kind in ("llama", "opt"):
        folders[kind] = str(tmp_path / kind)
        _base_model(kind).save_pretrained(folders[kind])
    run(_worker, 2, folders, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    batch, ids = _batch(_rows()), _label_ids()
    for kind, mode in CASES:
        ref_losses, ref_model = _reference(kind, mode)
        ref_adapters = {n: p.detach().clone() for n, p in adapter_parameters(ref_model)}
        fresh = apply_peft(_base_model(kind), {"type": mode}, seed=SEED)
        initialise_adapters(fresh, LocalShards(), {"type": mode}, seed=SEED)
        init = {n: p.detach().clone() for n, p in adapter_parameters(fresh)}
        base = {n: p.detach() for n, p in fresh.named_parameters() if not p.requires_grad}
        for engine in ENGINES:
            key = f"{kind}/{mode}/{engine}"
            got = ranks[0][key]
            assert_ranks_agree([r[key] for r in ranks], key, params="adapters")
            # Against one process on the whole batch, the difference is the loss: the mean of two
            # fp32 half-batch means, each over its own padding, instead of one mean (a few ulp,
            # <= 1e-6 relative). g divides it by 2 eps, so each update is off by about
            # lr * (1e-6 * loss / eps) * |z| <= 0.3 * 1e-5 * 4 ~ 1e-5 in the worst mode (prefix).
            # Measured after 4 steps: losses <= 2.2e-7 relative; adapters 1.4e-7 (Llama LoRA),
            # 3.6e-7 (OPT LoRA), 1.1e-6 (prefix), 4.6e-6 (prompt), the same on all three engines.
            # 5e-5 bounds that and is far below how far the adapters moved (checked below).
            assert_near_one_process(got, ref_losses, ref_adapters, ATOL, key, params="adapters")
            # Base weights: bitwise what was loaded, on every rank.
            for r in range(2):
                assert set(ranks[r][key]["base"]) == set(base), key
                for n, p in ranks[r][key]["base"].items():
                    assert torch.equal(p.reshape(base[n].shape), base[n]), (key, r, n)
            # The consolidated adapter folder loads into a fresh base model with peft itself and
            # holds exactly the trained adapters; its outputs match the single-process model's.
            loaded = PeftModel.from_pretrained(_base_model(kind), got["saved"]).eval()
            loaded_adapters = {n: p for n, p in loaded.named_parameters() if n in got["adapters"]}
            assert set(loaded_adapters) == set(got["adapters"]), key
            for n, p in loaded_adapters.items():
                assert torch.equal(p.detach(), got["adapters"][n]), (key, n)
            with torch.no_grad():
                torch.testing.assert_close(label_logits(loaded, batch, ids), label_logits(ref_model, batch, ids),
                                           rtol=0, atol=1e-4, msg=key)
        moved = max((ref_adapters[n] - init[n]).abs().max().item() for n in init)
        assert moved > 20 * ATOL, (kind, mode, moved)
    # Resumed from the step-2 checkpoint (adapters only; the persistent ZeRO-3 copies synced on
    # load), each engine repeats its own uninterrupted steps 3-4 bit for bit.
    kind, mode = RESUMED
    for engine in ENGINES:
        for r in range(2):
            resumed, full = ranks[r][f"resumed/{engine}"], ranks[r][f"{kind}/{mode}/{engine}"]
            assert resumed["losses"] == full["losses"][RESUME_AT:], (engine, r)
            for n, p in full["adapters"].items():
                assert torch.equal(resumed["adapters"][n], p), (engine, r, n)
