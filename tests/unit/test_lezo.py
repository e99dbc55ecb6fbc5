"""LeZO: only drawn layers move, the draw is shared and fair, sparsity 0 is MeZO."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch

from zoscale.models import tiny_llama
from zoscale.optim import LeZO, MeZO, build_optimizer
from zoscale.optim.lezo import unit_of

IDS = torch.randint(0, 262, (8, 16), generator=torch.Generator().manual_seed(1))


def _model():
    return tiny_llama(num_layers=4)


def _closure(model):
    return lambda: model(input_ids=IDS, labels=IDS).loss


def test_units_come_from_names_and_survive_wrapping() -> None:
    assert unit_of("model.layers.3.mlp.up_proj.weight") == "block.3"
    assert unit_of("module.base_model.model.model.decoder.layers.11.fc1.weight") == "block.11"
    assert unit_of("transformer.h.2.attn.c_attn.weight") == "block.2"
    assert unit_of("model.embed_tokens.weight") == "rest" and unit_of("model.norm.weight") == "rest"
    opt = LeZO(_model().named_parameters(), lr=1e-3)
    assert opt.units == ["block.0", "block.1", "block.2", "block.3", "rest"]


@pytest.mark.parametrize("sparsity,active", [(0.5, 2), (0.75, 1), (0.9, 1), (0.0, 5)])
def test_exactly_the_drawn_units_change(sparsity: float, active: int) -> None:
    model = _model()
    opt = LeZO(model.named_parameters(), lr=1e-2, eps=1e-3, sparsity=sparsity, seed=3)
    assert opt.active_count == active
    for step in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        drawn = set(opt.active_units(step))
        assert len(drawn) == active
        opt.step(_closure(model))
        for n, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[n])
            assert changed == (unit_of(n) in drawn), (step, n, drawn)


def test_every_rank_draws_the_same_units() -> None:
    # Two optimizers on two copies (as two ranks would have), one built without names' order
    # mattering: the draws depend only on (seed, step) and the set of unit names.
    a = LeZO(_model().named_parameters(), lr=1e-3, sparsity=0.6, seed=9)
    b = LeZO(list(reversed(list(_model().named_parameters()))), lr=1e-3, sparsity=0.6, seed=9)
    assert [a.active_units(t) for t in range(50)] == [b.active_units(t) for t in range(50)]
    c = LeZO(_model().named_parameters(), lr=1e-3, sparsity=0.6, seed=10)
    assert [a.active_units(t) for t in range(50)] != [c.active_units(t) for t in range(50)]


def test_units_are_visited_as_often_as_the_draw_predicts() -> None:
    opt = LeZO(tiny_llama(num_layers=8).named_parameters(), lr=1e-3, sparsity=0.75, seed=1)
    units, k, steps = len(opt.units), opt.active_count, 2000
    counts = Counter(u for t in range(steps) for u in opt.active_units(t))
    p = k / units
    sd = math.sqrt(steps * p * (1 - p))
    for u in opt.units:  # each count is Binomial(steps, k/units); 5 sigma
        assert abs(counts[u] - steps * p) < 5 * sd, (u, counts[u], steps * p)


def test_sparsity_zero_is_mezo_bitwise() -> None:
    m1, m2 = _model(), _model()
    o1 = LeZO(m1.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.0, seed=2, q=2)
    o2 = MeZO(m2.named_parameters(), lr=1e-2, eps=1e-3, seed=2, q=2)
    for _ in range(3):
        assert o1.step(_closure(m1)) == o2.step(_closure(m2))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_replay_and_state_dict_know_the_draws() -> None:
    model = _model()
    base = copy.deepcopy(model)
    opt = LeZO(model.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.5, seed=4, master_weights=True)
    for _ in range(5):
        opt.step(_closure(model))
    replayer = LeZO(base.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.5, seed=4, master_weights=True)
    replayer.replay(opt.step_log)
    for a, b in zip(model.parameters(), base.parameters()):
        assert torch.equal(a, b)
    fresh = LeZO(copy.deepcopy(model).named_parameters(), lr=1.0, sparsity=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["sparsity"] == 0.5 and fresh.active_units(7) == opt.active_units(7)


def test_loss_falls_and_registry_builds_it() -> None:
    model = _model()
    opt = build_optimizer("LeZO", model.named_parameters(), {"lr": 3e-3, "eps": 1e-3, "sparsity": 0.5})
    losses = [opt.step(_closure(model)) for _ in range(150)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True])
def test_bad_sparsity_is_named(bad) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        LeZO(_model().parameters(), sparsity=bad)
