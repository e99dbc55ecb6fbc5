"""Ranks that disagree on an optimizer option are refused at the first step, before anything moves.

Every registered optimizer on 2 gloo ranks holding data-parallel replicas (and MeZO on FSDP2):
a different ``seed`` per rank raises ``ValueError`` on both ranks, naming the option and what
each rank has, with no forward run and no parameter changed; equal options cost one extra
all-reduce (``OPTION_CHECK_SHAPE``), at the first step only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import optim_table as T
from tests.distributed.collectives import Collectives
from tests.distributed.spawn import run
from zoscale.optim import MeZO, build_optimizer
from zoscale.optim.base import OPTION_CHECK_SHAPE

pytestmark = pytest.mark.distributed

SEED_MESSAGE = "ranks disagree on optimizer option 'seed': rank 0 has 0, rank 1 has 1"


def _attempt(opt: Any, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """One step that must be refused: returns the error and what the refusal left untouched."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forwards = []

    def closure() -> torch.Tensor:
        forwards.append(1)
        return T.closure(model, ids)()

    try:
        opt.step(closure)
        error = None
    except ValueError as e:
        error = str(e)
    unchanged = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    return {"error": error, "forwards": len(forwards), "unchanged": unchanged, "step": opt.step_count,
            "log": len(opt.step_log)}


def _worker(rank: int, world: int, out: str) -> None:
    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"
    ids = T.data()[rank * T.BATCH // world:(rank + 1) * T.BATCH // world]
    results: dict[str, Any] = {}

    # Every optimizer, replicas: the ranks disagree on the seed.
    for rec in T.RECORDS:
        model = T.model()
        opt = build_optimizer(rec.name, model.named_parameters(), {**rec.kwargs, "seed": rank}, module=model)
        results[rec.name] = _attempt(opt, model, ids)
        if rec.name == "sparse_mezo":
            results[rec.name]["thresholds"] = opt.thresholds()  # its first step's collectives did not run

    # Several options at once, one of them per group.
    model = T.model()
    opt = MeZO(model.named_parameters(), lr=1e-3 * (rank + 1), eps=1e-3, seed=rank)
    results["several"] = _attempt(opt, model, ids)

    # FSDP2: the shard provider's loss group; the local shards are unchanged.
    from zoscale.engines import FSDPEngine

    engine = FSDPEngine(T.model())
    opt = MeZO(engine.module.named_parameters(), lr=1e-3, seed=rank, shards=engine.shards)
    local = [e.view.local.clone() for e in opt.shard_entries()]
    results["fsdp"] = _attempt(opt, engine.module, ids)
    results["fsdp"]["unchanged"] = bool(local) and all(
        torch.equal(e.view.local, x) for e, x in zip(opt.shard_entries(), local))
    del engine, opt

    # Equal options: one extra all-reduce at the first step, none after; the replicas agree.
    agreed = {}
    for rec in T.RECORDS:
        model = T.model()
        opt = build_optimizer(rec.name, model.named_parameters(), dict(rec.kwargs), module=model)
        with Collectives() as traffic:
            steps = []
            for _ in range(3):
                n = len(traffic.optimizer)
                opt.step(traffic.closure(T.closure(model, ids)))
                steps.append([(c.name, c.shape) for c in traffic.optimizer[n:]])
        agreed[rec.name] = {"steps": steps, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    results["agreed"] = agreed
    torch.save(results, f"{out}/rank{rank}.pt")


def test_ranks_that_disagree_on_an_option_are_refused_before_anything_moves(tmp_path: Path) -> None:
    run(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r, got in enumerate(ranks):
        for rec in T.RECORDS:
            res = got[rec.name]
            assert res["error"] is not None and SEED_MESSAGE in res["error"], (r, rec.name, res["error"])
            # Only the seed differs: no other option is named.
            assert "disagree on optimizer option 'seed':" in res["error"], (rec.name, res["error"])
            assert res["forwards"] == 0 and res["unchanged"], (r, rec.name, res)
            assert res["step"] == 0 and res["log"] == 0, (r, rec.name, res)
        assert got["sparse_mezo"]["thresholds"] == {}
        several = got["several"]["error"]
        assert several is not None and "ranks disagree on optimizer options" in several, several
        assert "'lr': rank 0 has 0.001, rank 1 has 0.002" in several, several
        assert "'seed': rank 0 has 0, rank 1 has 1" in several, several
        assert "'eps'" not in several, several
        fsdp = got["fsdp"]
        assert fsdp["error"] is not None and SEED_MESSAGE in fsdp["error"], fsdp
        assert fsdp["forwards"] == 0 and fsdp["unchanged"], fsdp
    for rec in T.RECORDS:
        for r, got in enumerate(ranks):
            first, *later = got["agreed"][rec.name]["steps"]
            # The check is the first step's first collective, and its only extra one (besides
            # Sparse MeZO's thresholds, fixed at the first step: 4 radix rounds).
            assert first[0] == ("all_reduce", OPTION_CHECK_SHAPE), (rec.name, first)
            per_step = len(later[0])
            assert first[len(first) - per_step:] == later[0] == later[1], (rec.name, first, later)
            extra = first[1:len(first) - per_step]
            if rec.name == "sparse_mezo":
                assert len(extra) == 4 and all(n == "all_reduce" and s[1:] == (257,) for n, s in extra), extra
            else:
                assert extra == [], (rec.name, first, later)
            assert ("all_reduce", OPTION_CHECK_SHAPE) not in later[0], (rec.name, later)
        params = [got["agreed"][rec.name]["params"] for got in ranks]
        assert params[0], rec.name
        for n, p in params[0].items():
            assert torch.equal(p, params[1][n]), (rec.name, n)
