"""Forward-Grad: data-parallel replicas follow one process; ZeRO-3 and FSDP2 are refused.

Two spawned gloo ranks. DeepSpeed preamble as in test_deepspeed.py (CPU accelerator, no JIT
build of the shared-memory comm op).
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

deepspeed = pytest.importorskip("deepspeed")
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from tests.distributed.spawn import run  # noqa: E402
from zoscale.engines import DeepSpeedShards, FSDPShards, apply_fsdp, build_mesh, zero3_engine  # noqa: E402
from zoscale.models import tiny_llama  # noqa: E402
from zoscale.optim.forward_grad import ForwardGrad  # noqa: E402

pytestmark = pytest.mark.distributed

STEPS, BATCH, Q = 4, 16, 2
OPTIONS = dict(lr=0.05, weight_decay=0.01, q=Q, seed=7)


@pytest.fixture(autouse=True)
def _eager_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")  # inherited by the ranks; see test_fsdp.py


def _mlp() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[tuple[int, ...]]]:
    """STEPS steps; returns the losses and the shapes of the all-reduces the optimizer issued."""
    opt = ForwardGrad(model.named_parameters(), module=model, **OPTIONS)
    calls: list[tuple[int, ...]] = []
    original = dist.all_reduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        losses = [opt.step(lambda: F.cross_entropy(model(x), y)) for _ in range(STEPS)]
    finally:
        dist.all_reduce = original
    return losses, calls


def _replica_worker(rank: int, world: int, out: str) -> None:
    x, y = _data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = _mlp()
    losses, calls = _train(model, x[part], y[part])
    # One all-reduce of [loss, d] per query, nothing else (the forwards of replicas communicate nothing).
    assert calls == [(2,)] * (STEPS * Q), calls
    torch.save({"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}},
               f"{out}/rank{rank}.pt")


def test_data_parallel_replicas_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    x, y = _data()
    ref_model = _mlp()
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
    assert any(not torch.equal(p.detach(), q.detach()) for p, q in zip(ref_model.parameters(), _mlp().parameters()))


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
    for zero in ({"stage": 3, "stage3_param_persistence_threshold": 0}, {"stage": 3}):
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero}
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
