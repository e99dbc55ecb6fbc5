"""ZO-SGD-Cons from ZO-Bench (Zhang et al., 2024, arXiv 2402.11592): move only if a candidate
lowers the loss on the step's batch."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from zoscale.optim.base import NonFiniteLossError, ZOOptimizer
from zoscale.optim.directions import ShardEntry, written
from zoscale.optim.registry import register
from zoscale.optim.rules import conservative_choice
from zoscale.optim.selection import Plan
from zoscale.optim.updates import CHUNK, Query, acc_dtype, spans

__all__ = ["ZOSGDCons", "Conservative"]

Move = tuple[float, list[float]]  # the candidate a * theta + sum_k b_k z_k, per group


def _moves(opt: ZOOptimizer, queries: Sequence[Query], lrs: Sequence[float], sign: float) -> list[Move]:
    """Per group: ``(a, [b_k])`` of the candidate ``a theta + sum_k b_k z_k``."""
    q = len(queries)
    return [(1.0 - lr * g["weight_decay"], [sign * lr * grads[gi] / q for _, grads in queries])
            for gi, (lr, g) in enumerate(zip(lrs, opt.param_groups))]


class Conservative:
    """The schedule of ZO-SGD-Cons: ``L(theta)``, the queries at theta, then the best candidate.

    Every point is written from an exact *anchor* of theta (the master, or a copy of the shards
    taken at the start of the step) with the same chunked ops, so rewriting a candidate gives the
    same bits and the loss compared is the loss at the bits the step leaves.
    """

    def _point(self, anchor: torch.Tensor, lo: int, hi: int, dirs: list[Any], move: Move) -> torch.Tensor:
        """``anchor * a + sum_k b_k z_k`` on ``[lo, hi)``, in at least fp32."""
        acc = acc_dtype(anchor.dtype)
        a, bs = move
        out = anchor[lo:hi].to(acc) * a
        for d, b in zip(dirs, bs):
            out.add_(d.values(lo, hi).to(acc), alpha=b)
        return out

    def write(self, entries: Sequence[ShardEntry], anchors: Sequence[torch.Tensor], queries: Sequence[Query] | None,
              moves: list[Move] | None, chunk: int = CHUNK) -> None:
        """Compute copy <- theta (``moves`` None) or <- the candidate; the anchors are untouched."""
        for i, (e, anchor) in enumerate(zip(entries, anchors)):
            v = e.view
            if moves is None or queries is None:
                v.local.copy_(anchor)
            else:
                dirs = [q[0][i] for q in queries]
                for lo, hi in spans(v.local.numel(), chunk):
                    v.local[lo:hi].copy_(self._point(anchor, lo, hi, dirs, moves[e.group_index]))
            written(v)

    def commit(self, entries: Sequence[ShardEntry], queries: Sequence[Query], moves: list[Move],
               chunk: int = CHUNK) -> None:
        """Master weights: master <- the candidate, compute copy <- cast(master)."""
        for i, e in enumerate(entries):
            v, master = e.view, e.state["master"]
            dirs = [q[0][i] for q in queries]
            for lo, hi in spans(v.local.numel(), chunk):
                new = self._point(master, lo, hi, dirs, moves[e.group_index])
                master[lo:hi].copy_(new)
                v.local[lo:hi].copy_(new)
            written(v)

    def run(self, opt: ZOOptimizer, closure: Any, step: int, plan: Plan) -> float:
        entries = plan.queries[0][1] if plan.queries else []
        masters = opt.param_groups[0]["master_weights"]
        anchors = ([e.state["master"] for e in entries] if masters
                   else opt.timed("perturb", lambda: [e.view.local.detach().clone() for e in entries]))
        restore = lambda: opt.timed("perturb", self.write, entries, anchors, None, None)  # noqa: E731
        l0, queries, pairs = self._estimates(opt, closure, step, plan, restore)
        lrs = opt.applied_lrs(1, 0)
        moves = {s: _moves(opt, queries, lrs, s) for s in (-1.0, 1.0)}
        cand = []
        for s in (-1.0, 1.0):
            opt.timed("update", self.write, entries, anchors, queries, moves[s], opt.chunk_size)
            cand.append(opt.call(closure))
        device = entries[0].view.local.device if entries else torch.device("cpu")
        if opt.param_groups[0]["one_sided"]:
            loss0 = pairs[0][1]  # L(theta), already averaged over ranks
            l_desc, l_asc = opt.timed("communication", opt.mean_over_ranks, cand, device)
        else:
            loss0, l_desc, l_asc = opt.timed("communication", opt.mean_over_ranks, [l0, *cand], device)
        if not math.isfinite(loss0):
            restore()
            opt._zo["nonfinite"] += 1
            raise NonFiniteLossError(step, 0, (loss0, l_desc, l_asc))
        choice = conservative_choice(loss0, l_desc, l_asc)
        if choice == "keep":
            restore()
        elif masters:
            opt.timed("update", self.commit, entries, queries, moves[-1.0 if choice == "descent" else 1.0],
                      opt.chunk_size)
        elif choice == "descent":  # c+ was written last; c- again, from the same anchor
            opt.timed("update", self.write, entries, anchors, queries, moves[-1.0], opt.chunk_size)
        for k, ((_, grads), losses) in enumerate(zip(queries, pairs)):
            opt.log_query(step, k, grads, lrs, losses).update(choice=choice, cons_losses=[loss0, l_desc, l_asc])
        return loss0

    def _estimates(self, opt: ZOOptimizer, closure: Any, step: int, plan: Plan,
                   restore: Any) -> tuple[Any, list[Query], list[tuple[float, ...]]]:
        """``L(theta)`` (two-sided: its own forward; one-sided: None), then every query at theta."""
        l0 = None if opt.param_groups[0]["one_sided"] else opt.call(closure)
        queries: list[Query] = []
        pairs = []
        for k, entries in plan.queries:
            dirs = opt.directions(entries, step, k)
            try:
                grads, losses, _ = opt.estimate(closure, dirs, step, k)
            except NonFiniteLossError:
                restore()  # bitwise, whatever the estimate's own restore left
                raise
            queries.append((dirs, grads))
            pairs.append(losses)
            if k < len(plan.queries) - 1:
                restore()
        return l0, queries, pairs


@register("zo_sgd_cons")
class ZOSGDCons(ZOOptimizer):
    r"""Conservative ZO-SGD: move only if a candidate lowers the loss on the step's batch.

    .. code-block:: text

        L0 = L(theta)                                  (an explicit forward: compared honestly)
        g  = SPSA estimate (2 forwards; q > 1: g_k for q queries, each at theta)
        d  = sum_k (g_k / q) z_k
        c- = (1 - lr wd) theta - lr d                  ZO-SGD's step   ("descent")
        c+ = (1 - lr wd) theta + lr d                  the opposite    ("ascent")
        theta <- argmin over {theta: L0, c-: L(c-), c+: L(c+)}   (ties keep theta, then c-)

    Because the estimate ``g`` is noisy, ``c+`` is sometimes the better point; keeping theta
    when neither candidate helps makes the loss on the step's batch non-increasing -- exactly,
    not up to rounding: the loss compared is the loss at the very bits the step leaves.

    Exactness. Moving theta -> candidate -> back by noise passes is not bitwise reversible in
    floating point, so every point of the step is written from an *anchor* holding theta
    exactly: ``cast(anchor * (1 - lr wd) + sum_k b_k z_k)``, the same eager chunked ops each
    time (so re-writing a candidate gives the same bits). The anchor is the fp32 master with
    ``master_weights=True`` (accepting a candidate then updates the master with those ops and
    writes the compute copy from it); without master weights it is a copy of the rank's local
    shards taken at the start of the step and freed at its end (transient: one shard in the
    compute dtype -- the price of the guarantee; use master weights to make it persistent
    instead). Either way the +-eps passes leave no drift.

    Cost per step (q = 1, two-sided): 5 forwards -- ``L(theta)``, ``L(theta +- eps z)``,
    ``L(c-)``, ``L(c+)`` -- (one-sided: 4, the estimate's ``L(theta)`` is reused), 2
    all-reduces (the SPSA pair; then ``[L0, L(c-), L(c+)]`` in one call), and 4-5 passes over
    the shards (2 perturbations, 2 candidates, then re-writing ``c-`` or theta unless ``c+``
    was kept, or one master update).

    Choices the paper leaves open, and departures:
        * Weight decay is part of both candidate moves (torch SGD with ``weight_decay`` fed
          ``+-g z``, as ZO-Bench's optimizer does); keeping theta applies none. The comparison
          is on the closure's loss (without the L2 term).
        * A candidate whose (rank-averaged) loss is NaN/inf is never chosen; a non-finite
          ``L(theta)`` or SPSA loss raises :class:`~zoscale.optim.NonFiniteLossError` with the
          parameters restored bitwise.
        * ``q > 1``: all queries at theta, one candidate pair along their average.
        * The losses are means over the data-parallel group, so the guarantee is for the
          global batch.
        * :meth:`step` returns ``L(theta)`` (the exact loss before the step). Each step-log
          record also has ``"choice"`` (``"keep"``, ``"descent"``, ``"ascent"``) and
          ``"cons_losses"`` ``[L0, L(c-), L(c+)]``; :meth:`replay` re-runs the step from them.

    Args:
        params: ``model.named_parameters()`` (recommended), parameters, or param groups.
        lr: learning rate: the candidates are ``-+ lr g z`` from theta (MeZO-scale).
        eps, weight_decay, q, one_sided, noise, seed, master_weights, shards: as
            :class:`~zoscale.optim.MeZO`.
    """

    schedule = Conservative()

    def _check_record(self, record: dict[str, Any]) -> None:
        if record.get("choice") not in ("keep", "descent", "ascent"):
            raise ValueError(f"log record for step {record['step']} has no conservative choice: "
                             "it was not written by ZOSGDCons")
