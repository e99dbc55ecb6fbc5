"""The two-pass step (issue 11): a query's update deferred into the next query's first pass.

Against the three-pass step as the reference: the same trajectory within rounding (fp32: the
fused pass computes ``(a x + b1 z1) + b2 z2`` in fp32, so the bits are the same), two noise
passes per query instead of three, and the held update applied before anything reads the weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests import optim_table as T
from zoscale import noise
from zoscale.optim import OPTIMIZERS, NonFiniteLossError, build_optimizer

TWO_PASS = sorted(n for n, cls in OPTIMIZERS.items() if cls.supports_two_pass())


def test_the_sgd_family_supports_it_and_the_others_refuse_it() -> None:
    assert TWO_PASS == ["blockwise", "hybrid", "lezo", "lozo", "mezo", "sparse_mezo", "zo_sgd_sign"]
    for name in ("zo_adam", "zo_sgd_mmt", "lozo_m", "zo_sgd_cons"):
        with pytest.raises(ValueError, match="Invalid two_pass: True"):
            build_optimizer(name, T.model().named_parameters(), {**T.record(name).kwargs, "two_pass": True})


def _run(name: str, steps: int = T.STEPS, **options: Any) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    return T.run_local(T.record(name), steps=steps, **options)


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("name", TWO_PASS)
def test_the_trajectory_is_the_three_pass_one(name: str, master: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    losses, weights, _ = _run(name, master_weights=master)
    two_losses, _, opt = _run(name, master_weights=master, two_pass=True)
    assert opt.pending  # the last update is held ...
    opt.flush()  # ... until flushed
    assert not opt.pending
    got = dict(_params(opt))
    assert two_losses == pytest.approx(losses, rel=1e-6, abs=0)
    for n, w in weights.items():
        torch.testing.assert_close(got[n], w, rtol=0, atol=1e-6, msg=n)


def _params(opt: Any) -> list[tuple[str, torch.Tensor]]:
    out = []
    for g in opt.param_groups:
        out += [(n, p.detach().clone()) for n, p in zip(g["param_names"], g["params"])]
    if hasattr(opt, "fo_optimizer"):
        out += [(n, p.detach().clone()) for n, p in opt._fo_named]
    return out


@pytest.mark.parametrize("master", [False, True])
def test_mezo_two_pass_is_bitwise_three_pass_in_fp32(master: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    for q in (1, 2):
        losses, weights, _ = _run("mezo", q=q, master_weights=master)
        two_losses, _, opt = _run("mezo", q=q, master_weights=master, two_pass=True)
        opt.flush()
        assert two_losses == losses
        assert all(torch.equal(p, weights[n]) for n, p in _params(opt))


def test_two_passes_per_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the noise passes over each tensor: 3 per query, or 2 with the update deferred."""
    calls: list[str] = []
    for fn in ("axpbz_", "axpbz2_"):
        real = getattr(noise, fn)
        monkeypatch.setattr(noise, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    tensors, steps = sum(1 for p in T.model().parameters()), 3
    for q in (1, 2):
        calls.clear()
        _run("mezo", steps=steps, q=q)
        assert len(calls) == tensors * 3 * steps * q and "axpbz2_" not in calls
        calls.clear()
        _, _, opt = _run("mezo", steps=steps, q=q, two_pass=True)
        assert len(calls) == tensors * 2 * steps * q  # the last update is still held ...
        assert calls.count("axpbz2_") == tensors * (steps * q - 1)  # ... every other one was fused
        opt.flush()
        assert len(calls) == tensors * (2 * steps * q + 1)


def test_reading_the_weights_applies_the_held_update() -> None:
    _, weights, _ = _run("mezo", steps=2)
    _, _, opt = _run("mezo", steps=2, two_pass=True)
    sd = opt.state_dict()  # flushes
    assert not opt.pending and sd["zo"]["step"] == 2
    assert all(torch.allclose(p, weights[n], rtol=0, atol=1e-6) for n, p in _params(opt))


def test_a_non_finite_loss_leaves_the_earlier_update_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    _, after_one, _ = _run("mezo", steps=1, master_weights=True)
    m = T.model()
    opt = build_optimizer("mezo", m.named_parameters(), {**T.record("mezo").kwargs, "two_pass": True,
                                                         "master_weights": True})
    ids = T.data()
    opt.step(T.closure(m, ids))
    with pytest.raises(NonFiniteLossError):
        opt.step(lambda: torch.tensor(float("nan")))
    assert not opt.pending and opt.step_count == 1
    assert all(torch.equal(p.detach(), after_one[n]) for n, p in m.named_parameters())


def test_one_sided_flushes_before_its_first_forward() -> None:
    losses, weights, _ = _run("mezo", one_sided=True)
    two_losses, _, opt = _run("mezo", one_sided=True, two_pass=True)
    opt.flush()
    assert two_losses == pytest.approx(losses, rel=1e-6)
    assert all(torch.allclose(p, weights[n], rtol=0, atol=1e-6) for n, p in _params(opt))


def _bf16_run(two_pass: bool, master: bool, dtype: torch.dtype = torch.bfloat16,
              steps: int = T.STEPS) -> dict[str, torch.Tensor]:
    m = T.model().to(dtype)
    opt = build_optimizer("mezo", m.named_parameters(), {**T.record("mezo").kwargs, "two_pass": two_pass,
                                                         "master_weights": master})
    ids = T.data()
    for _ in range(steps):
        opt.step(T.closure(m, ids))
    opt.flush()
    return {n: p.detach().float() for n, p in m.named_parameters()}


def test_bf16_with_master_weights_is_bitwise_three_pass() -> None:
    three, two = _bf16_run(False, True), _bf16_run(True, True)
    assert all(torch.equal(two[n], w) for n, w in three.items())


def test_bf16_without_master_weights_drifts_and_the_fused_pass_changes_only_later_steps() -> None:
    """bf16 compute copies edited in place drift from the fp32 trajectory (eps is below a bf16 ulp
    of these weights: the reason for master weights), with either pass. The fused pass only
    changes where the rounding falls from the second step on (the first step's update is applied
    by the flush, exactly as the three-pass restore + update), so one step is bitwise three-pass.
    How much each drifts after that depends on the CPU's kernels (measured after 4 steps: the
    fused pass within 1.25x of the three passes' distance on an AVX-512 machine, 1.75x on an AVX2 one),
    so no ordering is asserted."""
    one = {k: _bf16_run(k == "two", False, steps=1) for k in ("three", "two")}
    assert all(torch.equal(one["two"][n], w) for n, w in one["three"].items())
    exact = _bf16_run(False, True, torch.float32)
    for two_pass in (False, True):
        drift = _bf16_run(two_pass, False)
        assert sum((drift[n] - w).abs().mean().item() for n, w in exact.items()) > 1e-3, two_pass