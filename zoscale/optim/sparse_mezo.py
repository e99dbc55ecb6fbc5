"""Sparse MeZO: magnitude-masked zeroth-order fine-tuning (Liu et al., 2024, arXiv 2402.15751)."""

from __future__ import annotations

import math
import struct
import time
from fractions import Fraction
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from zoscale import noise
from zoscale.optim.base import ShardEntry, ZOOptimizer, _written
from zoscale.optim.mezo import MeZO
from zoscale.shards import ShardProvider

__all__ = ["SparseMeZO", "RadixSelect", "tuned_count"]

# Elements per chunk of the threshold's histogram passes: bounds their transient memory (about
# 14 bytes per element of a chunk: |x| as fp32, the prefix test, the selected bits, the digits).
_SELECT_CHUNK = 1 << 18


def tuned_count(numel: int, sparsity: float) -> int:
    """``k = ceil((1 - s) * numel)``: how many smallest-magnitude entries a tensor tunes.

    ``s`` is read as the decimal it prints as (``0.8`` is 4/5, not the binary float just above
    it), so ``k`` is what the user expects: ``tuned_count(10, 0.8) == 2``. ``1 <= k <= numel``
    for ``0 <= s < 1`` and ``numel >= 1``.
    """
    return math.ceil((1 - Fraction(repr(float(sparsity)))) * numel)


def _float_of_bits(bits: int, width: int) -> float:
    if width == 32:
        return struct.unpack("<f", struct.pack("<i", bits))[0]
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class RadixSelect:
    """Exact k-th smallest ``|x|`` of many tensors whose elements are spread over ranks.

    Non-negative IEEE floats order like their bit patterns read as integers, so the k-th
    smallest magnitude is found one byte of its bit pattern at a time, most significant first
    (radix select): in round ``r`` every rank counts, per tensor, its elements whose leading
    ``8r`` bits equal the prefix found so far, in 256 bins of the next byte; the counts of all
    tensors are summed over the ranks in ONE all-reduce; the bin where the running count reaches
    ``k`` extends the prefix. fp32 (and bf16/fp16, compared as fp32) takes 4 rounds, fp64 8.
    Memory: the local shards, read in chunks, plus ``tensors x 257`` counts. Communication: 4
    (8 with fp64) all-reduces of ``tensors x 257`` int64 for ALL tensors together.

    Replicas: a rank may hold a tensor whole (a replica) or a shard, and replica groups (HSDP,
    DDP, ZeRO-3 persistent parameters) hold the same elements several times. Every element of a
    tensor is assumed to be held by the same number ``c`` of ranks of the group (true for every
    provider: each shard of an FSDP/HSDP/ZeRO layout is held once per replica group). The last
    column counts the elements held, so the summed total is ``c * numel``; comparing the summed
    counts with ``c * k`` (i.e. working in fractions of the total) is exact whatever ``c`` is.

    Usage (collective: every rank calls it with the same tensors in the same order)::

        sel = RadixSelect(numels, ks, widths)
        for r in range(sel.rounds):
            counts = sel.count(locals_, r)      # this rank's counts
            all_reduce_sum(counts)
            sel.advance(counts, r)
        sel.values()                            # the k-th smallest |x| of each tensor

    Args:
        numels: elements of each (unsharded) tensor.
        ks: the order statistic wanted per tensor, ``1 <= k <= numel`` (1 = the smallest).
        widths: 32 (fp32, bf16, fp16: compared in fp32) or 64 (fp64) per tensor.
    """

    def __init__(self, numels: list[int], ks: list[int], widths: list[int]) -> None:
        # Checks of the caller's arguments (ValueError). SparseMeZO.ensure_thresholds always passes
        # valid ones: it selects only tensors with 1 <= k < numel (k = N gets h = +inf instead).
        if not len(numels) == len(ks) == len(widths):
            raise ValueError(f"RadixSelect takes one numel, k and width per tensor, got {len(numels)} numels, "
                             f"{len(ks)} ks and {len(widths)} widths")
        for t, (n, k, w) in enumerate(zip(numels, ks, widths)):
            if not (1 <= k <= n and w in (32, 64)):
                raise ValueError(f"RadixSelect: tensor {t} has numel {n}, k {k}, width {w}; the order statistic "
                                 "needs 1 <= k <= numel and a width of 32 or 64 bits")
        self.numels, self.ks, self.widths = list(numels), list(ks), list(widths)
        self.prefix = [0] * len(numels)
        self.below = [0] * len(numels)  # summed count of held elements with a smaller prefix
        self.copies = [0] * len(numels)
        self.rounds = max(widths, default=32) // 8

    @staticmethod
    def bits(x: torch.Tensor, width: int) -> torch.Tensor:
        """The bit patterns of ``|x|`` as fp32 (int32) or fp64 (int64): non-negative integers."""
        if width == 32:
            return x.abs().to(torch.float32).view(torch.int32)
        return x.abs().to(torch.float64).view(torch.int64)

    def count(self, locals_: list[torch.Tensor], r: int) -> torch.Tensor:
        """This rank's ``[tensors, 257]`` counts of round ``r`` (column 256: elements held)."""
        device = locals_[0].device if locals_ else torch.device("cpu")
        out = torch.zeros(len(locals_), 257, dtype=torch.int64, device=device)
        for t, (x, width) in enumerate(zip(locals_, self.widths, strict=True)):
            out[t, 256] = x.numel()
            if r >= width // 8:
                continue
            shift = width - 8 * (r + 1)
            for a in range(0, x.numel(), _SELECT_CHUNK):
                b = self.bits(x[a:a + _SELECT_CHUNK], width)
                if r > 0:
                    b = b[(b >> (shift + 8)) == self.prefix[t]]
                out[t, :256] += torch.bincount((b >> shift) & 255, minlength=256)
        return out

    def advance(self, counts: torch.Tensor, r: int) -> None:
        """Extend every tensor's prefix by one byte from the counts summed over the ranks."""
        rows = counts.tolist()
        for t, row in enumerate(rows):
            if r == 0:
                held, n = row[256], self.numels[t]
                if held == 0 or held % n:
                    raise RuntimeError(
                        f"tensor {t}: the ranks hold {held} elements of a tensor of {n}; every element must "
                        "be held by the same number of ranks of the group (shards once per replica group)"
                    )
                self.copies[t] = held // n
            if r >= self.widths[t] // 8:
                continue
            target = self.ks[t] * self.copies[t]
            running = self.below[t]
            for digit in range(256):
                if running + row[digit] >= target:
                    break
                running += row[digit]
            else:  # unreachable when the counts are consistent
                raise RuntimeError(f"tensor {t}: counts do not reach k = {self.ks[t]} in round {r}")
            self.below[t] = running
            self.prefix[t] = (self.prefix[t] << 8) | digit

    def values(self) -> list[float]:
        """The k-th smallest magnitude of each tensor (after all rounds)."""
        return [_float_of_bits(p, w) for p, w in zip(self.prefix, self.widths)]


class SparseMeZO(MeZO):
    r"""MeZO that perturbs and updates only the small-magnitude entries of each tensor.

    Per trainable tensor ``T`` with ``N`` elements, a threshold ``h_T`` is fixed once, from the
    weights at the first step (or the first :meth:`replay`), and kept in ``state[p]["threshold"]``:

    .. math::
        k = \lceil (1 - s) N \rceil, \qquad h_T = |\theta_T|_{(k)}
        \quad\text{(the k-th smallest magnitude over the whole, unsharded tensor)}

    (``h_T = +inf`` when ``k = N``, e.g. ``s = 0``, so that nothing ever freezes). Each query
    of each step then uses the mask ``m = |theta| <= h`` of the point where it starts:

    .. math::
        g = \frac{L(\theta + \epsilon\, m \odot z) - L(\theta - \epsilon\, m \odot z)}{2\epsilon},
        \qquad \theta \leftarrow \theta - \eta\, m \odot (g z + \lambda \theta)

    Frozen entries (``m = 0``) are never written: they stay bitwise equal. At the start, exactly
    the ``k`` smallest entries are tuned (more on ties at ``h``); an entry that grows past ``h``
    freezes from then on (the mask is recomputed from the current weights every step, the paper's
    dynamic mask, with a fixed threshold).

    Sharded threshold: the quantile is over the whole tensor, not a shard. It is computed exactly
    by :class:`RadixSelect` (4 rounds of 256-bin histograms of the fp32 bit patterns of ``|theta|``,
    one all-reduce per round for all tensors together, O(shard) memory) over the loss group,
    which handles replicas (HSDP replica groups, ZeRO-3 persistent parameters, DDP).

    The same mask in every pass of a query, from the unperturbed value:
        * with ``master_weights``: ``m = |master| <= h``, recomputed in each pass from the fp32
          master, which only the final update pass moves;
        * without: the compute copy is edited in place, so after the first pass ``|x| > h`` can
          be a frozen ``theta = x`` or a tuned ``theta = x - eps z`` that crossed the threshold.
          The first pass therefore packs ``m`` into 1 bit per element (int32 words, n/8 bytes:
          1/32 of an fp32 shard, 1/16 of a bf16 one, plus at most 1 KiB per tensor for its edge
          blocks; one buffer for all tensors), later passes read it, and it is freed when the
          query's update is done. Never a full-size bool/float mask. A cheaper exact scheme
          would store only the elements whose decode is ambiguous (within ``eps |z|`` of ``h``),
          but that set has a data-dependent size.
    The mask kernels are fused with the noise (``zoscale.noise.masked_*``), compiled like the
    other kernels.

    Reproducibility: the run is the same, bit for bit, on one process and on ZeRO-3 / FSDP2 as
    long as the loss is averaged the same way (tested). It is more sensitive than MeZO's to
    ulp-level loss differences (another world size or batch split, a whole-batch fp32 mean instead
    of the mean of per-rank means): an entry that a step leaves within rounding of ``h`` is tuned
    in one run and frozen in the other, and that single entry changes the next projected
    gradient. Measured on the tiny Llama (lr 2e-3, s 0.8, 4 steps): weights 9e-4 apart where
    MeZO's stay within 1e-5. Such runs agree statistically, not to fp32 tolerance.

    Choices the paper leaves open: the threshold is per tensor (the paper: per layer), fixed at the
    first step, an exact order statistic (not a sampled or histogram-approximate quantile); ``k``
    rounds up; the mask is per query (for ``q > 1`` each query starts from the partly updated
    point, see ``zoscale.optim.base``); weight decay applies to tuned entries only (frozen ones
    are never written); ``eps`` is not rescaled for the smaller perturbation. ``sparsity=0`` is
    exactly MeZO (bit for bit). ``sparsity`` is global (every param group).

    Args:
        sparsity: the fraction ``s`` of each tensor frozen, in ``[0, 1)`` (paper: 0.5-0.8,
            usually 0.8).
        Other arguments as :class:`~zoscale.optim.mezo.MeZO`.

    Example:
        >>> opt = SparseMeZO(model.named_parameters(), lr=1e-6, eps=1e-3, sparsity=0.8)
        >>> loss = opt.step(closure)   # the first step also fixes the thresholds (collective)
    """

    GLOBAL_KEYS: tuple[str, ...] = MeZO.GLOBAL_KEYS + ("sparsity",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        sparsity: float = 0.8,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"Invalid sparsity: {sparsity!r} (the fraction of each tensor frozen, in [0, 1))")
        # The SPSA query in progress (no master weights): whether one is open, and the packed
        # masks of its tensors, id(param) -> int32 words, from its first pass (None before it).
        self._in_query = False
        self._words: dict[int, torch.Tensor] | None = None
        # sparsity is global (GLOBAL_KEYS): in the defaults, so every group holds the optimizer's.
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, q=q, one_sided=one_sided, noise=noise,
                        seed=seed, master_weights=master_weights, sparsity=float(sparsity))
        ZOOptimizer.__init__(self, params, defaults, shards)  # MeZO.__init__ only builds MeZO's defaults

    # ----------------------------------------------------------------- thresholds
    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def ensure_thresholds(self) -> bool:
        """Fix the threshold of every trainable tensor that has none yet, from its current weights.

        Collective over the loss group when any tensor needs one (every rank has the same state,
        so every rank takes part). Called by :meth:`step` and :meth:`replay`.

        Returns:
            Whether any threshold was computed.
        """
        todo = [p for p in self._trainable() if "threshold" not in self.state[p]]
        if not todo:
            return False
        s = self.param_groups[0]["sparsity"]
        select: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []  # (param, local, numel, k)
        for p in todo:
            v = self.shards.view(p)
            k = tuned_count(v.numel, s)
            if k >= v.numel:
                self.state[p]["threshold"] = math.inf
                continue
            if v.local.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise TypeError(f"SparseMeZO needs floating-point parameters, got {v.local.dtype}")
            local = self.state[p].get("master", v.local)
            select.append((p, local, v.numel, k))
        if not select:
            return True
        widths = [64 if t.dtype == torch.float64 else 32 for _, t, _, _ in select]
        sel = RadixSelect([n for *_, n, _ in select], [k for *_, k in select], widths)
        world = self._world()
        locals_ = [t for _, t, _, _ in select]
        for r in range(sel.rounds):
            counts = sel.count(locals_, r)
            if world > 1:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self._loss_group())
            sel.advance(counts, r)
        for (p, *_), h in zip(select, sel.values()):
            self.state[p]["threshold"] = h
        return True

    def thresholds(self) -> dict[str, float]:
        """The fixed threshold of each trainable tensor, by stable id (empty before the first step)."""
        out = {}
        for g in self.param_groups:
            for i, p in enumerate(g["params"]):
                if p.requires_grad and "threshold" in self.state[p]:
                    out[self._stable_id(g, i, p)] = self.state[p]["threshold"]
        return out

    # ----------------------------------------------------------------- masked passes
    def _perturb(self, entries: list[ShardEntry], keys: list[int], scale: list[float], *, delta: list[float]) -> None:
        kind = self.param_groups[0]["noise"]
        masters = self.param_groups[0]["master_weights"]
        first = not masters and self._words is None
        if not masters and not self._in_query:
            # Cannot happen through step(): the base class perturbs only in _spsa_estimate, which
            # this class reaches only through _spsa_query, and that opens the query.
            raise RuntimeError("SparseMeZO: a perturbation pass outside an SPSA query; without master weights "
                               "the packed masks live from a query's first pass to its update (_spsa_query)")
        if first:  # the query's first pass: the shards still hold theta; pack its mask
            if scale != delta:
                # Cannot happen: both estimates start with perturb(eps, eps) from theta (offset 0),
                # and the mask must be read from theta, before any edit.
                raise RuntimeError(f"SparseMeZO: the first pass of a query must start from theta (scale == delta), "
                                   f"got scale {scale} and delta {delta}")
            self._words = self._allocate_words(entries)
        for e, key in zip(entries, keys):
            v, gi, h = e.view, e.group_index, e.state["threshold"]
            if masters:
                noise.masked_perturb_from_master_(v.local, e.state["master"], v.offset, key, delta[gi], h, kind)
            elif first:
                noise.masked_axpbz_pack_(v.local, self._words[id(e.param)], v.offset, key, 1.0, scale[gi], h, kind)
            else:
                noise.masked_axpbz_(v.local, self._words[id(e.param)], v.offset, key, 1.0, scale[gi], kind)
            _written(v)

    @staticmethod
    def _allocate_words(entries: list[ShardEntry]) -> dict[int, torch.Tensor]:
        """The packed masks of a query: slices of one int32 buffer per device (1 bit per element).

        One allocation (instead of one per tensor, interleaved with the forward's activations)
        leaves no holes in the host heap when it is freed.
        """
        sizes: dict[torch.device, int] = {}
        for e in entries:
            dev = e.view.local.device
            sizes[dev] = sizes.get(dev, 0) + noise.mask_words(e.view.offset, e.view.local.numel())
        buffers = {dev: torch.empty(n, dtype=torch.int32, device=dev) for dev, n in sizes.items()}
        used = dict.fromkeys(sizes, 0)
        out = {}
        for e in entries:
            dev, n = e.view.local.device, noise.mask_words(e.view.offset, e.view.local.numel())
            out[id(e.param)] = buffers[dev][used[dev]:used[dev] + n]
            used[dev] += n
        return out

    def _update(self, entries: list[ShardEntry], keys: list[int], decay: list[float],
                z_coef: list[float], current_offset: list[float]) -> None:
        kind = self.param_groups[0]["noise"]
        masters = self.param_groups[0]["master_weights"]
        for e, key in zip(entries, keys):
            v, gi, h = e.view, e.group_index, e.state["threshold"]
            if masters:
                noise.masked_update_master_(v.local, e.state["master"], v.offset, key, decay[gi], z_coef[gi], h, kind)
            else:
                # theta = x - off*z on the mask  =>  decay*theta + c*z = decay*x + (c - decay*off)*z
                b = z_coef[gi] - decay[gi] * current_offset[gi]
                if self._in_query:
                    words = self._words.pop(id(e.param), None) if self._words is not None else None
                    if words is None:
                        # Cannot happen: a query updates (or restores) the entries its first pass
                        # perturbed, and that pass packed a mask for each of them.
                        raise RuntimeError(f"SparseMeZO: no packed mask for {e.stable_id!r} in the query's update")
                    noise.masked_axpbz_(v.local, words, v.offset, key, decay[gi], b, kind)
                else:  # outside a query (replay): the shard holds theta, the mask is |x| <= h
                    if current_offset[gi] != 0.0:
                        # Cannot happen: replay updates from theta itself (offset 0).
                        raise RuntimeError(f"SparseMeZO: an update outside an SPSA query must start from theta "
                                           f"(offset 0), got offsets {current_offset}")
                    words = torch.empty(noise.mask_words(v.offset, v.local.numel()), dtype=torch.int32,
                                        device=v.local.device)
                    noise.masked_axpbz_pack_(v.local, words, v.offset, key, decay[gi], b, h, kind)
                del words
            _written(v)

    def _spsa_query(self, closure: Callable[[], Any], entries: list[ShardEntry], step: int, query: int,
                    lr_scale: float) -> tuple[list[float], tuple[float, float]]:
        # The packed masks live from the query's first pass to its update (or restore).
        self._in_query, self._words = True, None
        try:
            return super()._spsa_query(closure, entries, step, query, lr_scale)
        finally:
            self._in_query, self._words = False, None

    # ----------------------------------------------------------------- step and replay
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one Sparse MeZO step (the first one also fixes the thresholds: collective).

        Args, returns and raises as :meth:`MeZO.step`; ``last_step_timing["threshold"]`` gives
        the seconds spent fixing thresholds on the step that did it.
        """
        if closure is None:
            raise ValueError("SparseMeZO.step requires a closure that returns the mean loss of this rank's micro-batch")
        self.check_options_agree()  # before the thresholds' collectives (and before anything moves)
        t0 = time.perf_counter()
        computed = self.ensure_thresholds()
        seconds = time.perf_counter() - t0
        try:
            return super().step(closure)
        finally:
            if computed:
                self.last_step_timing["threshold"] = seconds

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply a step log to the base weights (see :meth:`ZOOptimizer.replay`).

        Thresholds come from this optimizer's state (loaded from the run) or, if absent, from the
        weights replayed onto, which must then be the run's starting weights. With master weights
        the replay repeats the run's masks and updates bitwise; without, each step's mask is taken
        from the replayed theta, which differs from the run's by its +-eps round-trip drift, so
        an entry within that drift of ``h`` could be decided differently.
        """
        self.ensure_thresholds()
        super().replay(log)
