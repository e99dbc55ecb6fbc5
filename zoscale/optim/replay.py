"""Replay: a run's steps re-run from its step log, with the forwards replaced by the log.

A step's forwards matter to the weights only through the losses they return, all-reduced over
the ranks, and the step log holds those (``loss`` per query; ZO-SGD-Cons's ``cons_losses``). So
a replay runs the step itself, passes, rule, state and all, with every loss all-reduce answered
from the log (and every query applied with its logged lr: a scheduler's lr is in the log): the same arithmetic as the
run, bit for bit, with or without master weights, and on any layout (the noise and every pass are
elementwise in the global index). Each replayed record must equal the logged one (projected
gradient, lr, choice), which catches a replay under other options (``eps``, ``lr``, ``noise``...).

Two optimizers cannot run their step without real forwards: Forward-Grad (its loss carries a
tangent) and the hybrid (a backward pass). Their replay applies the logged updates only
(:func:`replay_updates`): exact for Forward-Grad, which perturbs nothing; the hybrid's FO part is
not in the log at all.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from zoscale.optim.base import ZOOptimizer

__all__ = ["LoggedStep", "replay_step", "replay_updates"]

#: Record fields a replayed record must reproduce exactly.
_CHECKED = ("step", "query", "seed", "grad", "lr", "loss", "choice", "cons_losses")


class LoggedStep:
    """One logged step as its replay asks for it: the answers of its loss all-reduces, in order,
    and the lr each query was applied with."""

    def __init__(self, records: Sequence[dict[str, Any]], one_sided: bool) -> None:
        self._lrs = {r["query"]: list(r["lr"]) for r in records}
        self._queue: deque[list[float]] = deque(list(r["loss"]) for r in records)
        cons = records[0].get("cons_losses") if records else None
        if cons is not None:  # ZO-SGD-Cons: [L0, L(c-), L(c+)] (one-sided: L0 is the estimate's)
            self._queue.append(list(cons[1:] if one_sided else cons))

    def lrs(self, query: int) -> list[float]:
        return self._lrs[query]

    def take(self, n: int) -> list[float]:
        if not self._queue or len(self._queue[0]) != n:
            raise ValueError(f"the step asked for {n} losses where the log has "
                             f"{len(self._queue[0]) if self._queue else 'none'}: the log was written by another "
                             "optimizer or with other options (one_sided, q)")
        return self._queue.popleft()


def _mismatch(logged: dict[str, Any], replayed: dict[str, Any]) -> str | None:
    for key in _CHECKED:
        if logged.get(key) != replayed.get(key):
            return f"{key} {logged.get(key)!r} logged, {replayed.get(key)!r} replayed"
    return None


def replay_step(opt: "ZOOptimizer", records: list[dict[str, Any]]) -> None:
    """Re-run one logged step on ``opt`` (at that step), its losses answered from ``records``."""
    opt._logged = LoggedStep(records, opt.param_groups[0].get("one_sided", False))
    first = len(opt._zo["log"])
    try:
        opt.step(lambda: 0.0)
    finally:
        opt._logged = None
    replayed = opt._zo["log"][first:]
    for want, got in zip(records, replayed):
        why = _mismatch(want, got)
        if why:
            raise ValueError(f"replay of step {want['step']}, query {want['query']}: {why}. The optimizer's "
                             "options (lr, eps, weight_decay, noise, seed, q, ...) or param groups differ from "
                             "the run that wrote the log; build it as the run did")
    opt._zo["log"][first:] = copy.deepcopy(records)


def replay_updates(opt: "ZOOptimizer", steps: list[list[dict[str, Any]]]) -> None:
    """Apply each logged query's update alone, with its logged lr (no perturbation pass)."""
    entries = opt._entries()
    opt._ensure_masters(entries)
    zeros = [0.0] * len(opt.param_groups)
    for records in steps:
        for rec in records:
            chosen = opt.policy.entries_for(entries, rec["step"], rec["query"], opt.param_groups[0])
            dirs = opt.directions(chosen, rec["step"], rec["query"], seed=rec["seed"])
            opt.rule.apply(opt, rec["step"], [(dirs, rec["grad"])], rec["lr"], 1, zeros)
        opt._zo["step"] = records[0]["step"] + 1
        opt._zo["log"].extend(copy.deepcopy(records))
