"""Data-parallel replicas: one code path for 1 and N ranks; the only traffic is the loss pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.builders import rank_part, replica_batch, replica_mlp
from tests.distributed.collectives import Collectives
from tests.distributed.spawn import run
from zoscale.optim import MeZO
from zoscale.optim.base import OPTION_CHECK_SHAPE

pytestmark = pytest.mark.distributed

STEPS, BATCH = 5, 16


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, q: int) -> list[float]:
    opt = MeZO(model.named_parameters(), lr=0.05, eps=1e-3, q=q, seed=7, weight_decay=0.01)
    return [opt.step(lambda: F.cross_entropy(model(x), y)) for _ in range(STEPS)]


def _worker(rank: int, world: int, q: int, out: str) -> None:
    x, y = replica_batch(BATCH)
    shard = rank_part(rank, world, BATCH)
    model = replica_mlp()
    with Collectives() as traffic:
        losses = _train(model, x[shard], y[shard], q)
    calls = [(c.name, c.shape) for c in traffic.calls]
    # The first step's option check (one all-reduce, OPTION_CHECK_SHAPE), then the loss pairs.
    assert calls == [("all_reduce", OPTION_CHECK_SHAPE)] + [("all_reduce", (2,))] * (STEPS * q), calls
    torch.save({"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}},
               f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("q", [1, 2])
def test_two_replicas_equal_one_process_on_the_whole_batch(tmp_path: Path, q: int) -> None:
    x, y = replica_batch(BATCH)
    ref_model = replica_mlp()
    ref_losses = _train(ref_model, x, y, q)
    run(_worker, 2, q, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Both replicas applied the same seeded updates: bitwise identical.
    for n, p in results[0]["params"].items():
        assert torch.equal(p, results[1]["params"][n]), n
    # The mean of two half-batch means is the full-batch mean up to float64 rounding.
    assert results[0]["losses"] == pytest.approx(ref_losses, rel=1e-12)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(results[0]["params"][n], p.detach(), rtol=1e-10, atol=1e-12)

