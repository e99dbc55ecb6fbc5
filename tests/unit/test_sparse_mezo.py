"""Sparse MeZO: exact whole-tensor thresholds, frozen entries untouched, one mask per query.

References are independent of the code under test: ``torch.kthvalue`` for the thresholds, a
plain out-of-place loop with full-size masks for the trajectory, Python integer loops for the
packed mask layout, and MeZO itself for sparsity 0.

Optimizer-level tests use the eager noise kernels (the models are tiny; compiling every kernel
variant would dominate the file's run time). The compiled kernels are checked against their
definitions and against the unmasked kernels bit for bit, under both backends, and one test
runs the whole optimizer compiled (sparsity 0 is MeZO bitwise).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from zoscale import noise
from zoscale.models import tiny_llama
from zoscale.optim.base import NonFiniteLossError
from zoscale.optim.directions import Masked
from zoscale.optim.mezo import MeZO
from zoscale.optim.sparse_mezo import RadixSelect, SparseMeZO, tuned_count


def _masked_directions(monkeypatch: pytest.MonkeyPatch) -> list[list[Masked]]:
    """Every query's directions, as Sparse MeZO makes them (their packed masks can be inspected)."""
    made: list[list[Masked]] = []
    real = Masked.for_query.__func__  # type: ignore[attr-defined]

    def recording(cls: type, *args: object, **kwargs: object) -> list[Masked]:
        made.append(real(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Masked, "for_query", classmethod(recording))
    return made


def _no_mask_held(made: list[list[Masked]]) -> bool:
    return bool(made) and all(d.words is None for dirs in made for d in dirs)

KINDS = ["gaussian", "rademacher"]
IDS = torch.randint(0, 262, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _eager_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _k(n: int, s: float) -> int:
    """ceil((1 - s) n) for the sparsities used here, in integers (independent of tuned_count)."""
    num, den = {0.8: (1, 5), 0.5: (1, 2), 0.3: (7, 10)}[s]
    return -(-n * num // den)


def kth_abs(t: torch.Tensor, k: int) -> float:
    """The reference: the k-th smallest |t| over the whole tensor."""
    a = t.detach().abs().flatten()
    a = a.double() if a.dtype == torch.float64 else a.float()
    return torch.kthvalue(a, k).values.item()


def _llama(num_layers: int = 2) -> torch.nn.Module:
    return tiny_llama(num_layers=num_layers, seed=0)


def _closure(model: torch.nn.Module):
    return lambda: model(input_ids=IDS, labels=IDS).loss


def mlp(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ulps(now: torch.Tensor, then: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    spacing = torch.nextafter(scale, torch.full_like(scale, math.inf)) - scale
    return (now.float() - then.float()).abs() / spacing.float()


# ----------------------------------------------------------------------------- the order statistic
def test_tuned_count_reads_the_sparsity_as_a_decimal() -> None:
    # (1 - 0.8) * 10 is 1.9999999999999996 in binary floating point and (1 - 0.7) * 10 is
    # 3.0000000000000004: a float ceil would give 2 and 4 by luck or not. k is ceil((1-s) n).
    assert [tuned_count(10, s) for s in (0.0, 0.5, 0.7, 0.8, 0.9, 0.99)] == [10, 5, 3, 2, 1, 1]
    assert tuned_count(7, 0.5) == 4 and tuned_count(1, 0.8) == 1 and tuned_count(3, 0.3) == 3
    for n in (1, 9, 64, 1001):
        assert tuned_count(n, 0.8) == _k(n, 0.8) and tuned_count(n, 0.5) == _k(n, 0.5)


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ties = (torch.randn(50, 21, generator=g) * 4).round() / 4  # few distinct values: ties at h
    ties[0, :7] = -0.0
    spread = torch.randn(3001, generator=g) * torch.logspace(-30, 30, 3001)  # every exponent byte
    return [t.to(dtype) for t in (torch.randn(101, 37, generator=g), ties, spread, torch.full((70,), 0.125),
                                  torch.randn(1, generator=g), torch.randn(2, generator=g))]


def _cut(n: int, parts: int, layout: str, cols: int = 1) -> list[tuple[int, int]]:
    """(start, length) of each rank's piece: ZeRO-3 flat partitions or FSDP2 row chunks."""
    if layout == "zero3":
        ps = -(-n // parts)
        return [(r * ps, max(0, min(ps, n - r * ps))) for r in range(parts)]
    rows = n // cols
    chunk = -(-rows // parts)
    return [(min(rows, r * chunk) * cols, (min(rows, (r + 1) * chunk) - min(rows, r * chunk)) * cols)
            for r in range(parts)]


def _simulate(tensors: list[torch.Tensor], ks: list[int], pieces: list[list[tuple[int, int]]]) -> list[float]:
    """Run RadixSelect on simulated ranks: ``pieces[rank][t]`` is rank's (start, length) of tensor t."""
    widths = [64 if t.dtype == torch.float64 else 32 for t in tensors]
    sels = [RadixSelect([t.numel() for t in tensors], ks, widths) for _ in pieces]
    for r in range(sels[0].rounds):
        counts = sum(sel.count([t.flatten()[a:a + n] for t, (a, n) in zip(tensors, piece)], r)
                     for sel, piece in zip(sels, pieces))
        for sel in sels:  # the all-reduce: every rank sees the same sum
            sel.advance(counts, r)
    values = [sel.values() for sel in sels]
    assert all(v == values[0] for v in values)
    return values[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["one", "zero3", "fsdp2", "replicas", "hsdp"])
def test_radix_select_is_kthvalue_of_the_whole_tensor(dtype: torch.dtype, layout: str) -> None:
    tensors = _tensors(dtype)
    ks = []
    for t in tensors:
        n = t.numel()
        ks += [1, max(1, n // 3), _k(n, 0.8), n - 1 if n > 1 else 1, n]
    tensors = [t for t in tensors for _ in range(5)]
    cols = [t.shape[-1] if t.dim() == 2 else 1 for t in tensors]
    if layout == "one":
        pieces = [[(0, t.numel()) for t in tensors]]
    elif layout in ("zero3", "fsdp2"):
        parts = 3
        cuts = [_cut(t.numel(), parts, layout, c) for t, c in zip(tensors, cols)]
        pieces = [[cut[r] for cut in cuts] for r in range(parts)]
    elif layout == "replicas":  # DDP / ZeRO-3 persistent parameters: 2 ranks hold everything
        pieces = [[(0, t.numel()) for t in tensors]] * 2
    else:  # HSDP: 2 replica groups x 3 shards, all 6 ranks in the loss group
        cuts = [_cut(t.numel(), 3, "fsdp2", c) for t, c in zip(tensors, cols)]
        pieces = [[cut[r] for cut in cuts] for r in range(3)] * 2
    got = _simulate(tensors, ks, pieces)
    for t, k, h in zip(tensors, ks, got):
        assert h == kth_abs(t, k), (layout, tuple(t.shape), k)


def test_radix_select_rejects_uneven_replication() -> None:
    t = torch.randn(10)
    with pytest.raises(RuntimeError, match="same number of ranks"):
        _simulate([t], [3], [[(0, 10)], [(0, 4)]])


# ----------------------------------------------------------------------------- the masked kernels
def _pack_reference(m: torch.Tensor, start: int) -> torch.Tensor:
    """The documented layout in Python integers: element i is bit (i div 64) mod 32 of word
    (i div 4096 - start div 4096) * 128 + ((i div 2048) mod 2) * 64 + i mod 64."""
    words = [0] * noise.mask_words(start, m.numel())
    for j, bit in enumerate(m.tolist()):
        if bit:
            i = start + j
            words[((i >> 12) - (start >> 12)) * 128 + ((i >> 11) & 1) * 64 + (i & 63)] |= 1 << ((i >> 6) & 31)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


# (start, n): whole blocks, a partial head and/or tail, inside one block, crossing one, empty.
LAYOUTS = [(0, 4096), (5, 10000), (4000, 300), (4096, 8192), (100, 50), (8191, 1), (0, 64), (3, 0)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["compiled", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_kernels_equal_their_definitions(kind: str, backend: str, dtype: torch.dtype,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", backend)
    if backend == "compiled" and dtype == torch.bfloat16 and kind == "rademacher":
        pytest.skip("covered by the other compiled combinations (compile time)")
    g = torch.Generator().manual_seed(0)
    key = noise.noise_key(3, 1, 0, "w")
    for start, n in LAYOUTS:
        x0 = torch.randn(n, generator=g).to(dtype)
        h = x0.float().abs().median().item() if n else 0.0
        m = x0.float().abs() <= h
        assert noise.mask_words(start, n) <= n / 32 + 256  # 1 bit per element (+ 2 edge blocks)
        full = x0.clone()
        noise.axpbz_(full, start, key, 0.9, 0.3, kind)
        expected = torch.where(m, full, x0)  # the unmasked kernel where m, untouched elsewhere

        words = torch.full((noise.mask_words(start, n),), 12345, dtype=torch.int32)
        x = x0.clone()
        noise.masked_axpbz_pack_(x, words, start, key, 0.9, 0.3, h, kind)
        assert torch.equal(x, expected), (start, n)
        assert torch.equal(words, _pack_reference(m, start)), (start, n)
        x = x0.clone()
        noise.masked_axpbz_(x, words, start, key, 0.9, 0.3, kind)
        assert torch.equal(x, expected), (start, n)
        x = x0.clone()  # every bit set: the unmasked kernel, bit for bit
        noise.masked_axpbz_(x, torch.full_like(words, -1), start, key, 0.9, 0.3, kind)
        assert torch.equal(x, full), (start, n)

        # From an fp32 master: the mask is |master| <= h.
        master, dst = x0.float().clone(), x0.clone()
        noise.masked_perturb_from_master_(dst, master, start, key, 0.3, h, kind)
        ref = x0.clone()
        noise.perturb_from_master_(ref, x0.float().clone(), start, key, 0.3, kind)
        assert torch.equal(dst, torch.where(m, ref, x0)) and torch.equal(master, x0.float())
        noise.masked_update_master_(dst, master, start, key, 0.9, 0.3, h, kind)
        ref_master = x0.float().clone()
        noise.update_master_(ref.clone(), ref_master, start, key, 0.9, 0.3, kind)
        assert torch.equal(master, torch.where(m, ref_master, x0.float()))
        assert torch.equal(dst, master.to(dtype))


def test_masked_kernels_reject_a_wrong_mask() -> None:
    x = torch.zeros(100)
    with pytest.raises(ValueError, match="128 words"):
        noise.masked_axpbz_(x, torch.zeros(3, dtype=torch.int32), 0, 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="int32"):
        noise.masked_axpbz_(x, torch.zeros(128, dtype=torch.int64), 0, 1, 1.0, 1.0)


# ----------------------------------------------------------------------------- thresholds in the optimizer
def test_thresholds_are_fixed_at_the_first_step_from_the_initial_weights() -> None:
    model = _llama()
    init = params_of(model)
    opt = SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.8)
    assert opt.thresholds() == {}
    opt.step(_closure(model))
    assert "threshold" in opt.last_step_timing
    fixed = opt.thresholds()
    assert set(fixed) == set(init)
    for n, t in init.items():
        assert fixed[n] == kth_abs(t, _k(t.numel(), 0.8)), n
    for _ in range(3):
        opt.step(_closure(model))
        assert "threshold" not in opt.last_step_timing
    assert opt.thresholds() == fixed


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_entries_stay_bitwise_and_the_tuned_ones_move(master: bool, kind: str) -> None:
    model = _llama()
    init = params_of(model)
    opt = SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, sparsity=0.8, noise=kind,
                     master_weights=master)
    for _ in range(4):
        opt.step(_closure(model))
    h = opt.thresholds()
    tuned_total = moved_total = 0
    for n, p in model.named_parameters():
        frozen = init[n].abs() > h[n]
        tuned = ~frozen
        assert int(tuned.sum()) >= _k(p.numel(), 0.8)  # exactly k without ties at h
        assert torch.equal(p.detach()[frozen], init[n][frozen]), n
        tuned_total += int(tuned.sum())
        moved_total += int((p.detach() != init[n])[tuned].sum())
    assert moved_total > 0.99 * tuned_total, (moved_total, tuned_total)


@pytest.mark.parametrize("master", [False, True])
def test_bf16_frozen_entries_stay_bitwise(master: bool) -> None:
    model = _llama().to(torch.bfloat16)
    init = params_of(model)
    opt = SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-2, sparsity=0.5, master_weights=master)
    for _ in range(3):
        opt.step(_closure(model))
    for n, p in model.named_parameters():
        frozen = init[n].float().abs() > opt.thresholds()[n]
        assert torch.equal(p.detach()[frozen], init[n][frozen]), n
        assert not torch.equal(p.detach(), init[n]), n


# ----------------------------------------------------------------------------- one mask per query
def reference_steps(model, x, y, *, steps, q, one_sided, kind, seed, lr, eps, wd, s):
    """Sparse MeZO from the paper's equations, out of place, with full-size masks and z.

    Shares nothing with the optimizer but the noise function (tested in test_noise.py).
    """
    theta = params_of(model)
    h = {n: kth_abs(v, _k(v.numel(), s)) for n, v in theta.items()}
    crossings = 0

    def L(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y).item()

    for t in range(steps):
        for k in range(q):
            z = {n: noise.generate(0, v.numel(), noise.noise_key(seed, t, k, n), kind).view(v.shape).double()
                 for n, v in theta.items()}
            m = {n: theta[n].abs() <= h[n] for n in theta}  # from the unperturbed point
            crossings += sum(int((m[n] & ((theta[n] + eps * z[n]).abs() > h[n])).sum()) for n in theta)
            plus = L({n: theta[n] + eps * z[n] * m[n] for n in theta})
            if one_sided:
                g = (plus - L(theta)) / eps
            else:
                g = (plus - L({n: theta[n] - eps * z[n] * m[n] for n in theta})) / (2 * eps)
            theta = {n: torch.where(m[n], (1 - lr / q * wd) * theta[n] - lr / q * g * z[n], theta[n])
                     for n in theta}
    return theta, crossings


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q,one_sided", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("master", [False, True])
def test_matches_the_reference_loop_with_one_mask_per_query(kind, q, one_sided, master) -> None:
    # eps 0.05 against weights of ~0.3: many tuned entries cross h in the +eps pass, so a mask
    # recomputed from the perturbed values would freeze them in the -eps pass and the update.
    model = mlp()
    x, y = data()
    hp = dict(lr=0.05, eps=0.05, wd=0.1, s=0.5)
    expected, crossings = reference_steps(copy.deepcopy(model), x, y, steps=4, q=q, one_sided=one_sided,
                                          kind=kind, seed=3, **hp)
    assert crossings > 5
    opt = SparseMeZO(model.named_parameters(), lr=hp["lr"], eps=hp["eps"], weight_decay=hp["wd"],
                     sparsity=hp["s"], q=q, one_sided=one_sided, noise=kind, seed=3, master_weights=master)
    for _ in range(4):
        opt.step(lambda: F.cross_entropy(model(x), y))
    # float64 throughout: in-place vs out-of-place evaluation differs only by rounding.
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("master", [False, True])
def test_both_forwards_see_the_same_mask_from_the_unperturbed_point(master: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    made = _masked_directions(monkeypatch)
    model = mlp()
    x, y = data()
    opt = SparseMeZO(model.named_parameters(), lr=0.05, eps=0.05, sparsity=0.5, seed=1, master_weights=master)
    opt.step(lambda: F.cross_entropy(model(x), y))
    seen: list[dict[str, torch.Tensor]] = []

    def closure():
        seen.append(params_of(model))
        if len(seen) == 2:  # words of the query in progress: 1 bit per element, never more
            assert master or all(w.dtype == torch.int32 and w.numel() == noise.mask_words(0, p.numel())
                                 for w, p in zip((d.words for d in made[-1]), model.parameters()))
        return F.cross_entropy(model(x), y)

    theta = params_of(model)
    h = opt.thresholds()
    opt.step(closure)
    total_crossed = 0
    for n, t in theta.items():
        m = t.abs() <= h[n]
        z = noise.generate(0, t.numel(), noise.noise_key(1, 1, 0, n)).view(t.shape).double()
        crossed = m & ((t + 0.05 * z).abs() > h[n])
        for sign, point in ((1, seen[0][n]), (-1, seen[1][n])):
            torch.testing.assert_close(point, torch.where(m, t + sign * 0.05 * z, t), rtol=0, atol=1e-15)
            assert torch.equal(point[~m], t[~m])
        total_crossed += int(crossed.sum())
    assert total_crossed > 0  # entries that |theta + eps z| pushed past h were still perturbed by -eps
    assert _no_mask_held(made)  # freed after the update


# ----------------------------------------------------------------------------- MeZO at sparsity 0
@pytest.mark.parametrize("master,kind,backend", [(False, "gaussian", "compiled"), (False, "rademacher", "eager"),
                                                  (True, "gaussian", "eager")])
def test_sparsity_zero_is_mezo_bitwise(master: bool, kind: str, backend: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", backend)
    m1, m2 = _llama(), _llama()
    o1 = SparseMeZO(m1.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, sparsity=0.0, seed=2, q=2,
                    noise=kind, master_weights=master)
    o2 = MeZO(m2.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=2, q=2, noise=kind,
              master_weights=master)
    for _ in range(3):
        assert o1.step(_closure(m1)) == o2.step(_closure(m2))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert all(h == math.inf for h in o1.thresholds().values())


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.8", None])
def test_bad_sparsity_raises_before_touching_parameters(bad) -> None:
    model = mlp()
    before = params_of(model)
    with pytest.raises(ValueError, match=r"Invalid sparsity: " + repr(bad).replace("(", r"\(")):
        SparseMeZO(model.parameters(), lr=1e-3, sparsity=bad)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_sparsity_must_be_the_same_in_every_group() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="sparsity: must be the same in every param group; param group 0 sets 0.5"):
        SparseMeZO([{"params": [model[0].weight], "sparsity": 0.5}, {"params": [model[2].weight]}], sparsity=0.8)


def test_missing_closure_raises_before_anything_is_computed() -> None:
    opt = SparseMeZO(mlp().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="requires a closure"):
        opt.step()
    assert opt.thresholds() == {} and opt.step_count == 0


# ----------------------------------------------------------------------------- state, replay
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_state_dict_round_trip_keeps_the_thresholds(dtype: torch.dtype, master: bool) -> None:
    model = _llama().to(dtype)
    opt = SparseMeZO(model.named_parameters(), lr=2e-2, eps=1e-3, sparsity=0.8, q=2, master_weights=master, seed=9)
    for _ in range(3):
        opt.step(_closure(model))
    saved = opt.state_dict()
    snapshot = copy.deepcopy(saved)
    assert all(isinstance(st["threshold"], float) for st in saved["state"].values())

    twin = copy.deepcopy(model)
    # Thresholds recomputed from the trained weights would differ: the dict must carry them.
    recomputed = SparseMeZO(copy.deepcopy(model).named_parameters(), sparsity=0.8)
    recomputed.ensure_thresholds()
    assert recomputed.thresholds() != opt.thresholds()

    fresh = SparseMeZO(twin.named_parameters(), lr=0.5, eps=0.5, sparsity=0.3)  # all from the dict
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["sparsity"] == 0.8 and fresh.thresholds() == opt.thresholds()
    for _ in range(3):
        assert opt.step(_closure(model)) == fresh.step(_closure(twin))
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n
    assert opt.step_log == fresh.step_log
    assert saved["zo"] == snapshot["zo"]
    for k, st in snapshot["state"].items():
        for name, v in st.items():
            assert (torch.equal(saved["state"][k][name], v) if isinstance(v, torch.Tensor)
                    else saved["state"][k][name] == v)


@pytest.mark.parametrize("master", [True, False])
def test_replaying_the_step_log_reproduces_the_run(master: bool) -> None:
    model = _llama()
    base = copy.deepcopy(model)
    named = dict(model.named_parameters())
    groups = lambda n: [  # noqa: E731
        {"params": [(k, n[k]) for k in n if "mlp" in k], "lr": 2e-3, "weight_decay": 0.1},
        {"params": [(k, n[k]) for k in n if "mlp" not in k], "lr": 1e-3},
    ]
    opt = SparseMeZO(groups(named), eps=1e-3, q=2, seed=5, sparsity=0.8, master_weights=master)
    for _ in range(6):
        opt.step(_closure(model))
    log = opt.state_dict()["zo"]["log"]
    # From the base weights alone: the replayer fixes the same thresholds from them.
    replayer = SparseMeZO(groups(dict(base.named_parameters())), eps=1e-3, q=2, seed=5, sparsity=0.8,
                          master_weights=master)
    replayer.replay(log)
    assert replayer.thresholds() == opt.thresholds()
    worst = 0.0
    for (n, a), (_, b) in zip(model.named_parameters(), base.named_parameters()):
        if master:
            assert torch.equal(a, b), n
        else:
            worst = max(worst, _ulps(b.detach(), a.detach(), a.detach().abs() + 6e-3).max().item())
    if not master:
        # The run rounds three times per query, the replay once: within 2 units per query
        # (12 queries), as MeZO (tests/unit/test_optim.py); no entry decided differently.
        assert worst <= 2 * 12, worst
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), _llama().parameters()))


@pytest.mark.parametrize("master", [True, False])
@pytest.mark.parametrize("fail_call", [1, 2])
def test_non_finite_loss_restores_and_frees_the_mask(master: bool, fail_call: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    made = _masked_directions(monkeypatch)
    model = mlp(torch.float32)
    x, y = data(torch.float32)
    opt = SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.5, master_weights=master)
    opt.step(lambda: F.cross_entropy(model(x), y))
    before = params_of(model)
    h = opt.thresholds()
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == fail_call else F.cross_entropy(model(x), y)

    with pytest.raises(NonFiniteLossError):
        opt.step(closure)
    assert opt.step_count == 1 and _no_mask_held(made)
    for n, p in model.named_parameters():
        frozen = before[n].abs() > h[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        if master:
            assert torch.equal(p.detach(), before[n]), n
        else:
            assert _ulps(p.detach(), before[n], before[n].abs() + 1e-3).max() <= 1.5, n


# ----------------------------------------------------------------------------- training
def test_loss_falls_on_a_tiny_llama() -> None:
    model = _llama()
    closure = _closure(model)
    start = closure().item()
    opt = SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.8, noise="rademacher")
    for _ in range(40):
        opt.step(closure)
    end = closure().item()
    # Measured: 5.838 -> 5.696. A sign error, a broken restore or a wrong mask would not fall.
    # (MeZO at this lr, the same 40 steps, diverges on this model: 5.838 -> 7.98.)
    assert end < start - 0.07, (start, end)


def test_state_holds_no_full_size_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _masked_directions(monkeypatch)
    model = _llama()
    opt = SparseMeZO(model.named_parameters(), lr=1e-3, sparsity=0.8, q=2)
    for _ in range(2):
        opt.step(_closure(model))
    for st in opt.state.values():
        assert set(st) == {"threshold"} and isinstance(st["threshold"], float)
    assert _no_mask_held(made)
