"""Every registered optimizer, one process: the properties a torch optimizer must have.

Driven by ``tests/optim_table.py``. Each test would fail for an optimizer that kept state outside
``state_dict()``, drew noise from the global RNG, lost its place on resume, accepted a bad
option, or touched parameters before validating.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests import optim_table as T
from zoscale.optim import OPTIMIZERS, build_optimizer
from zoscale.shards import canonical_name
from zoscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

NAMES = [r.name for r in T.RECORDS]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _eager_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference kernels: no compile per test; bitwise the same z as the engines' tests.
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def test_every_registered_optimizer_has_a_record_and_a_ds_config() -> None:
    assert sorted(OPTIMIZERS) == sorted(NAMES)
    for rec in T.RECORDS:
        # ZeRO-3 where the optimizer runs on it; else ZeRO-2 (replicas; FSDP2 reads the same JSON).
        stage = 3 if "zero3" in rec.engines else 2
        path = REPO / "ds_configs" / f"zero{stage}_{rec.name}.json"
        assert path.is_file(), f"{rec.name}: {path} is missing"
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] == stage, path
        section = config["optimizer"]
        assert section["type"].lower() == rec.name, (path, section["type"])
        # The config's options build the optimizer (unknown keys and bad values would raise).
        m = T.model()
        build_optimizer(section["type"], m.named_parameters(), section.get("params", {}), module=m)


@pytest.mark.parametrize("name", NAMES)
def test_two_runs_are_bitwise_equal_and_global_rng_is_untouched(name: str) -> None:
    rec = T.record(name)
    rng = torch.get_rng_state()
    losses1, params1, _ = T.run_local(rec)
    assert torch.equal(torch.get_rng_state(), rng)
    losses2, params2, _ = T.run_local(rec)
    assert losses1 == losses2
    moved = 0.0
    start = dict(T.model().named_parameters())
    for n, p in params1.items():
        assert torch.equal(p, params2[n]), (name, n)
        moved = max(moved, (p - start[n].detach()).abs().max().item())
    assert moved > 1e-4, (name, moved)  # the run really moved the weights


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_in_lockstep(name: str) -> None:
    rec = T.record(name)
    ids = T.data()
    model_p = T.model()
    primed = build_optimizer(name, model_p.named_parameters(), dict(rec.kwargs), module=model_p)
    for _ in range(3):
        primed.step(T.closure(model_p, ids))
    saved = primed.state_dict()
    frozen = copy.deepcopy(saved)
    # A fresh optimizer on a copy of the primed weights, built with other hyperparameters on
    # purpose: everything must come from the state dict.
    model_f = copy.deepcopy(model_p)
    fresh = build_optimizer(name, model_f.named_parameters(), {**rec.kwargs, "lr": 0.5, "seed": 99}, module=model_f)
    fresh.load_state_dict(saved)
    for _ in range(3):
        assert fresh.step(T.closure(model_f, ids)) == primed.step(T.closure(model_p, ids)), name
    for (n, a), b in zip(model_f.named_parameters(), model_p.parameters()):
        assert torch.equal(a, b), (name, n)
    # The saved dict was not changed by the later steps.
    _assert_same(saved, frozen)


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(name: str, tmp_path: Path) -> None:
    rec = T.record(name)
    ids = T.data()
    losses, params, _ = T.run_local(rec, steps=T.STEPS, ids=ids)
    m = T.model()
    opt = build_optimizer(name, m.named_parameters(), dict(rec.kwargs), module=m)
    first = [opt.step(T.closure(m, ids)) for _ in range(2)]
    save_checkpoint(tmp_path, 2, opt, rank=0, world_size=1, keep=1)
    del m, opt
    m = T.model()  # the base weights again: the checkpoint must restore them and the state
    opt = build_optimizer(name, m.named_parameters(), dict(rec.kwargs), module=m)
    start = load_checkpoint(latest_checkpoint(tmp_path), opt, rank=0, world_size=1)
    assert start == 2
    rest = [opt.step(T.closure(m, ids)) for _ in range(T.STEPS - 2)]
    assert first + rest == losses, name
    for n, p in m.named_parameters():
        assert torch.equal(p, params[n]), (name, n)


@pytest.mark.parametrize(
    "name,options,match",
    [(r.name, o, m) for r in T.RECORDS for o, m in (*T.COMMON_ERRORS, *r.errors)],
)
def test_bad_options_raise_before_touching_parameters(name: str, options: dict, match: str) -> None:
    rec = T.record(name)
    m = T.model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, m.named_parameters(), {**rec.kwargs, **options}, module=m)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_missing_closure_raises(name: str) -> None:
    m = T.model()
    opt = build_optimizer(name, m.named_parameters(), dict(T.record(name).kwargs), module=m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_with_lora_only_the_adapters_move(name: str) -> None:
    """Every optimizer on a peft LoRA model: the base weights stay bitwise, the adapters train."""
    from zoscale.peft import adapter_parameters, apply_peft

    rec = T.record(name)
    m = apply_peft(T.model(), {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    adapters = adapter_parameters(m)
    assert adapters and all("lora_" in n for n, _ in adapters)
    opt = build_optimizer(name, adapters, {**rec.kwargs, **rec.peft_kwargs, "eps": 1e-2} if name != "forward_grad"
                          else {**rec.kwargs, **rec.peft_kwargs}, module=m)
    ids = T.data()
    for _ in range(3):
        opt.step(T.closure(m, ids))
    names = {n for n, _ in adapters}
    moved = [n for n, p in m.named_parameters() if n in names and not torch.equal(p, before[n])]
    for n, p in m.named_parameters():
        if n not in names:
            assert torch.equal(p, before[n]), (name, n)
    assert moved, name
    # What a checkpoint saves is exactly the adapters.
    assert {e.stable_id for e in opt.shard_entries()} <= {canonical_name(n) for n in names}
