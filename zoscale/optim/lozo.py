"""LOZO and LOZO-M: low-rank zeroth-order SGD with lazy sampling (Chen et al., 2024, arXiv 2410.07698).

Each 2-D weight ``W`` (``m x n``) is perturbed along a rank-``r`` matrix ``U V^T`` instead of a
full Gaussian ``z``. Sharded, a rank holding the flat range ``[a, b)`` of the row-major ``W``
needs the rows ``a // n .. (b - 1) // n`` of ``U`` and all of ``V``: it builds the perturbation
block of those rows a few rows at a time and slices it to ``[a, b)``, so a pass allocates
``O(rows * r + n * r)`` for the factors plus ``O(max(ROW_CHUNK, n))`` for the block, never the
``m x n`` matrix. ``U`` and ``V`` come from :func:`zoscale.noise.generate` with keys derived from
``(seed, step, query, id)`` like every other noise in zoscale, so they are the same on every
rank and under every sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

import torch

from zoscale import noise
from zoscale.optim.base import ShardEntry, ZOOptimizer, _written
from zoscale.shards import ShardProvider

__all__ = ["LOZO", "LOZOM", "LowRankDirection", "lowrank_axpb_", "row_range", "U_SUFFIX", "V_SUFFIX", "ROW_CHUNK"]

#: Appended to a tensor's stable id to key its ``U`` (per step and query) ...
U_SUFFIX = "/lozo.U"
#: ... and its ``V`` (per lazy-sampling window ``step // nu``; query index 0).
V_SUFFIX = "/lozo.V"
#: Elements of the perturbation block built at a time (whole rows; at least one row).
ROW_CHUNK = 1 << 16


def row_range(offset: int, length: int, cols: int) -> tuple[int, int]:
    """Rows ``[first, last)`` of a row-major ``? x cols`` matrix that flat ``[offset, offset + length)`` touches."""
    return offset // cols, (offset + length - 1) // cols + 1


@dataclass(frozen=True)
class LowRankDirection:
    """The direction ``U V^T`` of one matrix, restricted to the rows a rank's shard touches.

    Attributes:
        U: ``(rows, r)`` fp32: rows ``row0 .. row0 + rows - 1`` of the ``m x r`` factor.
        V: ``(n, r)`` fp32: the whole ``n x r`` factor.
        row0: the global row of ``U[0]``.
    """

    U: torch.Tensor
    V: torch.Tensor
    row0: int


Direction = Union[int, LowRankDirection]  # a noise key (ordinary z) or a low-rank direction


def _outer_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B^T`` for ``A (p, r)``, ``B (s, r)`` as a sum of outer products in a fixed order.

    Every element is ``sum_k A[i, k] * B[j, k]`` with each product and sum rounded once, in the
    order ``k = 0, 1, ...``: its value does not depend on which other rows are computed with it
    (a BLAS matmul may block and fuse differently for different shapes), so every sharding and
    both ranks holding a boundary row get the same bits.
    """
    out = A[:, 0:1] * B[:, 0]
    for k in range(1, A.shape[1]):
        out += A[:, k:k + 1] * B[:, k]
    return out


def lowrank_axpb_(dst: torch.Tensor, src: torch.Tensor, start: int, A: torch.Tensor, V: torch.Tensor, row0: int,
                  a: float = 1.0, b: float = 1.0) -> torch.Tensor:
    """``dst = a*src + b*(A V^T)`` on the flat range ``[start, start + dst.numel())`` of a row-major matrix.

    ``A`` holds rows ``row0 ..`` of the left factor (at least the rows the range touches), ``V``
    the whole right factor (``n x r``: the matrix has ``n`` columns). The product is built a few
    rows at a time (``ROW_CHUNK`` elements), computed in ``promote(src.dtype, float32)`` and
    rounded once into ``dst``. ``dst`` and ``src`` are contiguous 1-D tensors of equal length and
    may be the same tensor.
    """
    length = dst.numel()
    if src.numel() != length or dst.dim() != 1 or src.dim() != 1:
        raise ValueError(f"lowrank_axpb_ takes 1-D tensors of equal length, got {tuple(dst.shape)} and "
                         f"{tuple(src.shape)}")
    if length == 0:
        return dst
    cols = V.shape[0]
    acc = torch.promote_types(src.dtype, torch.float32)
    A = A.to(acc) * b if b != 1.0 else A.to(acc)
    V = V.to(acc)
    first, last = row_range(start, length, cols)
    if first < row0 or last - row0 > A.shape[0]:
        raise ValueError(f"rows [{first}, {last}) of the range are not all in the factor's rows "
                         f"[{row0}, {row0 + A.shape[0]})")
    end = start + length
    rows_per_chunk = max(1, ROW_CHUNK // cols)
    for c0 in range(first, last, rows_per_chunk):
        c1 = min(last, c0 + rows_per_chunk)
        block = _outer_sum(A[c0 - row0:c1 - row0], V).view(-1)
        lo, hi = max(start, c0 * cols), min(end, c1 * cols)
        piece = block[lo - c0 * cols:hi - c0 * cols]
        s = src[lo - start:hi - start]
        piece += s.to(acc) * a if a != 1.0 else s
        dst[lo - start:hi - start].copy_(piece)
    return dst


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


class LOZO(ZOOptimizer):
    r"""Low-rank ZO-SGD with lazy sampling of the right factor, on this rank's parameter shards.

    For every trainable 2-D tensor ``W`` (``m x n``; its global shape, whatever the sharding)::

        V  ~ N(0, I)  (n x r)   drawn at steps t = 0, nu, 2 nu, ...; fixed in between
        U  ~ N(0, I)  (m x r)   drawn at every step (and query)
        W <- W + eps U V^T ; l+ = L()   ;   W <- W - 2 eps U V^T ; l- = L()
        g  = (l+ - l-) / (2 eps)                       (all-reduced over data-parallel ranks)
        W <- (1 - lr wd) (W + eps U V^T) - lr g U V^T / r      (restore + update, one pass)

    Tensors that are not 2-D (biases, norms; conv kernels) take the ordinary MeZO step with a
    full ``z``, bit for bit as :class:`~zoscale.optim.mezo.MeZO` does.

    Scale (the paper's low-rank gradient estimator): the perturbation is ``eps U V^T`` and the
    gradient estimate ``g U V^T / r``. With ``E[U V^T <G, U V^T>] = r G`` the ``1/r``
    makes it unbiased (for eps -> 0), like MeZO's ``g z``. The public LOZO code omits the
    ``1/r`` in its update: its learning rate equals ours divided by ``r`` (identical at r = 1).

    The update moves along exactly the ``U V^T`` the step perturbed with, on every step. The
    public code draws ``V`` inside its perturbation function and re-seeds torch's global
    generator for the update, so on the steps where ``V`` is resampled its update regenerates a
    different ``U`` (the RNG stream was advanced by the ``V`` draw) than its perturbation used;
    here both are pure functions of their keys.

    Noise (a documented choice; part of the run's configuration like MeZO's noise kind):
        * ``U`` rows: ``noise.generate`` of flat indices ``[i r, (i + 1) r)`` for row ``i`` with key
          ``noise_key(seed, step, query, id + "/lozo.U")``: row-major ``m x r``.
        * ``V``: flat ``n x r`` with key ``noise_key(seed, step // nu, 0, id + "/lozo.V")``: all
          queries of a step and all steps of a window share it.
        * ``z`` of other tensors: ``noise_key(seed, step, query, id)``, as MeZO.
        * ``noise="rademacher"`` draws ``U``, ``V`` and ``z`` as random signs (the paper uses
          Gaussians; ``E[U V^T <G, U V^T>] = r G`` holds for both).

    Sharding: a rank holding flat ``[a, b)`` of ``W`` generates rows ``a // n .. (b - 1) // n`` of
    ``U`` and all of ``V``, builds that block of ``U V^T`` ``ROW_CHUNK`` elements at a time and
    slices it to ``[a, b)``: transient memory ``O(shard / n * r + n * r + max(ROW_CHUNK, n))``.
    Each element is ``sum_k U[i, k] V[j, k]`` summed in a fixed order, so the bits do not depend
    on the layout. Three passes per two-sided query, as MeZO; the factors are generated once per
    query and reused by the three passes. With ``master_weights`` the compute copy is written as
    ``cast(master +- eps U V^T)`` and the master updated once, as in the base class.

    Other choices the paper leaves open: ``q > 1`` (n-SPSA) draws a ``U`` per query, shares
    ``V``, and applies each query's update with ``lr / q`` as MeZO does; weight decay applies to
    every tensor of a group with ``weight_decay > 0`` (no name rules); ``rank`` larger than
    ``min(m, n)`` is allowed (the perturbation's rank is then at most ``min(m, n)``).

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate (the update is ``lr g U V^T / r``).
        eps: perturbation scale.
        weight_decay: L2 term applied to theta, as MeZO.
        rank: ``r``, the rank of the perturbation (paper: 1 or 2).
        nu: lazy-sampling interval: ``V`` is redrawn every ``nu`` steps (paper: 50 or 100).
        q: queries per step (n-SPSA).
        one_sided: use ``g = (L(W + eps U V^T) - L(W)) / eps``.
        noise: ``"gaussian"`` (the paper) or ``"rademacher"``.
        seed: run seed; the same on every rank.
        master_weights: keep an fp32 copy of every local shard (use for bf16/fp16 models).
        shards: shard provider (default: every parameter local; engines supply their own).
    """

    GLOBAL_KEYS: tuple[str, ...] = ZOOptimizer.GLOBAL_KEYS + ("rank", "nu")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        rank: int = 2,
        nu: int = 50,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, rank=rank, nu=nu, q=q, one_sided=one_sided,
                        noise=noise, seed=seed, master_weights=master_weights)
        self._validate_group(defaults)  # named errors even before torch looks at params
        super().__init__(params, defaults, shards)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        ZOOptimizer._validate_group(group)
        _check_int("rank", group["rank"], 1)
        _check_int("nu", group["nu"], 1)

    # ----------------------------------------------------------------- directions
    def window(self, step: int) -> int:
        """The lazy-sampling window of ``step``: ``V`` is the same for all steps of a window."""
        return step // self.param_groups[0]["nu"]

    def factor_v(self, stable_id: str, window: int, cols: int, *, seed: int | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``cols x r`` factor ``V`` of a matrix for a window (fp32)."""
        g = self.param_groups[0]
        seed = g["seed"] if seed is None else seed
        key = noise.noise_key(seed, window, 0, stable_id + V_SUFFIX)
        return noise.generate(0, cols * g["rank"], key, g["noise"], device=device).view(cols, g["rank"])

    def factor_u(self, stable_id: str, step: int, query: int, rows: tuple[int, int], *, seed: int | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``[rows[0], rows[1])`` of the ``m x r`` factor ``U`` of a matrix (fp32)."""
        g = self.param_groups[0]
        seed = g["seed"] if seed is None else seed
        r = g["rank"]
        key = noise.noise_key(seed, step, query, stable_id + U_SUFFIX)
        return noise.generate(rows[0] * r, (rows[1] - rows[0]) * r, key, g["noise"], device=device).view(-1, r)

    def _direction(self, e: ShardEntry, seed: int, step: int, query: int) -> Direction:
        v = e.view
        if len(v.global_shape) != 2:
            return noise.noise_key(seed, step, query, e.stable_id)
        cols = v.global_shape[1]
        rows = row_range(v.offset, v.local.numel(), cols)
        device = v.local.device
        return LowRankDirection(U=self.factor_u(e.stable_id, step, query, rows, seed=seed, device=device),
                                V=self.factor_v(e.stable_id, self.window(step), cols, seed=seed, device=device),
                                row0=rows[0])

    def _directions(self, entries: list[ShardEntry], seed: int, step: int, query: int) -> list[Direction]:
        return [self._direction(e, seed, step, query) for e in entries]

    def _keys(self, entries: list[ShardEntry], step: int, query: int) -> list[Direction]:  # type: ignore[override]
        return self._timed("perturb", self._directions, entries, self.param_groups[0]["seed"], step, query)

    # ----------------------------------------------------------------- passes
    def _perturb(self, entries: list[ShardEntry], keys: list[Direction],  # type: ignore[override]
                 scale: list[float], *, delta: list[float]) -> None:
        """Move every shard by ``scale[g]`` times its direction (``U V^T`` or ``z``); see the base class."""
        plain = [(e, k) for e, k in zip(entries, keys) if not isinstance(k, LowRankDirection)]
        if plain:
            super()._perturb([e for e, _ in plain], [k for _, k in plain], scale, delta=delta)
        masters = self.param_groups[0]["master_weights"]
        for e, d in zip(entries, keys):
            if not isinstance(d, LowRankDirection):
                continue
            v, gi = e.view, e.group_index
            if masters:
                lowrank_axpb_(v.local, e.state["master"], v.offset, d.U, d.V, d.row0, b=delta[gi])
            else:
                lowrank_axpb_(v.local, v.local, v.offset, d.U, d.V, d.row0, b=scale[gi])
            _written(v)

    def _update(self, entries: list[ShardEntry], keys: list[Direction], decay: list[float],  # type: ignore[override]
                z_coef: list[float], current_offset: list[float]) -> None:
        """Restore and update in one pass: ``theta <- decay*theta + z_coef*z`` for ordinary tensors,
        ``theta <- decay*theta + (z_coef / r) U V^T`` for matrices (the estimator's ``1/r``)."""
        plain = [(e, k) for e, k in zip(entries, keys) if not isinstance(k, LowRankDirection)]
        if plain:
            super()._update([e for e, _ in plain], [k for _, k in plain], decay, z_coef, current_offset)
        masters = self.param_groups[0]["master_weights"]
        r = self.param_groups[0]["rank"]
        for e, d in zip(entries, keys):
            if not isinstance(d, LowRankDirection):
                continue
            v, gi = e.view, e.group_index
            if masters:
                master = e.state["master"]
                lowrank_axpb_(master, master, v.offset, d.U, d.V, d.row0, a=decay[gi], b=z_coef[gi] / r)
                v.local.copy_(master)
            else:
                # theta = x - off * P  =>  decay*theta + (c/r) P = decay*x + (c/r - decay*off) P
                coef = z_coef[gi] / r - decay[gi] * current_offset[gi]
                lowrank_axpb_(v.local, v.local, v.offset, d.U, d.V, d.row0, a=decay[gi], b=coef)
            _written(v)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one LOZO step.

        Args:
            closure: runs the forward pass on this rank's micro-batch and returns its mean loss.
                Called ``2 q`` times, under ``torch.no_grad()``.

        Returns:
            The loss at the unperturbed point, estimated as the mean of each query's pair and
            averaged over ranks.

        Raises:
            ValueError: no closure.
            NonFiniteLossError: a loss was NaN/inf; parameters are restored, no step is taken.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step requires a closure that returns the mean loss of this "
                             "rank's micro-batch")
        self._begin_step()
        step, q = self._zo["step"], self.param_groups[0]["q"]
        entries = self._select(self._entries(), step)
        self._ensure_masters(entries)
        total = 0.0
        try:
            for k in range(q):
                grads, losses = self._spsa_query(closure, entries, step, k, 1.0 / q)
                self._log(step, k, grads, 1.0 / q, losses)
                total += 0.5 * (losses[0] + losses[1])
        finally:
            self._end_step()
        self._zo["step"] = step + 1
        return total / q

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply the updates recorded in a step log to this optimizer's (base) parameters.

        As :meth:`ZOOptimizer.replay`, with every matrix moved along its regenerated
        ``U V^T / r``: bitwise with master weights, within the +-eps round-trip drift without.
        """
        all_entries = self._entries()
        self._ensure_masters(all_entries)
        groups = self.param_groups
        for rec in log:
            self._check_record(rec)
            entries = self._select(all_entries, rec["step"])
            dirs = self._directions(entries, rec["seed"], rec["step"], rec["query"])
            decay = [1.0 - lr * g["weight_decay"] for lr, g in zip(rec["lr"], groups)]
            coef = [-lr * gk for lr, gk in zip(rec["lr"], rec["grad"])]
            self._update(entries, dirs, decay, coef, [0.0] * len(groups))

    def _check_record(self, rec: dict[str, Any]) -> None:
        n = len(self.param_groups)
        if len(rec["grad"]) != n or len(rec["lr"]) != n:
            raise ValueError(f"log record for step {rec['step']} has {len(rec['grad'])} groups, "
                             f"this optimizer has {n}")


class LOZOM(LOZO):
    r"""LOZO with momentum kept on the low-rank factor (the paper's LOZO-M).

    For every trainable 2-D tensor ``W`` (``m x n``) an ``m x r`` momentum factor ``N`` is kept
    (its rows this rank's shard touches: a row cut by a shard boundary is held, and updated
    identically, by both neighbours). While ``V`` is fixed the full momentum is ``N V^T``::

        at a window change (V_old -> V):   N <- N (V_old^T V) / n        (projection)
        N <- beta N + (1 - beta) g U
        W <- (1 - lr wd) W - lr N V^T / r

    (the paper's LOZO-M, with the same ``1/r`` as LOZO; ``N`` starts at 0). At a resample the
    old full momentum ``N V_old^T`` is carried into the new subspace: its least-squares
    coefficient there is ``N V_old^T V (V^T V)^-1``, and ``V^T V ~ n I`` (its diagonal is
    exactly ``n`` for Rademacher ``V``) gives the paper's (and the public code's) cheap form
    ``N V_old^T V / n``: an ``r x r`` product, the same on every rank, applied row by row. The
    window ``N`` is expressed in is stored with it (``state["momentum_window"]``), so the
    projection is applied whenever the window changed since ``N`` was last written -- also
    after a resume.

    Tensors that are not 2-D keep a full momentum (shaped like their local shard; biases and
    norms are small): ``m <- beta m + (1 - beta) g z``, ``theta <- (1 - lr wd) theta - lr m``, as
    the public code does. ``beta = 0`` is LOZO. Where the public code differs: its first step
    sets the momentum to ``g U`` (``g z``) instead of ``(1 - beta) g U`` (a first update
    ``1 / (1 - beta)`` times larger); here both start from zero, as the paper's recursion.

    Passes: with ``q = 1`` still three per step, the update fused with the restore
    (``W <- decay x + (-decay off U - lr/r N) V^T``, both factors on the same ``V``); non-2-D
    tensors take one extra pass over their momentum. ``q > 1`` evaluates every query at the
    same theta (each query's third pass only restores) and feeds the mean estimate
    ``(1/q) sum_k g_k U_k`` into the momentum once; the step log then has ``q`` records with the
    full ``lr``. A non-finite loss leaves parameters and momentum as they were.

    Args:
        beta: momentum coefficient in ``[0, 1)`` (paper: 0.9).
        Other arguments as :class:`LOZO`.
    """

    GLOBAL_KEYS: tuple[str, ...] = LOZO.GLOBAL_KEYS + ("beta",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        beta: float = 0.9,
        rank: int = 2,
        nu: int = 50,
        q: int = 1,
        one_sided: bool = False,
        noise: str = "gaussian",
        seed: int = 0,
        master_weights: bool = False,
        shards: ShardProvider | None = None,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, beta=beta, rank=rank, nu=nu, q=q,
                        one_sided=one_sided, noise=noise, seed=seed, master_weights=master_weights)
        self._validate_group(defaults)
        ZOOptimizer.__init__(self, params, defaults, shards)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        LOZO._validate_group(group)
        beta = group["beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta!r} (momentum coefficient, must be in [0, 1))")

    # ----------------------------------------------------------------- momentum
    def _factor_momentum(self, e: ShardEntry, d: LowRankDirection, window: int, seed: int) -> torch.Tensor:
        """This shard's rows of ``N``, expressed on the current window's ``V`` (projected if needed)."""
        st = e.state
        acc = torch.promote_types(e.view.local.dtype, torch.float32)
        shape = tuple(d.U.shape)
        N = st.get("momentum")
        if N is None:
            st["momentum"] = N = torch.zeros(shape, dtype=acc, device=e.view.local.device)
            st["momentum_window"] = window
            return N
        if tuple(N.shape) != shape:
            raise ValueError(f"momentum of {e.stable_id!r} has shape {tuple(N.shape)}, the shard's rows need {shape}: "
                             "the shard layout changed since it was saved")
        old = st["momentum_window"]
        if old != window:
            cols = d.V.shape[0]
            v_old = self.factor_v(e.stable_id, old, cols, seed=seed, device=d.V.device)
            # r x r, fp64: the same on every rank whatever the threads' summation order.
            proj = (v_old.double().T @ d.V.double() / cols).to(acc)
            N.copy_(_outer_sum(N, proj.T))
            st["momentum_window"] = window
        return N

    def _momentum_update(self, entries: list[ShardEntry], queries: list[tuple[list[Direction], list[float]]],
                         lrs: list[float], offset: list[float], window: int, seed: int) -> None:
        """Fold the step's estimate into the momentum and move theta: restore + update in one pass.

        ``queries`` holds each query's directions and projected gradients (per group);
        ``offset[g]`` is how far the compute copy sits from theta along the last query's direction.
        """
        groups = self.param_groups
        beta, r, kind = groups[0]["beta"], groups[0]["rank"], groups[0]["noise"]
        masters = groups[0]["master_weights"]
        q = len(queries)
        last = queries[-1][0]
        for i, e in enumerate(entries):
            v, gi = e.view, e.group_index
            lr = lrs[gi]
            decay = 1.0 - lr * groups[gi]["weight_decay"]
            d = last[i]
            acc = torch.promote_types(v.local.dtype, torch.float32)
            if isinstance(d, LowRankDirection):
                N = self._factor_momentum(e, d, window, seed)
                G = sum(dirs[i].U.to(acc) * (g[gi] / q) for dirs, g in queries)  # type: ignore[union-attr]
                N.mul_(beta).add_(G * (1.0 - beta))
                if masters:
                    master = e.state["master"]
                    lowrank_axpb_(master, master, v.offset, N, d.V, d.row0, a=decay, b=-lr / r)
                    v.local.copy_(master)
                else:
                    A = d.U.to(acc) * (-decay * offset[gi]) - N * (lr / r)
                    lowrank_axpb_(v.local, v.local, v.offset, A, d.V, d.row0, a=decay)
            else:
                m = e.state.get("momentum")
                if m is None:
                    e.state["momentum"] = m = torch.zeros(v.local.numel(), dtype=acc, device=v.local.device)
                for j, (dirs, g) in enumerate(queries):
                    noise.axpbz_(m, v.offset, dirs[i], beta if j == 0 else 1.0, (1.0 - beta) * g[gi] / q, kind)
                if masters:
                    master = e.state["master"]
                    master.mul_(decay).add_(m * -lr)
                    v.local.copy_(master)
                else:
                    noise.axpbz_(v.local, v.offset, d, decay, -decay * offset[gi], kind)
                    v.local.add_(m * -lr)
            _written(v)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one LOZO-M step (arguments, return value and errors as :meth:`LOZO.step`)."""
        if closure is None:
            raise ValueError("LOZOM.step requires a closure that returns the mean loss of this rank's micro-batch")
        self._begin_step()
        groups = self.param_groups
        step, q, seed = self._zo["step"], groups[0]["q"], groups[0]["seed"]
        entries = self._select(self._entries(), step)
        self._ensure_masters(entries)
        queries: list[tuple[list[Direction], list[float]]] = []
        records = []
        try:
            for k in range(q):
                dirs, diff, losses, offset = self._spsa_estimate(closure, entries, step, k)
                queries.append((dirs, diff))
                records.append((k, diff, losses))
                if k < q - 1:
                    self._timed("update", self._restore, entries, dirs, offset)
            self._timed("update", self._momentum_update, entries, queries, [g["lr"] for g in groups], offset,
                        self.window(step), seed)
        finally:
            self._end_step()
        for k, diff, losses in records:
            self._log(step, k, diff, 1.0, losses)
        self._zo["step"] = step + 1
        return sum(0.5 * (lp + lm) for _, _, (lp, lm) in records) / q

    @torch.no_grad()
    def replay(self, log: list[dict[str, Any]]) -> None:
        """Apply a step log: the records of each step feed the momentum as the run did.

        The momentum in ``self.state`` is used and advanced, so a freshly built optimizer
        replays a log from step 0; one loaded from a checkpoint continues from it.
        """
        all_entries = self._entries()
        self._ensure_masters(all_entries)
        groups = self.param_groups
        i = 0
        while i < len(log):
            j = i
            while j < len(log) and log[j]["step"] == log[i]["step"]:
                self._check_record(log[j])
                j += 1
            recs = log[i:j]
            step, seed = recs[0]["step"], recs[0]["seed"]
            entries = self._select(all_entries, step)
            queries = [(self._directions(entries, rec["seed"], step, rec["query"]), rec["grad"]) for rec in recs]
            self._momentum_update(entries, queries, recs[-1]["lr"], [0.0] * len(groups), self.window(step), seed)
            i = j
