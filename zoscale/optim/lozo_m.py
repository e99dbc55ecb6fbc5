"""LOZO-M: LOZO with momentum on the low-rank factor (Chen et al., 2024, arXiv 2410.07698)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from zoscale import noise
from zoscale.optim import options as opts
from zoscale.optim.base import ZOOptimizer
from zoscale.optim.directions import ShardEntry, written
from zoscale.optim.lowrank import LowRank, LowRankDirection, factor_v, lowrank_axpb_, outer_sum
from zoscale.optim.lozo import LOWRANK_OPTIONS, LOZO
from zoscale.optim.registry import register
from zoscale.optim.schedules import Averaged
from zoscale.optim.updates import Query, acc_dtype

__all__ = ["LOZOM", "LowRankMomentum"]

BETA = opts.Option("beta", 0.9, opts.real(0.0, high=1.0, rule="momentum coefficient, must be in [0, 1)"),
                   is_global=True)


def _factor_momentum(e: ShardEntry, d: LowRankDirection, window: int, g: dict[str, Any]) -> torch.Tensor:
    """This shard's rows of ``N``, expressed on the current window's ``V`` (projected if needed)."""
    st = e.state
    acc = acc_dtype(e.view.local.dtype)
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
        v_old = factor_v(e.stable_id, g["seed"], old, cols, g["rank"], g["noise"], device=d.V.device)
        # r x r, fp64: the same on every rank whatever the threads' summation order.
        proj = (v_old.double().T @ d.V.double() / cols).to(acc)
        N.copy_(outer_sum(N, proj.T))
        st["momentum_window"] = window
    return N


class LowRankMomentum:
    """LOZO-M's rule: ``N <- beta N + (1 - beta) mean_k g_k U_k``, ``W <- (1 - lr wd) W - lr N V^T / r``.

    Restore and update in one pass per tensor; tensors that are not 2-D keep a full momentum
    ``m <- beta m + (1 - beta) mean_k g_k z_k``, ``theta <- (1 - lr wd) theta - lr m``. The step log
    records the group's lr.
    """

    def logged_lr(self, lr: float, count: int) -> float:
        return lr

    def apply(self, opt: ZOOptimizer, step: int, queries: Sequence[Query], lrs: Sequence[float], count: int,
              offset: Sequence[float]) -> None:
        g0 = opt.param_groups[0]
        window = step // g0["nu"]
        for i, d in enumerate(queries[-1][0]):
            e = d.entry
            gi = e.group_index
            lr = lrs[gi]
            decay = 1.0 - lr * opt.param_groups[gi]["weight_decay"]
            terms = [(q[0][i], q[1][gi]) for q in queries]
            if isinstance(d, LowRankDirection):
                self._matrix(e, d, terms, count, window, g0, lr, decay, offset[gi])
            else:
                self._dense(e, d, terms, count, g0, lr, decay, offset[gi])
            written(e.view)

    @staticmethod
    def _matrix(e: ShardEntry, d: LowRankDirection, terms: list[tuple[Any, float]], count: int, window: int,
                g: dict[str, Any], lr: float, decay: float, offset: float) -> None:
        v, r = e.view, g["rank"]
        acc = acc_dtype(v.local.dtype)
        N = _factor_momentum(e, d, window, g)
        G = sum(dq.U.to(acc) * (gk / count) for dq, gk in terms)
        N.mul_(g["beta"]).add_(G * (1.0 - g["beta"]))
        if g["master_weights"]:
            master = e.state["master"]
            lowrank_axpb_(master, master, v.offset, N, d.V, d.row0, a=decay, b=-lr / r)
            v.local.copy_(master)
        else:
            A = d.U.to(acc) * (-decay * offset) - N * (lr / r)
            lowrank_axpb_(v.local, v.local, v.offset, A, d.V, d.row0, a=decay)

    @staticmethod
    def _dense(e: ShardEntry, d: Any, terms: list[tuple[Any, float]], count: int, g: dict[str, Any], lr: float,
               decay: float, offset: float) -> None:
        v, beta, kind = e.view, g["beta"], g["noise"]
        m = e.state.get("momentum")
        if m is None:
            e.state["momentum"] = m = torch.zeros(v.local.numel(), dtype=acc_dtype(v.local.dtype), device=v.local.device)
        for j, (dq, gk) in enumerate(terms):
            noise.axpbz_(m, v.offset, dq.key, beta if j == 0 else 1.0, (1.0 - beta) * gk / count, kind)
        if g["master_weights"]:
            master = e.state["master"]
            master.mul_(decay).add_(m * -lr)
            v.local.copy_(master)
        else:
            noise.axpbz_(v.local, v.offset, d.key, decay, -decay * offset, kind)
            v.local.add_(m * -lr)


@register("lozo_m")
class LOZOM(ZOOptimizer):
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

    OPTIONS = (*opts.SPSA_OPTIONS[:3], BETA, *LOWRANK_OPTIONS, *opts.SPSA_OPTIONS[3:])
    direction = LowRank
    rule = LowRankMomentum()
    schedule = Averaged()
    window = LOZO.window
