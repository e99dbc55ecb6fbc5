"""Forward-Grad: data-parallel replicas follow one process; ZeRO-3 and FSDP2 are refused.

Two spawned gloo ranks. DeepSpeed set up by cpu_deepspeed.py (CPU accelerator, no JIT
build of the shared-memory comm op).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.cpu_deepspeed import import_deepspeed

import_deepspeed()  # before anything imports DeepSpeed

from tests.distributed.builders import rank_part, replica_batch, replica_mlp, zero3_config  # noqa: E402
from tests.distributed.collectives import all_reduces, shapes  # noqa: E402
from tests.distributed.spawn import run  # noqa: E402
from zoscale.engines import DeepSpeedShards, FSDPShards, apply_fsdp, build_mesh, zero3_engine  # noqa: E402
from zoscale.models import tiny_llama  # noqa: E402
from zoscale.optim.base import OPTION_CHECK_SHAPE  # noqa: E402
from zoscale.optim.forward_grad import ForwardGrad  # noqa: E402

pytestmark = pytest.mark.distributed

STEPS, BATCH, Q = 4, 16, 2
OPTIONS = dict(lr=0.05, weight_decay=0.01, q=Q, seed=7)


@pytest.fixture(autouse=True)
def _eager_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")  # inherited by the ranks; see test_fsdp.py


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[tuple[int, ...]]]:
    """STEPS steps; returns the losses and the shapes of the all-reduces the optimizer issued."""
    opt = ForwardGrad(model.named_parameters(), module=model, **OPTIONS)
    with all_reduces() as counter:
        losses = [opt.step(lambda: F.cross_entropy(model(x), y)) for _ in range(STEPS)]
    return losses, shapes(counter.calls)


def _replica_worker(rank: int, world: int, out: str) -> None:
    x, y = replica_batch(BATCH)
    part = rank_part(rank, world, BATCH)
    model = replica_mlp()
    losses, calls = _train(model, x[part], y[part])
    # One all-reduce of [loss, d] per query, nothing else (the forwards of replicas communicate nothing).
    # (After the first step's option check: one all-reduce of OPTION_CHECK_SHAPE.)
    assert calls == [OPTION_CHECK_SHAPE] + [(2,)] * (STEPS * Q), calls
    torch.save({"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}},
               f"{out}/rank{rank}.pt")


def test_data_parallel_replicas_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    x, y = replica_batch(BATCH)
    ref_model = replica_mlp()
    ref_losses, _ = _train(ref_model, x, y)
    run(_replica_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for n, p in results[0]["params"].items():  # the same seeded updates: bitwise equal replicas
        assert torch.equal(p, results[1]["params"][n]), n
    # The mean of two half-batch means (and of their directional derivatives: d is linear in
    # the loss) is the full-batch value up to float64 rounding.
    assert results[0]["losses"] == pytest.approx(ref_losses, rel=1e-12)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(results[0]["params"][n], p.detach(), rtol=1e-10, atol=1e-12)
    start = replica_mlp().parameters()
    assert any(not torch.equal(p.detach(), q.detach()) for p, q in zip(ref_model.parameters(), start))


def _engine_worker(rank: int, world: int, out: str) -> None:
    ids = torch.randint(2, 262, (4, 8), generator=torch.Generator().manual_seed(3))[rank * 2:(rank + 1) * 2]

    # ZeRO stage 2: DeepSpeedShards, but every rank holds whole parameters: accepted, and the run
    # equals the same replicas without DeepSpeed, bitwise.
    runs = {}
    for how in ("replicas", "zero2"):
        model = tiny_llama(seed=0)
        if how == "zero2":
            config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}
            engine, opt = zero3_engine(model, config, optimizer=lambda named: ForwardGrad(
                named, module=model, lr=1e-3, seed=3))
            assert isinstance(opt.shards, DeepSpeedShards)
            module = engine.module
        else:
            opt, module = ForwardGrad(model.named_parameters(), module=model, lr=1e-3, seed=3), model
        losses = [opt.step(lambda: module(input_ids=ids, labels=ids).loss) for _ in range(2)]
        runs[how] = (losses, {n: p.detach().clone() for n, p in module.named_parameters()})
    assert runs["zero2"][0] == runs["replicas"][0]
    for n, p in runs["replicas"][1].items():
        assert torch.equal(runs["zero2"][1][n], p), n

    # ZeRO-3 (everything sharded, and the default threshold: everything kept whole): refused by
    # name, before any view (a persistent parameter's first view would all-gather).
    for config in (zero3_config(2), zero3_config(2, persist=None)):
        model = tiny_llama(seed=0)
        with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
            zero3_engine(model, config, optimizer=lambda named: ForwardGrad(named, module=model, lr=1e-3))
        gc.collect()

    # FSDP2: refused by name.
    model = apply_fsdp(tiny_llama(seed=0), build_mesh())
    with pytest.raises(ValueError, match="FSDP2 DTensor shard"):
        ForwardGrad(model.named_parameters(), module=model, lr=1e-3, shards=FSDPShards(module=model))
    del model
    gc.collect()  # FSDP modules sit in reference cycles: free them before the group goes


def test_zero3_and_fsdp2_are_refused_and_zero2_replicas_work(tmp_path: Path) -> None:
    run(_engine_worker, 2, str(tmp_path))
