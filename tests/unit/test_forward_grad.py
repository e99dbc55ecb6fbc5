"""Forward-Grad against independent references: reverse-mode autograd and a plain update loop."""

from __future__ import annotations

import copy
import math
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from tests.unit.test_optim import data, loss_of, mlp, params_of  # the MLP, batches and helpers of the ZO tests
from zoscale import noise
from zoscale.models import tiny_llama
from zoscale.optim.base import NonFiniteLossError
from zoscale.optim.forward_grad import ForwardGrad
from zoscale.shards import LocalShards, ShardCapabilities, ShardView

KINDS = ["gaussian", "rademacher"]


@pytest.fixture(autouse=True, scope="module")
def _eager_noise() -> Iterator[None]:
    # The models here are tiny: the eager noise kernels cost less than compiling the fused ones
    # (which test_noise.py checks against these). References regenerate z the same way.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOSCALE_NOISE_BACKEND", "eager")
        yield


IDS = torch.randint(0, 262, (8, 16), generator=torch.Generator().manual_seed(1))


def llama_closure(model: torch.nn.Module):
    return lambda: model(input_ids=IDS, labels=IDS).loss


def autograd_grad(model: torch.nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """Reverse-mode gradient of ``loss_fn()`` w.r.t. every trainable parameter (the reference)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), [p for _, p in named])
    return {n: g.detach() for (n, _), g in zip(named, grads)}


def direction(name: str, like: torch.Tensor, seed: int, step: int, query: int, kind: str) -> torch.Tensor:
    return noise.generate(0, like.numel(), noise.noise_key(seed, step, query, name), kind).to(like.dtype).view(like.shape)


# ----------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q", [1, 3])
def test_d_is_the_autograd_directional_derivative(kind: str, q: int) -> None:
    """d_k = grad L . v_k, with grad from reverse-mode autograd and v_k regenerated from its key."""
    model = mlp()
    x, y = data()
    grad = autograd_grad(model, lambda: loss_of(model, x, y))
    opt = ForwardGrad(model.named_parameters(), lr=0.0, module=model, q=q, noise=kind, seed=5)
    loss = opt.step(lambda: loss_of(model, x, y))
    assert loss == pytest.approx(loss_of(model, x, y).item(), rel=1e-14)
    assert [r["query"] for r in opt.step_log] == list(range(q))
    for rec in opt.step_log:
        expected = sum((g * direction(n, g, 5, 0, rec["query"], kind)).sum().item() for n, g in grad.items())
        # float64 forward-mode vs reverse-mode: equal up to summation order.
        assert rec["grad"][0] == pytest.approx(expected, rel=1e-10, abs=1e-12)


def last_token_closure(model: torch.nn.Module):
    """The trainer's shape of loss: logits of the last position only (a non-contiguous slice
    of the hidden states enters the head, which ForwardGrad makes contiguous for the JVP)."""
    return lambda: F.cross_entropy(model(input_ids=IDS, logits_to_keep=1).logits[:, -1], IDS[:, 0])


@pytest.mark.parametrize("make_closure", [llama_closure, last_token_closure])
def test_tied_embeddings_get_both_uses_in_the_tangent(make_closure) -> None:
    """The tiny Llama ties lm_head to the embedding: one tensor, two uses; d must see both."""
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    grad = autograd_grad(model, make_closure(model))
    opt = ForwardGrad(model.named_parameters(), lr=0.0, module=model, seed=2)
    opt.step(make_closure(model))
    expected = sum((g * direction(n, g, 2, 0, 0, "gaussian")).sum().item() for n, g in grad.items())
    # fp32, math attention vs the fused SDPA kernel of the reference: ~1e-6 relative.
    assert opt.step_log[0]["grad"][0] == pytest.approx(expected, rel=1e-4)
    emb = "model.embed_tokens.weight"
    only_embedding = (grad[emb] * direction(emb, grad[emb], 2, 0, 0, "gaussian")).sum().item()
    assert abs(only_embedding) > 1e-2 * abs(expected)  # the tied tensor contributes a visible part


@pytest.mark.parametrize("kind", KINDS)
def test_mean_estimate_approaches_autograd_gradient(kind: str) -> None:
    """E[d v] = grad; the cosine of the n-sample mean with grad is predictable.

    d v = v v^T g exactly (no finite difference). Gaussian v: Cov = |g|^2 I + g g^T, so the mean
    of n estimates is g + N with E|N|^2 = (D + 1)|g|^2 / n, and cos(mean, g) ~= 1/sqrt(1 + (D +
    1)/n); Rademacher (v_i^2 = 1): E|N|^2 = (D - 1)|g|^2 / n. The first-order term g.N cancels
    in the cosine, and |N|^2 n / ((D +- 1)|g|^2) concentrates with relative sd ~ sqrt(2/D)
    (D = 83 here): at n = 4000 the cosine (0.99) is predicted to ~0.002 (1 sd), at n = 250
    (0.86) to ~0.015. Bounds: 0.01 and 0.05 (~5 and ~3 sd). A direction applied that differs
    from the tangent measured, or z shared across queries, misses by far more (cos ~ 0 or
    ~1/sqrt(1 + D/q)).
    """
    model = mlp()
    x, y = data()
    g = autograd_grad(model, lambda: loss_of(model, x, y))
    grad = torch.cat([t.reshape(-1) for t in g.values()])
    d = grad.numel()
    opt = ForwardGrad(model.named_parameters(), lr=0.0, module=model, q=100, noise=kind, seed=11)
    for _ in range(40):
        opt.step(lambda: loss_of(model, x, y))
    acc = torch.zeros(d, dtype=torch.float64)
    partial = None
    for i, rec in enumerate(opt.step_log):
        v = torch.cat([direction(n, t, 11, rec["step"], rec["query"], kind).reshape(-1) for n, t in g.items()])
        acc += rec["grad"][0] * v
        if i + 1 == 250:
            partial = acc / 250
    n = len(opt.step_log)
    assert n == 4000
    extra = d + 1 if kind == "gaussian" else d - 1
    assert F.cosine_similarity(acc / n, grad, dim=0).item() == pytest.approx(1 / math.sqrt(1 + extra / n), abs=0.01)
    assert F.cosine_similarity(partial, grad, dim=0).item() == pytest.approx(1 / math.sqrt(1 + extra / 250), abs=0.05)


# ----------------------------------------------------------------------------- the update
def reference_steps(model, x, y, groups, *, steps, q, kind, seed, frozen=()):
    """Plain loop from the equations: d_k from reverse-mode autograd, all queries at theta_t.

    ``groups``: list of (names, lr, wd). Shares only the noise function with the optimizer.
    """
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    group_of = {n: gi for gi, (names, _, _) in enumerate(groups) for n in names}
    for t in range(steps):
        grad = autograd_grad(model, lambda: loss_of(model, x, y))
        ds = [sum((grad[n] * direction(n, grad[n], seed, t, k, kind)).sum() for n in group_of if n not in frozen)
              for k in range(q)]
        with torch.no_grad():
            for k, dk in enumerate(ds):
                for n in group_of:
                    if n in frozen:
                        continue
                    _, lr, wd = groups[group_of[n]]
                    theta = named[n]
                    theta.copy_((1 - lr / q * wd) * theta - lr / q * dk * direction(n, theta, seed, t, k, kind))
    return params_of(model)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("master", [False, True])
def test_matches_reference_loop_with_param_groups(kind: str, q: int, master: bool) -> None:
    model = mlp()
    x, y = data()
    model[0].bias.requires_grad_(False)  # frozen: not in the JVP, not updated
    first, second = ["0.weight", "0.bias"], ["2.weight", "2.bias"]
    spec = [(first, 0.05, 0.1), (second, 0.02, 0.0)]
    expected = reference_steps(model, x, y, spec, steps=4, q=q, kind=kind, seed=3, frozen={"0.bias"})
    named = dict(model.named_parameters())
    opt = ForwardGrad([{"params": [(n, named[n]) for n in first], "lr": 0.05, "weight_decay": 0.1},
                       {"params": [(n, named[n]) for n in second], "lr": 0.02}],
                      module=model, q=q, noise=kind, seed=3, master_weights=master)
    for _ in range(4):
        opt.step(lambda: loss_of(model, x, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12, msg=n)
    assert len(opt.step_log) == 4 * q
    rec = opt.step_log[-1]
    assert (rec["step"], rec["query"], rec["seed"]) == (3, q - 1, 3)
    assert rec["lr"] == pytest.approx([0.05 / q, 0.02 / q]) and rec["grad"][0] == rec["grad"][1]
    assert len(rec["loss"]) == 1


def test_tangents_are_not_kept_and_one_closure_call_per_query() -> None:
    model = mlp()
    x, y = data()
    calls = []

    def closure():
        calls.append(1)
        return loss_of(model, x, y)

    opt = ForwardGrad(model.named_parameters(), lr=1e-2, module=model, q=2)
    opt.step(closure)
    assert len(calls) == 2
    assert not any(opt.state[p] for p in model.parameters())  # no stored direction
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # originals back in the module
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in (model[0], model[2]))


# ----------------------------------------------------------------------------- state, replay
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_state_dict_round_trip(dtype: torch.dtype, master: bool) -> None:
    model = tiny_llama(dtype=dtype)
    opt = ForwardGrad(model.named_parameters(), lr=1e-3, module=model, q=2, master_weights=master, seed=9)
    for _ in range(2):
        opt.step(llama_closure(model))
    saved = opt.state_dict()
    snapshot = copy.deepcopy(saved)
    twin = copy.deepcopy(model)
    fresh = ForwardGrad(twin.named_parameters(), lr=0.5, module=twin)  # hyperparameters come from the dict
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 1e-3 and fresh.param_groups[0]["q"] == 2 and fresh.step_count == 2
    for _ in range(2):
        assert opt.step(llama_closure(model)) == fresh.step(llama_closure(twin))
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n
    assert opt.step_log == fresh.step_log and saved["zo"] == snapshot["zo"]
    if master:
        assert all(fresh.state[p]["master"].dtype == torch.float32 for p in twin.parameters())


@pytest.mark.parametrize("master", [False, True])
def test_replaying_the_step_log_reproduces_the_run_bitwise(master: bool) -> None:
    """No +-eps round trip: the run's update pass and the replay's are the same pass, bitwise
    with or without master weights."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    groups = lambda named: [  # noqa: E731
        {"params": [(k, v) for k, v in named if "mlp" in k], "lr": 2e-3, "weight_decay": 0.1},
        {"params": [(k, v) for k, v in named if "mlp" not in k], "lr": 1e-3},
    ]
    opt = ForwardGrad(groups(list(model.named_parameters())), module=model, q=2, seed=5, master_weights=master)
    for _ in range(4):
        opt.step(llama_closure(model))
    replayer = ForwardGrad(groups(list(base.named_parameters())), module=base, q=2, seed=5, master_weights=master)
    replayer.replay(opt.state_dict()["zo"]["log"])
    for (n, a), (_, b) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_llama().parameters()))


def test_two_runs_are_bitwise_equal_and_global_rng_is_untouched() -> None:
    runs = []
    for _ in range(2):
        model = tiny_llama()
        opt = ForwardGrad(model.named_parameters(), lr=1e-3, module=model, q=2)
        losses = []
        for _ in range(3):
            before = torch.get_rng_state()
            losses.append(opt.step(llama_closure(model)))
            assert torch.equal(before, torch.get_rng_state())
        runs.append((losses, params_of(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


def test_loss_falls_on_a_tiny_llama() -> None:
    model = tiny_llama()
    opt = ForwardGrad(model.named_parameters(), lr=2e-3, module=model, noise="rademacher")
    losses = [opt.step(llama_closure(model)) for _ in range(60)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # Measured: mean of the first 10 steps 5.80, of steps 50-59 ~5.57; a sign error would make
    # it rise.
    assert last < first - 0.12, (first, last)


# ----------------------------------------------------------------------------- errors
def _bad(**kw):
    return lambda m: ForwardGrad(m.named_parameters(), **{"module": m, **kw})


@pytest.mark.parametrize(
    "make,match",
    [
        (_bad(lr=-1.0), "learning rate: -1.0"),
        (_bad(q=0), "q: 0"),
        (_bad(noise="uniform"), "uniform"),
        (_bad(weight_decay=-0.1), "weight_decay: -0.1"),
        (_bad(seed=1.5), "seed: 1.5"),
        (_bad(module=None), "Invalid module: None"),
        (lambda m: ForwardGrad([{"params": list(m.parameters()), "eps": 1e-3}], module=m), "Invalid eps: 0.001"),
        (lambda m: ForwardGrad([{"params": list(m.parameters()), "one_sided": True}], module=m), "one_sided"),
        (lambda m: ForwardGrad(m.named_parameters(), module=mlp()), "not a parameter of the module"),
        (lambda m: ForwardGrad([{"params": [m[0].weight], "q": 2}, {"params": [m[2].weight]}], module=m),
         "q: must be the same"),
    ],
)
def test_bad_configuration_raises_before_touching_parameters(make, match) -> None:
    model = mlp()
    before = params_of(model)
    with pytest.raises(ValueError, match=match):
        make(model)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_options_are_checked_without_the_model() -> None:
    """What the DeepSpeed JSON check calls before the model is loaded (no module exists yet)."""
    ForwardGrad.check_options({"lr": 1e-5, "q": 2, "noise": "rademacher", "master_weights": True})
    for options, match in (({"lr": -1.0}, "learning rate"), ({"eps": 1e-3}, "eps"), ({"module": None}, "module"),
                           ({"betas": (0.9, 0.99)}, r"Unknown parameter\(s\) \['betas'\]")):
        with pytest.raises(ValueError, match=match):
            ForwardGrad.check_options(options)


@pytest.mark.parametrize(
    "closure,match",
    [
        (None, "requires a closure"),
        (lambda m, x, y: loss_of(m, x, y).item(), "returned float"),
        (lambda m, x, y: loss_of(m, x, y).detach(), "carries no tangent"),
        (lambda m, x, y: torch.tensor(1.0), "carries no tangent"),
    ],
)
def test_bad_closure_raises_without_updating(closure, match) -> None:
    model = mlp()
    x, y = data()
    before = params_of(model)
    opt = ForwardGrad(model.named_parameters(), lr=1e-2, module=model)
    with pytest.raises(ValueError, match=match):
        opt.step(None if closure is None else (lambda: closure(model, x, y)))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert opt.step_count == 0 and not opt.step_log


@pytest.mark.parametrize("bad", ["loss", "derivative"])
@pytest.mark.parametrize("master", [False, True])
def test_non_finite_loss_or_derivative_aborts_the_step_untouched(bad: str, master: bool) -> None:
    model = mlp(torch.float32)
    x, y = data(torch.float32)
    opt = ForwardGrad(model.named_parameters(), lr=1e-2, module=model, q=2, master_weights=master)
    opt.step(lambda: loss_of(model, x, y))
    before = params_of(model)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model, x, y)
        if len(calls) < 2:
            return loss
        if bad == "loss":
            return loss * float("nan")
        w = model[0].weight[0, 0]
        return loss + torch.sqrt(w - w.detach())  # primal sqrt(0) = 0, tangent v / 0 = +-inf

    with pytest.raises(NonFiniteLossError, match="step 1, query 1"):
        opt.step(closure)
    # Updates are applied after every JVP succeeded: nothing moved, bitwise.
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert opt.step_count == 1 and len(opt.step_log) == 2 and opt._zo["nonfinite"] == 1
    opt.step(lambda: loss_of(model, x, y))
    assert opt.step_count == 2


# ----------------------------------------------------------------------------- engines
class _RecordingShards(LocalShards):
    """LocalShards that records which parameters were asked for."""

    def __init__(self, sharded: bool = False) -> None:
        super().__init__()
        self.asked: list[tuple[int, ...]] = []
        self.sharded = sharded

    def view(self, param: torch.Tensor) -> ShardView:
        self.asked.append(tuple(param.shape))
        full = super().view(param)
        if not self.sharded or param.numel() < 2:
            return full
        half = param.numel() // 2  # what a 2-rank sharding engine would give rank 0
        return ShardView(local=full.local[:half], offset=0, numel=param.numel(), global_shape=param.shape,
                         replicated=False)


class _ZeRO3Shards(_RecordingShards):
    """A provider whose capabilities are ZeRO-3's: partitioned parameters."""

    capabilities = ShardCapabilities(whole_parameters=False, reduces_gradients=False, engine="deepspeed")


def test_zero3_parameters_are_rejected_before_the_provider_is_asked() -> None:
    """The provider's capabilities say its parameters are partitioned: rejected by name, no view
    requested (a view of a persistent ZeRO-3 parameter may all-gather)."""
    model = mlp()
    shards = _ZeRO3Shards()
    before = params_of(model)
    with pytest.raises(ValueError, match=r"_ZeRO3Shards \(deepspeed\) is DeepSpeed ZeRO-3"):
        ForwardGrad(model.named_parameters(), module=model, shards=shards)
    assert shards.asked == []
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_sharded_views_are_rejected_naming_the_provider() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="_RecordingShards gives parameter '0.weight' a sharded view"):
        ForwardGrad(model.named_parameters(), module=model, shards=_RecordingShards(sharded=True))


def test_parameters_partitioned_after_construction_are_rejected() -> None:
    """zero3_engine(optimizer=instance) partitions the parameters after the optimizer exists, then
    hands it its provider: refused when set, before any view or step."""
    model = mlp()
    opt = ForwardGrad(model.named_parameters(), lr=1e-2, module=model)
    shards = _ZeRO3Shards()
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
        opt.shards = shards
    assert shards.asked == [] and isinstance(opt.shards, LocalShards)


