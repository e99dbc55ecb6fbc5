"""Every registered optimizer on DeepSpeed ZeRO-3 and FSDP2 (2 gloo ranks) against one process.

Driven by ``tests/optim_table.py``. For each engine, one set of spawned ranks runs every record:
``STEPS`` steps on half batches (the same trajectory as one process on the whole batch, within
the fp32 tolerance derived in ``test_deepspeed.py``), then the same run interrupted after 2
steps, checkpointed with ``zoscale.train.checkpoint``, rebuilt from the base weights and
resumed (bitwise equal to the uninterrupted run on that engine). The step log crosses layouts
bit for bit both ways (issue 12): the engine's log replayed on one process gives the engine's
weights, and the one-process log replayed on the engine gives the one-process weights. Full
checkpoints cross layouts too (DCP): each engine's loads on one process, one process's loads on
each engine, ZeRO-3's loads on FSDP2 and FSDP2's on ZeRO-3, and the run continues exactly as after replaying the
checkpoint's step log there. An optimizer that cannot run on
an engine must refuse to be built there with a ``ValueError`` naming the engine.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

deepspeed = pytest.importorskip("deepspeed")
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from tests import optim_table as T  # noqa: E402
from tests.distributed.spawn import run  # noqa: E402
from zoscale.engines import FSDPEngine, zero3_engine  # noqa: E402
from zoscale.optim import OPTIMIZERS, build_optimizer  # noqa: E402
from zoscale.shards import canonical_name  # noqa: E402
from zoscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.distributed

ATOL = 5e-5  # parameters against one process: test_deepspeed.py derives it for these step sizes
ENGINE_NAMES = {"zero3": "DeepSpeed", "fsdp": "FSDP"}


class _Run:
    """Builds one engine + optimizer for a record on this rank, steps it, gathers full weights."""

    def __init__(self, engine: str, rec: T.OptimRecord, **options: Any) -> None:
        self.kind = engine
        model = T.model()
        kwargs = {**rec.kwargs, **options}
        if engine == "zero3":
            cfg = {"train_micro_batch_size_per_gpu": T.BATCH // 2,
                   "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                   "optimizer": {"type": rec.name, "params": kwargs}}
            self.engine, self.opt = zero3_engine(model, cfg)
            self.module = self.engine.module
        else:
            self.engine = FSDPEngine(model)
            self.module = self.engine.module
            self.opt = build_optimizer(rec.name, self.module.named_parameters(), kwargs,
                                       shards=self.engine.shards, module=self.module)

    def step(self, ids: torch.Tensor) -> float:
        return self.opt.step(T.closure(self.module, ids))

    def full_params(self) -> dict[str, torch.Tensor]:
        """The whole parameters, gathered on every rank (collective; a tied head appears once)."""
        named = list(self.module.named_parameters())
        if self.kind == "zero3":
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                full = {n: p.detach().clone().reshape(p.ds_shape) for n, p in named}
        else:  # FSDP2 DTensors: all-gathered here, not consolidated on rank 0 only
            full = {n: p.full_tensor().detach().clone() for n, p in named}
        assert full, self.kind
        return full

    def shards(self) -> dict[str, tuple[int, torch.Tensor]]:
        """What this rank holds and trains: stable id -> (flat offset, copy of the local shard)."""
        held = {e.stable_id: (e.view.offset, e.view.local.detach().clone()) for e in self.opt.shard_entries()}
        assert held, self.kind
        return held


#: Optimizers whose full checkpoints are also loaded on other layouts in the spawned ranks (the
#: issue's three: plain, low-rank row factors, per-element moments); every one's engine checkpoint
#: loads on one process.
CROSS = ("mezo", "lozo_m", "zo_adam")


def _continued(engine: str, rec: T.OptimRecord, path: Path, ids: torch.Tensor, rank: int,
               world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two steps after loading the checkpoint at ``path`` on ``engine``, and the same two steps
    after replaying the checkpoint's own step log from the base weights instead (the reference:
    the log crosses layouts bit for bit). Returns (losses, weights) of both, in that order."""
    if engine == "local":
        m, m_ref = T.model(), T.model()
        opt, ref = T.build(rec, m.named_parameters(), module=m), T.build(rec, m_ref.named_parameters(), module=m_ref)
        assert load_checkpoint(latest_checkpoint(path), opt, rank, world) == 2
        ref.replay(opt.step_log)
        return tuple(([o.step(T.closure(x, ids)) for _ in range(2)], {n: p.detach() for n, p in x.named_parameters()})
                     for o, x in ((opt, m), (ref, m_ref)))
    r = _Run(engine, rec)
    assert load_checkpoint(latest_checkpoint(path), r.opt, rank, world) == 2
    log = list(r.opt.step_log)
    got = ([r.step(ids) for _ in range(2)], r.full_params())
    del r
    r = _Run(engine, rec)
    r.opt.replay(log)
    want = ([r.step(ids) for _ in range(2)], r.full_params())
    return got, want


def _continue_from(engine: str, rec: T.OptimRecord, path: Path, ids: torch.Tensor, rank: int, world: int) -> None:
    """A checkpoint of another layout continues here as its replayed log does: bit for bit."""
    (got_losses, got), (want_losses, want) = _continued(engine, rec, path, ids, rank, world)
    assert got_losses == want_losses, (engine, rec.name, str(path), got_losses, want_losses)
    for n, p in want.items():
        assert torch.equal(got[n], p), (engine, rec.name, str(path), n)


def _worker(rank: int, world: int, engine: str, out: str) -> None:
    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"
    ids = T.data()[rank * T.BATCH // world:(rank + 1) * T.BATCH // world]
    results: dict[str, Any] = {}
    for rec in T.RECORDS:
        if engine not in rec.engines:
            with pytest.raises(ValueError, match=ENGINE_NAMES[engine]):
                _Run(engine, rec)
            results[rec.name] = "refused"
            continue
        r = _Run(engine, rec)
        losses = [r.step(ids) for _ in range(T.STEPS)]
        params, shards, log = r.full_params(), r.shards(), r.opt.step_log
        del r
        # Interrupted after 2 steps, resumed from the checkpoint on fresh base weights.
        ckpt = Path(out) / f"{rec.name}_ckpt"
        r = _Run(engine, rec)
        first = [r.step(ids) for _ in range(2)]
        save_checkpoint(ckpt, 2, r.opt, rank, world, keep=1)
        del r
        r = _Run(engine, rec)
        assert load_checkpoint(latest_checkpoint(ckpt), r.opt, rank, world) == 2
        resumed = first + [r.step(ids) for _ in range(T.STEPS - 2)]
        resumed_params = r.full_params()
        del r
        assert resumed == losses, (engine, rec.name, resumed, losses)
        assert params and set(resumed_params) == set(params), (engine, rec.name)
        for n, p in params.items():
            assert torch.equal(resumed_params[n], p), (engine, rec.name, n)
        results[rec.name] = {"losses": losses, "params": params, "shards": shards, "log": list(log)}
        if rec.name in CROSS:  # full checkpoints across layouts: one process -> here, and ZeRO-3 -> FSDP2
            _continue_from(engine, rec, Path(out) / "one_process_ckpt" / rec.name, ids, rank, world)
            if engine == "zero3":  # and ZeRO-3's on FSDP2, FSDP2's on ZeRO-3
                _continue_from("fsdp", rec, ckpt, ids, rank, world)
                r = _Run("fsdp", rec)
                for _ in range(2):
                    r.step(ids)
                save_checkpoint(Path(out) / f"{rec.name}_fsdp_ckpt", 2, r.opt, rank, world, keep=1)
                del r
                _continue_from("zero3", rec, Path(out) / f"{rec.name}_fsdp_ckpt", ids, rank, world)
        if rec.name != "hybrid":  # the step log of one process, replayed on this engine: its weights, bitwise
            _, ref_params, ref_opt = T.run_local(rec)
            r = _Run(engine, rec)
            r.opt.replay(ref_opt.step_log)
            r.opt.flush()
            replayed = r.full_params()
            del r
            for n, p in ref_params.items():
                assert torch.equal(replayed[n], p), (engine, rec.name, "replay of the one-process log", n)
        if OPTIMIZERS[rec.name].supports_two_pass():  # deferred updates: the same run within rounding
            r = _Run(engine, rec, two_pass=True)
            two_pass = [r.step(ids) for _ in range(T.STEPS)]
            r.opt.flush()
            results[rec.name]["two_pass"] = {"losses": two_pass, "params": r.full_params()}
            del r
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_every_optimizer_follows_the_single_process_trajectory(engine: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The eager noise kernels in the ranks and in the reference: bit-identical z everywhere.
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    for rec in T.RECORDS:  # one process's checkpoints after 2 steps, which the ranks load on their layout
        if rec.name in CROSS:
            m = T.model()
            opt = T.build(rec, m.named_parameters(), module=m)
            for _ in range(2):
                opt.step(T.closure(m, T.data()))
            save_checkpoint(tmp_path / "one_process_ckpt" / rec.name, 2, opt, 0, 1, keep=1)
    run(_worker, 2, engine, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rec in T.RECORDS:
        got = ranks[0][rec.name]
        if engine not in rec.engines:
            assert got == "refused"
            continue
        # Both ranks saw the same averaged losses and gathered the same whole weights.
        assert got["losses"] == ranks[1][rec.name]["losses"], rec.name
        assert got["params"] and set(ranks[1][rec.name]["params"]) == set(got["params"]), rec.name
        for n, p in got["params"].items():
            assert torch.equal(p, ranks[1][rec.name]["params"][n]), (rec.name, n)
        ref_losses, ref_params, _ = T.run_local(rec)
        # What each rank really holds and trains: its shards against the reference's slices, and
        # together the ranks' shards cover every element of every trainable tensor.
        ref_flat = {canonical_name(n): p.reshape(-1) for n, p in ref_params.items()}
        covered = {sid: torch.zeros(t.numel(), dtype=torch.bool) for sid, t in ref_flat.items()}
        for r, got_r in enumerate(ranks):
            shards = got_r[rec.name]["shards"]
            assert shards, (engine, rec.name, r)
            for sid, (offset, local) in shards.items():
                ref = ref_flat[sid][offset:offset + local.numel()]
                torch.testing.assert_close(local, ref, rtol=0, atol=ATOL, msg=f"{engine} {rec.name} rank {r} {sid}")
                covered[sid][offset:offset + local.numel()] = True
        trained = {sid for got_r in ranks for sid in got_r[rec.name]["shards"]}
        assert trained == set(ref_flat) and all(c.all() for c in covered.values()), (engine, rec.name, trained)
        # The sole difference from one process is the loss: the mean of two fp32 half-batch
        # means instead of one mean, a few ulp apart, which the projected gradient amplifies by
        # 1/(2 eps); test_deepspeed.py derives the resulting parameter bound (5e-5 here).
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), rec.name
        assert set(got["params"]) == set(ref_params), rec.name
        start = dict(T.model().named_parameters())
        moved = 0.0
        for n, p in ref_params.items():
            torch.testing.assert_close(got["params"][n], p, rtol=0, atol=ATOL, msg=f"{engine} {rec.name} {n}")
            moved = max(moved, (p - start[n].detach()).abs().max().item())
        assert moved > 20 * ATOL, (rec.name, moved)  # the bound is far below how far the run moved
        if rec.name != "hybrid":  # this engine's log replayed on one process: the engine's weights, bitwise
            m = T.model()
            replayer = T.build(rec, m.named_parameters(), module=m)
            replayer.replay(got["log"])
            for n, p in m.named_parameters():
                assert torch.equal(p.detach(), got["params"][n]), (engine, rec.name, "replay on one process", n)
        # This engine's full checkpoint after 2 steps continues on one process as its replayed log
        # does, bit for bit; the hybrid's per-rank first-order state is refused on another world size.
        if rec.name == "hybrid":
            m = T.model()
            with pytest.raises(ValueError, match="per-rank optimizer state .* resume it on 2 ranks"):
                opt = T.build(rec, m.named_parameters(), module=m)
                load_checkpoint(latest_checkpoint(tmp_path / "hybrid_ckpt"), opt, 0, 1)
        else:
            _continue_from("local", rec, tmp_path / f"{rec.name}_ckpt", T.data(), 0, 1)
        if "two_pass" in got:  # the two-pass step against the three-pass one-process run
            assert got["two_pass"]["losses"] == pytest.approx(ref_losses, rel=1e-5), rec.name
            for n, p in ref_params.items():
                torch.testing.assert_close(got["two_pass"]["params"][n], p, rtol=0, atol=ATOL,
                                           msg=f"{engine} {rec.name} two-pass {n}")


def _json_worker(rank: int, world: int, out: str) -> None:
    """Each optimizer's shipped DeepSpeed JSON through the real trainer, as launch/train.py runs it."""
    import argparse
    import json

    from zoscale.engines.deepspeed import DeepSpeedBuilder
    from zoscale.train.launch import resolve_config
    from zoscale.train.trainer import train

    os.environ["ZOSCALE_NOISE_BACKEND"] = "eager"
    data = Path(out) / "toy.jsonl"
    if rank == 0:
        words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
        data.write_text("".join(json.dumps({"sentence": f"a {words[i % 2][i % 4]} film {i}", "label": i % 2}) + "\n"
                                for i in range(40)))
    torch.distributed.barrier()
    summaries = {}
    # ZeRO-2 JSONs first: building a model under ZeRO-3 (zero.Init via HfDeepSpeedConfig) leaves
    # DeepSpeed's autograd.Function around F.linear installed in this process, which forward-mode
    # AD cannot go through; a real job is one process per JSON, so it never sees that.
    for rec in sorted(T.RECORDS, key=lambda r: "zero3" in r.engines):
        stage = 3 if "zero3" in rec.engines else 2
        path = Path(__file__).resolve().parents[2] / "ds_configs" / f"zero{stage}_{rec.name}.json"
        args = argparse.Namespace(
            config=None, ds_config=str(path), engine=None, hsdp=None, model="tiny-llama", data=str(data), steps=2,
            eval_every=0, checkpoint_every=None, seed=None, output_dir=str(Path(out) / rec.name), resume=False,
            no_progress=True, overrides=["data.n_train=16", "data.n_eval=8", "eval_batch_size=8"])
        cfg, ds_config = resolve_config(args)
        summaries[rec.name] = train(cfg, progress=False, builder=DeepSpeedBuilder(ds_config))
    if rank == 0:
        torch.save(summaries, f"{out}/summaries.pt")


def test_every_shipped_optimizer_json_runs_the_trainer(tmp_path: Path) -> None:
    """The JSON of each optimizer runs launch/train.py's job (tiny Llama, 2 steps) on 2 DeepSpeed ranks."""
    run(_json_worker, 2, str(tmp_path))
    summaries = torch.load(tmp_path / "summaries.pt", weights_only=False)
    assert sorted(summaries) == sorted(r.name for r in T.RECORDS)
    for name, summary in summaries.items():
        assert summary["steps"] == 2 and summary["world_size"] == 2, name
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, metrics)
        assert (tmp_path / name / "final").is_dir(), name
