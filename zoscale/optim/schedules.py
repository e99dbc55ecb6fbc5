"""Schedules: in what order a step runs its queries' estimates and updates.

    EachQuery  apply each query's update as soon as its forwards are done (MeZO's n-SPSA:
               later queries are evaluated at the partly updated point; no extra pass)
    Averaged   every query at theta (restoring between them), then one update from all of
               them (what a stateful rule needs to equal torch's optimizer fed a gradient)

"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zoscale.optim.selection import Plan

if TYPE_CHECKING:
    from zoscale.optim.base import ZOOptimizer

__all__ = ["EachQuery", "Averaged", "pair_mean"]


def pair_mean(losses: tuple[float, ...]) -> float:
    """The loss at theta estimated from a query's losses (the mean of an SPSA pair)."""
    return 0.5 * (losses[0] + losses[1]) if len(losses) == 2 else losses[0]


class EachQuery:
    """Estimate, then update, query by query."""

    def run(self, opt: "ZOOptimizer", closure: Any, step: int, plan: Plan) -> float:
        total = 0.0
        for k, entries in plan.queries:
            dirs = opt.directions(entries, step, k)
            grads, losses, offset = opt.estimate(closure, dirs, step, k)
            lrs = opt.applied_lrs(plan.count, k)
            opt.timed("update", opt.update, step, [(dirs, grads)], lrs, plan.count, offset)
            opt.log_query(step, k, grads, lrs, losses)
            total += pair_mean(losses)
        return total / len(plan.queries) if plan.queries else 0.0


class Averaged:
    """Every query at theta, then one update; the records are logged after the update."""

    def run(self, opt: "ZOOptimizer", closure: Any, step: int, plan: Plan) -> float:
        queries, records = [], []
        offset = None
        for k, entries in plan.queries:
            if queries and offset is not None:  # every query is taken at theta: restore the previous one
                opt.timed("perturb", opt.restore, queries[-1][0], offset)
            dirs = opt.directions(entries, step, k)
            grads, losses, offset = opt.estimate(closure, dirs, step, k)
            queries.append((dirs, grads))
            records.append((k, grads, losses))
        zeros = [0.0] * len(opt.param_groups)
        lrs = opt.applied_lrs(plan.count, records[-1][0]) if records else []
        opt.timed("update", opt.rule.apply, opt, step, queries, lrs, plan.count, zeros if offset is None else offset)
        for k, grads, losses in records:
            opt.log_query(step, k, grads, opt.applied_lrs(plan.count, k), losses)
        return sum(pair_mean(losses) for _, _, losses in records) / len(records) if records else 0.0
