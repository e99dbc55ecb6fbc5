"""The optimizer package's contract (issue 11): one driver, parts by class attribute, options in
one table, registration by decorator, the step's figures in ``last_step``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests import optim_table as T
from zoscale.optim import OPTIMIZERS, MeZO, ZOOptimizer, build_optimizer, register, registry
from zoscale.optim import options as opts
from zoscale.optim.rules import sgd
from zoscale.optim.updates import FusedRule


def _clipped(lr: float, g: float, group: dict[str, Any]) -> tuple[float, float]:
    return sgd(lr, max(-group["clip"], min(group["clip"], g)), group)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "OPTIMIZERS", dict(registry.OPTIMIZERS))


def _new_rule_optimizer() -> type:
    @register("clipped_mezo")
    class ClippedMeZO(ZOOptimizer):
        """MeZO with the projected gradient clipped to [-clip, clip]: a new rule, nothing else."""

        OPTIONS = opts.SPSA_OPTIONS + (opts.Option("clip", 1.0, opts.real(0.0, low_open=True)),)
        rule = FusedRule(_clipped)

    return ClippedMeZO


def test_an_optimizer_that_only_changes_the_update_rule_is_a_few_lines(scratch_registry: None) -> None:
    _new_rule_optimizer()
    ids = T.data()
    runs = {}
    for name, extra in (("mezo", {}), ("clipped_mezo", {"clip": 1e9}), ("clipped_mezo", {"clip": 1e-3})):
        m = T.model()
        opt = build_optimizer(name, m.named_parameters(), {"lr": 1e-2, "eps": 1e-3, "seed": 3, **extra})
        losses = [opt.step(T.closure(m, ids)) for _ in range(3)]
        runs[(name, extra.get("clip"))] = (losses, [p.detach().clone() for p in m.parameters()], opt)
    # Never clipped: MeZO bit for bit; clipped: the weights move by exactly lr * clip * z less.
    mezo, wide, narrow = runs[("mezo", None)], runs[("clipped_mezo", 1e9)], runs[("clipped_mezo", 1e-3)]
    assert mezo[0] == wide[0] and all(torch.equal(a, b) for a, b in zip(mezo[1], wide[1]))
    assert narrow[0][0] == mezo[0][0] and narrow[0][1:] != mezo[0][1:]
    assert all(abs(r["grad"][0]) > 1e-3 for r in narrow[2].step_log)  # so every step was clipped
    with pytest.raises(ValueError, match=r"Invalid clip: -1"):
        build_optimizer("clipped_mezo", T.model().named_parameters(), {"clip": -1})


def test_a_name_is_registered_once(scratch_registry: None) -> None:
    _new_rule_optimizer()
    with pytest.raises(ValueError, match="registered twice"):
        register("mezo")(type("Other", (ZOOptimizer,), {}))


def test_one_file_per_optimizer() -> None:
    modules = [cls.__module__ for cls in OPTIMIZERS.values()]
    assert len(set(modules)) == len(modules), modules
    assert {cls.__module__.rsplit(".", 1)[1] for cls in OPTIMIZERS.values()} >= {"mezo", "zo_adam", "lozo_m"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_options_are_checked_in_one_place(name: str) -> None:
    """The constructor, ``build_optimizer`` and the config check give the same error."""
    bad = {"lr": -1.0}
    messages = []
    options = {**T.record(name).kwargs, **bad}
    for check in (lambda: OPTIMIZERS[name].check_options(options),
                  lambda: build_optimizer(name, T.model().named_parameters(), options, module=T.model())):
        with pytest.raises(ValueError) as info:
            check()
        messages.append(str(info.value))
    assert all(m.startswith("Invalid learning rate: -1.0") for m in messages), messages


@pytest.mark.parametrize("name,q", [("mezo", 2), ("zo_adam", 2), ("lozo_m", 2), ("blockwise", 1), ("zo_sgd_cons", 2)])
def test_last_step_holds_what_the_trainer_logs(name: str, q: int) -> None:
    rec = T.record(name)
    options = {} if name == "blockwise" else {"q": q}
    _, _, opt = T.run_local(rec, steps=2, **options)
    records = [r for r in opt.step_log if r["step"] == 1]
    grads = [r["grad"][0] for r in records]
    assert opt.last_step["queries"] == len(records) == (3 if name == "blockwise" else q)
    assert opt.last_step["projected_grad"] == pytest.approx(sum(grads) / len(grads), rel=1e-12)
    assert opt.last_step["lr"] == opt.param_groups[0]["lr"] == rec.kwargs["lr"]
    assert math.isfinite(opt.last_step["loss"])


def test_the_step_log_records_the_lr_each_query_was_applied_with() -> None:
    """The SGD family applies lr / q per query (and logs it); the stateful rules apply the lr to
    the mean of the queries (and log the lr)."""
    _, _, mezo = T.run_local(T.record("mezo"), steps=1, q=2)
    _, _, adam = T.run_local(T.record("zo_adam"), steps=1, q=2)
    assert [r["lr"][0] for r in mezo.step_log] == [T.record("mezo").kwargs["lr"] * 0.5] * 2
    assert [r["lr"][0] for r in adam.step_log] == [T.record("zo_adam").kwargs["lr"]] * 2


def test_mezo_class_is_only_its_parts() -> None:
    """MeZO declares nothing the driver does not already default to: its body is a docstring."""
    # torch's Optimizer wraps the class's step (profiling hooks) when the first instance is made.
    own = {k for k in vars(MeZO) if not k.startswith("__")} - {"name", "GLOBAL_KEYS", "step"}
    assert own == set(), own
