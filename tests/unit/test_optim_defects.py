"""Regression tests for the defects of issue 11, item 4 (one process; the rank checks are in
``tests/distributed/test_option_agreement.py``).

    1. ``add_param_group`` after construction: the added group steps like a group given at
       construction (noise keyed by its stable ids), for every registered optimizer.
    3. Global options declare themselves (``GLOBAL_KEYS``); a param group that sets one to a
       value other than the optimizer's is refused, naming the key and the group.
    4. No ``assert`` in the optimizers (gone under ``python -O``): explicit ``RuntimeError``.
    5. The compiled noise kernels leave torch's global dynamo recompile limits alone.
    6. The docstrings of ``zoscale/engines/base.py`` (the engine contract) and ``checkpoint.py`` name
       real things.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import optim_table as T
from zoscale.optim import OPTIMIZERS, LOZO, LOZOM, BlockwiseZO, LeZO, MeZO, SparseMeZO, build_optimizer
from zoscale.optim.directions import Masked
from zoscale.optim.sparse_mezo import RadixSelect

REPO = Path(__file__).resolve().parents[2]
NAMES = [r.name for r in T.RECORDS]


@pytest.fixture(autouse=True)
def _eager_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


# ============================================================================ 1. add_param_group
def _split(model: torch.nn.Module, named: bool) -> tuple[list, list]:
    """Group A: everything but block 0 (so the hybrid's FO part is in A); group B: block 0."""
    a = [(n, p) for n, p in model.named_parameters() if ".layers.0." not in n]
    b = [(n, p) for n, p in model.named_parameters() if ".layers.0." in n]
    assert a and b
    if not named:
        a, b = [p for _, p in a], [p for _, p in b]
    return a, b


def _run(rec: T.OptimRecord, named: bool, late: bool) -> tuple[list[float], dict[str, torch.Tensor], list, Any]:
    model = T.model()
    a, b = _split(model, named)
    group_b = {"params": b, "lr": rec.kwargs["lr"] / 2}
    if late:
        opt = build_optimizer(rec.name, a, dict(rec.kwargs), module=model)
        opt.add_param_group(group_b)
    else:
        opt = build_optimizer(rec.name, [{"params": a}, group_b], dict(rec.kwargs), module=model)
    ids = T.data()
    losses = [opt.step(T.closure(model, ids)) for _ in range(3)]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, opt.step_log, opt


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
@pytest.mark.parametrize("name", NAMES)
def test_a_group_added_after_construction_steps_like_one_given_at_construction(name: str, named: bool) -> None:
    rec = T.record(name)
    if not named and name == "hybrid":
        pytest.skip("HybridZOFO needs parameter names")
    losses, params, log, opt = _run(rec, named, late=True)
    ref_losses, ref_params, ref_log, ref_opt = _run(rec, named, late=False)
    assert losses == ref_losses, name
    assert log == ref_log, name
    for n, p in ref_params.items():
        assert torch.equal(params[n], p), (name, n)
    # B's tensors moved (they were perturbed and updated), with B's stable ids.
    start = dict(T.model().named_parameters())
    assert any(not torch.equal(params[n], start[n].detach()) for n in params if ".layers.0." in n), name
    ids = [e.stable_id for e in opt.shard_entries() if e.group_index == 1]
    assert ids == [e.stable_id for e in ref_opt.shard_entries() if e.group_index == 1] and ids, name


def test_an_added_group_without_names_continues_the_positional_ids() -> None:
    model = T.model()
    a, b = _split(model, named=False)
    opt = MeZO(a, lr=1e-3)
    opt.add_param_group({"params": b})
    got = [e.stable_id for e in opt.shard_entries()]
    assert got == [f"#{i}" for i in range(len(a) + len(b))]


def test_hybrid_refuses_a_later_group_holding_fo_parameters() -> None:
    """The hybrid's FO part is chosen at construction: a later group is ZO, or refused if it matches."""
    model = T.model()
    named = list(model.named_parameters())
    a = [(n, p) for n, p in named if ".layers.1.mlp." not in n]
    b = [(n, p) for n, p in named if ".layers.1.mlp." in n]
    opt = build_optimizer("hybrid", a, dict(T.record("hybrid").kwargs), module=model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp.*matches fo_params pattern 'layers\.1\.'"):
        opt.add_param_group({"params": b})
    assert len(opt.param_groups) == 1


# ============================================================================ 3. global options
GLOBAL_CASES = [
    # (optimizer class, its kwargs, the global key, a group value other than the optimizer's)
    (LeZO, {"sparsity": 0.5}, "sparsity", 0.25),
    (SparseMeZO, {"sparsity": 0.5}, "sparsity", 0.25),
    (BlockwiseZO, {"layers_per_block": 1}, "layers_per_block", 2),
    (LOZO, {"rank": 2, "nu": 2}, "rank", 3),
    (LOZO, {"rank": 2, "nu": 2}, "nu", 5),
    (LOZOM, {"rank": 2, "nu": 2, "beta": 0.9}, "beta", 0.5),
    (MeZO, {"seed": 3}, "seed", 4),
    (MeZO, {}, "noise", "rademacher"),
]


@pytest.mark.parametrize("cls,kwargs,key,value", GLOBAL_CASES,
                         ids=[f"{c.__name__}-{k}" for c, _, k, _ in GLOBAL_CASES])
@pytest.mark.parametrize("where", ["construction", "add_param_group", "only_group"])
def test_a_group_that_sets_a_global_option_differently_is_refused(cls, kwargs, key, value, where) -> None:
    assert key in cls.GLOBAL_KEYS
    model = T.model()
    a, b = _split(model, named=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pattern = rf"{key}.*param group {0 if where == 'only_group' else 1}"
    with pytest.raises(ValueError, match=pattern):
        if where == "construction":
            cls([{"params": a}, {"params": b, key: value}], lr=1e-3, **kwargs)
        elif where == "only_group":
            cls([{"params": a + b, key: value}], lr=1e-3, **kwargs)
        else:
            opt = cls(a, lr=1e-3, **kwargs)
            opt.add_param_group({"params": b, key: value})
    if where == "add_param_group":
        assert len(opt.param_groups) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


@pytest.mark.parametrize("cls,kwargs,key,value", GLOBAL_CASES,
                         ids=[f"{c.__name__}-{k}" for c, _, k, _ in GLOBAL_CASES])
def test_a_group_that_repeats_a_global_option_is_accepted(cls, kwargs, key, value) -> None:
    model = T.model()
    a, b = _split(model, named=True)
    same = kwargs.get(key, "gaussian")
    opt = cls([{"params": a}, {"params": b, key: same}], lr=1e-3, **kwargs)
    opt.add_param_group({"params": [("extra.weight", torch.nn.Parameter(torch.zeros(3)))], key: same})
    assert all(g[key] == same for g in opt.param_groups)


def test_every_global_key_has_an_optimizer_value() -> None:
    """Each optimizer's global keys are in its defaults (so a group can be compared with them)."""
    for name, cls in OPTIMIZERS.items():
        model = T.model()
        opt = build_optimizer(name, model.named_parameters(), dict(T.record(name).kwargs), module=model)
        missing = [k for k in cls.GLOBAL_KEYS if k not in opt.defaults]
        assert not missing, (name, missing)


# ============================================================================ 4. no asserts
def test_the_optimizers_check_their_invariants_without_assert() -> None:
    for path in sorted((REPO / "zoscale" / "optim").glob("*.py")):
        tree = ast.parse(path.read_text())
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"{path.name}: assert at lines {asserts} (stripped by python -O)"


def _sparse() -> tuple[SparseMeZO, list]:
    model = T.model()
    opt = SparseMeZO(model.named_parameters(), lr=1e-3, sparsity=0.5)
    opt.ensure_thresholds()
    entries = opt._entries()
    return opt, entries


def test_sparse_mezo_first_pass_must_start_from_theta() -> None:
    opt, entries = _sparse()
    dirs = Masked.for_query(opt, entries, 0, 0)  # a query whose first pass is not the +eps one
    before = [e.view.local.clone() for e in entries]
    with pytest.raises(RuntimeError, match="first pass"):
        dirs[0].perturb_(-2e-3, -1e-3)
    assert all(torch.equal(e.view.local, b) for e, b in zip(entries, before))


def test_sparse_mezo_update_without_a_packed_mask_needs_theta() -> None:
    opt, entries = _sparse()
    dirs = Masked.for_query(opt, entries, 0, 0)
    before = [e.view.local.clone() for e in entries]
    with pytest.raises(RuntimeError, match="without a packed mask must start from theta"):
        dirs[0].update_(1.0, 0.0, -1e-3)
    assert all(torch.equal(e.view.local, b) for e, b in zip(entries, before))


def test_sparse_mezo_steps_on_a_rank_that_holds_no_trainable_shard() -> None:
    """No entry at all (a rank may hold nothing of the trainable tensors): the step still runs its
    forwards; the first-pass test must not mistake an empty set of masks for "no pass yet"."""
    model = T.model()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SparseMeZO(model.named_parameters(), lr=1e-3, sparsity=0.5)
    loss = opt.step(T.closure(model, T.data()))
    assert math.isfinite(loss) and opt.step_count == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("numels,ks,widths", [([4], [0], [32]), ([4], [5], [32]), ([4], [2], [16]),
                                              ([4, 4], [1], [32, 32])])
def test_radix_select_rejects_bad_arguments(numels, ks, widths) -> None:
    with pytest.raises(ValueError, match="RadixSelect"):
        RadixSelect(numels, ks, widths)


# ============================================================================ 5. dynamo limits
def test_compiled_noise_kernels_leave_the_global_recompile_limits_alone(tmp_path: Path) -> None:
    """Default (compiled) backend, in a fresh interpreter: the limits before importing zoscale
    are the limits after compiled passes, and a user's lower limit does not break the kernels."""
    script = textwrap.dedent("""
        import torch
        import torch._dynamo.config as cfg
        names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit")
                 if hasattr(cfg, n)]
        before = {n: getattr(cfg, n) for n in names}
        from zoscale import noise
        assert noise.backend() == "compiled"
        x = torch.zeros(300)
        noise.axpbz_(x, 0, 123, 1.0, 1.0, "gaussian")
        noise.axpbz_(x[:200], 5, 124, 1.0, 1.0, "rademacher")  # another graph of the same kernel
        assert noise._compiled, "the compiled backend was not used"
        after = {n: getattr(cfg, n) for n in names}
        assert after == before, (before, after)
        # A user who lowers the limits still gets compiled kernels (their scope has its own).
        cfg.recompile_limit = 1
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = 1
        y = torch.zeros(130, dtype=torch.float64)
        noise.axpbz_(y, 0, 7, 1.0, 0.5, "gaussian")
        ref = noise.axpbz_(torch.zeros(130, dtype=torch.float64), 0, 7, 1.0, 0.5, "gaussian", eager=True)
        torch.testing.assert_close(y, ref)  # compiled vs eager: the same z up to libm rounding
        assert cfg.recompile_limit == 1
        print("OK", before)
    """)
    env = {k: v for k, v in os.environ.items() if k != "ZOSCALE_NOISE_BACKEND"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ============================================================================ 6. docstrings
def test_engine_docstring_names_functions_that_exist() -> None:
    import zoscale.engines.base as engine

    source = "\n".join(p.read_text() for p in (REPO / "zoscale").rglob("*.py"))
    called = re.findall(r"``(?:[\w.]+\.)?(\w+)\(\)``", engine.__doc__ or "")
    assert called, "the docstring names no function"
    for name in called:
        assert re.search(rf"def {name}\b", source), f"engines/base.py's docstring names {name}(), which does not exist"


def test_checkpoint_docstring_cites_files_of_the_repository() -> None:
    import zoscale.train.checkpoint as checkpoint

    text = Path(checkpoint.__file__).read_text()
    for cited in re.findall(r"[\w./-]+\.md\b", text):
        assert (REPO / cited).is_file(), f"checkpoint.py cites {cited}, which is not in the repository"
    assert "replay" in (checkpoint.__doc__ or "")
