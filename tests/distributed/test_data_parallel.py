"""Data-parallel replicas: one code path for 1 and N ranks; the only traffic is the loss pair."""

from __future__ import annotations


from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.spawn import run
from zoscale.optim import MeZO

pytestmark = pytest.mark.distributed

STEPS, BATCH = 5, 16
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "send", "recv", "barrier", "reduce", "gather", "scatter")


def _model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, q: int) -> list[float]:
    opt = MeZO(model.named_parameters(), lr=0.05, eps=1e-3, q=q, seed=7, weight_decay=0.01)
    return [opt.step(lambda: F.cross_entropy(model(x), y)) for _ in range(STEPS)]


def _worker(rank: int, world: int, q: int, out: str) -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name):
        def counted(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.append((name, tuple(tensor.shape) if tensor is not None else ()))
            return originals[name](*args, **kwargs)

        return counted

    x, y = _data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = _model()
    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    try:
        losses = _train(model, x[shard], y[shard], q)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert calls == [("all_reduce", (2,))] * (STEPS * q), calls
    torch.save({"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}},
               f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("q", [1, 2])
def test_two_replicas_equal_one_process_on_the_whole_batch(tmp_path: Path, q: int) -> None:
    x, y = _data()
    ref_model = _model()
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

