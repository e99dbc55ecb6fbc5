"""Block-wise ZO: one SPSA query per block, applied at once, against a plain per-block loop."""

from __future__ import annotations

import copy
import math
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from zoscale import noise
from zoscale.models import tiny_llama
from zoscale.optim.base import NonFiniteLossError, ZOOptimizer
from zoscale.optim.blockwise import BlockwiseZO
from zoscale.optim.lezo import unit_of
from zoscale.optim.mezo import MeZO

KINDS = ["gaussian", "rademacher"]
IDS = torch.randint(0, 262, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _eager_noise() -> Iterator[None]:
    # Tiny models: the eager noise kernels cost less than compiling the fused ones (which
    # test_noise.py checks against these). References regenerate z the same way.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOSCALE_NOISE_BACKEND", "eager")
        yield


class Net(torch.nn.Module):
    """Three "transformer blocks" (named like Llama's) between an input and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 6)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def net() -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Net().double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def llama_closure(model: torch.nn.Module):
    return lambda: model(input_ids=IDS, labels=IDS).loss


def z_of(name: str, like: torch.Tensor, seed: int, step: int, query: int, kind: str = "gaussian") -> torch.Tensor:
    return noise.generate(0, like.numel(), noise.noise_key(seed, step, query, name), kind).to(like.dtype).view(like.shape)


# ----------------------------------------------------------------------------- blocks
def test_blocks_are_the_transformer_blocks_then_the_rest() -> None:
    opt = BlockwiseZO(tiny_llama(num_layers=3).named_parameters(), lr=1e-3)
    assert opt.blocks == ["block.0", "block.1", "block.2", "rest"]
    assert BlockwiseZO(net().named_parameters()).blocks == ["block.0", "block.1", "block.2", "rest"]
    # Unnamed parameters have no block: one block, the whole model.
    assert BlockwiseZO(net().parameters()).blocks == ["rest"]
    # Merged consecutive layers.
    assert BlockwiseZO(net().named_parameters(), layers_per_block=2).blocks == ["block.0-1", "block.2", "rest"]
    assert BlockwiseZO(net().named_parameters(), layers_per_block=3).blocks == ["block.0-2", "rest"]
    assert BlockwiseZO(net().named_parameters(), layers_per_block=9).blocks == ["block.0-2", "rest"]


# ----------------------------------------------------------------------------- what each forward sees
@pytest.fixture(scope="module")
def captured():
    """Two steps of a 3-block Llama, every parameter captured at every closure call."""
    model = tiny_llama(num_layers=3)
    opt = BlockwiseZO(model.named_parameters(), lr=5e-3, eps=1e-3, seed=7, master_weights=True)
    captures: list[list[dict[str, torch.Tensor]]] = []
    starts, ends = [], []
    for _ in range(2):
        snaps: list[dict[str, torch.Tensor]] = []

        def closure():
            snaps.append(params_of(model))
            return llama_closure(model)()

        starts.append(params_of(model))
        opt.step(closure)
        ends.append(params_of(model))
        captures.append(snaps)
    return opt, captures, starts, ends


def test_two_forwards_per_block_and_one_log_record_per_block(captured) -> None:
    opt, captures, _, _ = captured
    assert opt.blocks == ["block.0", "block.1", "block.2", "rest"]
    assert [len(snaps) for snaps in captures] == [2 * 4, 2 * 4]
    assert [(r["step"], r["query"]) for r in opt.step_log] == [(t, b) for t in range(2) for b in range(4)]
    assert opt.param_groups[0]["q"] == 1  # what the trainer multiplies the logged lr by


def test_only_the_queried_block_is_perturbed_and_each_block_is_updated_right_after_its_forwards(captured) -> None:
    """During block b's two forwards: block b sits at theta_b +- eps z_b (z_b regenerated with
    query index b); blocks before b already hold their end-of-step values (the update is applied
    right after each block's forwards, not deferred); blocks after b hold their start values."""
    opt, captures, starts, ends = captured
    eps = 1e-3
    for t, snaps in enumerate(captures):
        assert len(snaps) == 2 * len(opt.blocks)
        for b, block in enumerate(opt.blocks):
            plus, minus = snaps[2 * b], snaps[2 * b + 1]
            for n in plus:
                unit = opt.blocks.index(unit_of(n))
                if unit == b:
                    # Master weights: the compute copy is written as master +- eps z in fp32.
                    z = z_of(n, plus[n], 7, t, b)
                    torch.testing.assert_close(plus[n], starts[t][n] + eps * z, rtol=0, atol=1e-7, msg=n)
                    torch.testing.assert_close(minus[n], starts[t][n] - eps * z, rtol=0, atol=1e-7, msg=n)
                else:
                    assert torch.equal(plus[n], minus[n]), (t, block, n)
                    expected = ends[t][n] if unit < b else starts[t][n]
                    assert torch.equal(plus[n], expected), (t, block, n, "updated" if unit < b else "start")
    # Every tensor moved during the step (each block was updated once).
    assert all(not torch.equal(starts[0][n], ends[0][n]) for n in starts[0])


def test_no_two_blocks_share_a_noise_pattern(captured) -> None:
    """The perturbations of same-shaped tensors in different blocks (and of one block on two
    steps) are uncorrelated: |corr| < 5/sqrt(numel) (independent Gaussians: sd 1/sqrt(numel)).
    With a shared pattern they would be equal (corr = 1)."""
    opt, captures, _, _ = captured
    eps = 1e-3

    def pattern(t: int, n: str) -> torch.Tensor:
        b = opt.blocks.index(unit_of(n))
        return ((captures[t][2 * b][n] - captures[t][2 * b + 1][n]) / (2 * eps)).reshape(-1).double()

    suffixes = {n.split(".", 3)[3] for n in captures[0][0] if unit_of(n) != "rest"}
    assert len(suffixes) == 9  # q/k/v/o, gate/up/down, two norms
    for suffix in suffixes:
        names = [f"model.layers.{i}.{suffix}" for i in range(3)]
        bound = 5 / math.sqrt(captures[0][0][names[0]].numel())
        pats = [(t, n, pattern(t, n)) for t in range(2) for n in names]
        for i, (ta, na, a) in enumerate(pats):
            for tb, nb, b in pats[i + 1:]:
                corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
                assert abs(corr) < bound, (ta, na, tb, nb, corr)
    # Each record names its block by its own query index.
    assert [r["query"] for r in opt.step_log[:4]] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- reference loop
def reference_steps(model, x, y, groups, *, steps, one_sided, kind, seed, blocks=None):
    """Per-block MeZO written from the equations, out of place, with full-size z tensors.

    ``groups``: list of (names, lr, eps, wd); ``blocks``: list of sets of LeZO units, in order
    (default: each transformer block, then the rest). For each block in order: perturb that
    block's tensors only, two losses, g per group, update that block's tensors at once.
    """
    theta = params_of(model)
    group_of = {n: gi for gi, (names, *_rest) in enumerate(groups) for n in names}
    blocks = blocks or [{"block.0"}, {"block.1"}, {"block.2"}, {"rest"}]

    def L(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y).item()

    for t in range(steps):
        for b, block in enumerate(blocks):
            members = [n for n in theta if unit_of(n) in block]
            z = {n: z_of(n, theta[n], seed, t, b, kind) for n in members}
            eps = {n: groups[group_of[n]][2] for n in members}
            plus = {**theta, **{n: theta[n] + eps[n] * z[n] for n in members}}
            if one_sided:
                lp, lm = L(plus), L(theta)
                g = [(lp - lm) / e for _, _, e, _ in groups]
            else:
                minus = {**theta, **{n: theta[n] - eps[n] * z[n] for n in members}}
                lp, lm = L(plus), L(minus)
                g = [(lp - lm) / (2 * e) for _, _, e, _ in groups]
            for n in members:
                gi = group_of[n]
                _, lr, _, wd = groups[gi]
                theta[n] = (1 - lr * wd) * theta[n] - lr * g[gi] * z[n]
    return theta


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("one_sided,master,layers_per_block", [
    (False, False, 1), (True, False, 1), (False, True, 1), (True, True, 1), (False, False, 2)])
def test_matches_a_plain_per_block_mezo_loop_with_param_groups(kind: str, one_sided: bool, master: bool,
                                                               layers_per_block: int) -> None:
    model = net()
    x, y = data()
    names = [n for n, _ in model.named_parameters()]
    # The "rest" block mixes both groups (embed in the first, head in the second).
    first = [n for n in names if not n.startswith("head")]
    second = [n for n in names if n.startswith("head")]
    spec = [(first, 0.05, 1e-3, 0.1), (second, 0.02, 2e-3, 0.0)]
    blocks = None if layers_per_block == 1 else [{"block.0", "block.1"}, {"block.2"}, {"rest"}]
    expected = reference_steps(copy.deepcopy(model), x, y, spec, steps=3, one_sided=one_sided, kind=kind, seed=3,
                               blocks=blocks)
    named = dict(model.named_parameters())
    opt = BlockwiseZO([{"params": [(n, named[n]) for n in first], "lr": 0.05, "eps": 1e-3, "weight_decay": 0.1},
                       {"params": [(n, named[n]) for n in second], "lr": 0.02, "eps": 2e-3}],
                      one_sided=one_sided, noise=kind, seed=3, master_weights=master,
                      layers_per_block=layers_per_block)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
    # float64 throughout: in-place vs out-of-place evaluation differs only by rounding.
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12, msg=n)
    assert len(opt.step_log) == 3 * len(opt.blocks) == 3 * (4 if layers_per_block == 1 else 3)
    assert opt.step_log[-1]["grad"][0] == pytest.approx(opt.step_log[-1]["grad"][1] * 2.0)


def test_a_model_without_blocks_is_mezo_bitwise() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlps = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)) for _ in range(2)]
    mlps[1].load_state_dict(mlps[0].state_dict())
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 3
    a = BlockwiseZO(mlps[0].named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=2)
    b = MeZO(mlps[1].named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=2)
    assert a.blocks == ["rest"]
    for _ in range(3):
        assert a.step(lambda: F.cross_entropy(mlps[0](x), y)) == b.step(lambda: F.cross_entropy(mlps[1](x), y))
    for p, r in zip(mlps[0].parameters(), mlps[1].parameters()):
        assert torch.equal(p, r)
    assert a.step_log == b.step_log


# ----------------------------------------------------------------------------- state, replay
def test_state_dict_round_trip() -> None:
    model = tiny_llama()
    opt = BlockwiseZO(model.named_parameters(), lr=1e-3, eps=1e-3, seed=9, master_weights=True, layers_per_block=2)
    for _ in range(2):
        opt.step(llama_closure(model))
    saved = opt.state_dict()
    snapshot = copy.deepcopy(saved)
    twin = copy.deepcopy(model)
    fresh = BlockwiseZO(twin.named_parameters(), lr=0.5, eps=0.5)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 1e-3 and fresh.param_groups[0]["master_weights"] and fresh.step_count == 2
    assert fresh.blocks == opt.blocks == ["block.0-1", "rest"]
    for _ in range(2):
        assert opt.step(llama_closure(model)) == fresh.step(llama_closure(twin))
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n
    assert opt.step_log == fresh.step_log and saved["zo"] == snapshot["zo"]


def _ulps(now: torch.Tensor, then: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    spacing = torch.nextafter(scale, torch.full_like(scale, math.inf)) - scale
    return (now - then).abs() / spacing


@pytest.mark.parametrize("master", [True, False])
def test_replaying_the_step_log_reproduces_the_run(master: bool) -> None:
    """Each record updates only its block (query = block index): the base weights plus the log
    give the run's weights, bitwise with master weights."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    groups = lambda named: [  # noqa: E731
        {"params": [(k, v) for k, v in named if "mlp" in k], "lr": 2e-3, "weight_decay": 0.1},
        {"params": [(k, v) for k, v in named if "mlp" not in k], "lr": 1e-3},
    ]
    steps = 5
    opt = BlockwiseZO(groups(list(model.named_parameters())), eps=1e-3, seed=5, master_weights=master)
    # The largest magnitude each element passes through (the tiny model's weights move a lot:
    # some cross zero), for the rounding units below.
    peak = {n: p.detach().abs() for n, p in model.named_parameters()}
    for _ in range(steps):
        opt.step(llama_closure(model))
        peak = {n: torch.maximum(peak[n], p.detach().abs()) for n, p in model.named_parameters()}
    replayer = BlockwiseZO(groups(list(base.named_parameters())), eps=1e-3, seed=5, master_weights=master)
    replayer.replay(opt.state_dict()["zo"]["log"])
    worst = 0.0
    for (n, a), (_, b) in zip(model.named_parameters(), base.named_parameters()):
        if master:
            assert torch.equal(a, b), n
        else:  # units at |theta| + eps * max|z| (~6)
            worst = max(worst, _ulps(b.detach(), a.detach(), peak[n] + 6e-3).max().item())
    if not master:
        # Each tensor gets one query per step. The run rounds 4 times per query (the +eps and
        # -2eps sums, then the fused update's decay product and sum), the replay twice (decay
        # product, sum), each by at most half a unit: at most 3 units per step apart.
        # Measured: 7 (MeZO on the same run: 6).
        assert worst <= 3 * steps, worst
    with pytest.raises(ValueError, match="names block 7"):
        replayer.replay([{**opt.step_log[0], "query": 7}])


def test_loss_falls_on_a_tiny_llama() -> None:
    model = tiny_llama()
    opt = BlockwiseZO(model.named_parameters(), lr=3e-3, eps=1e-3)
    losses = [opt.step(llama_closure(model)) for _ in range(30)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # Measured: mean of the first 10 steps 5.74, of steps 20-29 ~5.5 (3 blocks, 6 forwards per
    # step); a sign error or a broken restore would make it rise.
    assert last < first - 0.12, (first, last)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: BlockwiseZO(m.named_parameters(), eps=0.0), "eps: 0.0"),
        (lambda m: BlockwiseZO(m.named_parameters(), lr=-1.0), "learning rate: -1.0"),
        (lambda m: BlockwiseZO([{"params": list(m.parameters()), "q": 2}]), "q: 2"),
        (lambda m: BlockwiseZO(m.named_parameters(), noise="uniform"), "uniform"),
        (lambda m: BlockwiseZO(m.named_parameters(), layers_per_block=0), "layers_per_block: 0"),
        (lambda m: BlockwiseZO(m.named_parameters(), layers_per_block=1.5), "layers_per_block: 1.5"),
        (lambda m: BlockwiseZO(m.named_parameters(), layers_per_block=True), "layers_per_block: True"),
    ],
)
def test_bad_configuration_raises_before_touching_parameters(make, match) -> None:
    model = net()
    before = params_of(model)
    with pytest.raises(ValueError, match=match):
        make(model)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_missing_closure_raises() -> None:
    opt = BlockwiseZO(net().named_parameters())
    with pytest.raises(ValueError, match="requires a closure"):
        opt.step()
    assert opt.step_count == 0


@pytest.mark.parametrize("master", [True, False])
def test_non_finite_loss_in_a_block_keeps_the_earlier_blocks_and_restores_that_one(master: bool) -> None:
    model = net()
    x, y = data()
    twin = copy.deepcopy(model)
    opt = BlockwiseZO(model.named_parameters(), lr=1e-2, eps=1e-3, master_weights=master)
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if len(calls) == 3 else loss  # block 1's first forward

    with pytest.raises(NonFiniteLossError, match="step 0, query 1"):
        opt.step(closure)
    assert opt.step_count == 0 and [r["query"] for r in opt.step_log] == [0]
    # Reference: block 0's query alone, on a twin.
    ref = BlockwiseZO(twin.named_parameters(), lr=1e-2, eps=1e-3, master_weights=master)
    entries = ref._entries()
    ref._ensure_masters(entries)
    dirs = ref.directions(ref.block_entries(entries, "block.0"), 0, 0)
    grads, _, offset = ref.estimate(lambda: F.cross_entropy(twin(x), y), dirs, 0, 0)
    ref.rule.apply(ref, 0, [(dirs, grads)], [g["lr"] for g in ref.param_groups], 1, offset)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if master or unit_of(n) != "block.1":
            assert torch.equal(a, b), n
        else:  # the +eps/-2eps/+eps round trip of the restored block: a few ulp
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15, msg=n)
