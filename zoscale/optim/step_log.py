"""The step log: one record per query, the whole trajectory of a run in a few numbers.

Every optimizer writes the same schema::

    {"seed": int, "step": int, "query": int,
     "grad": [g per param group],     the projected gradient (ForwardGrad: the exact JVP)
     "lr":   [lr per param group],    the lr the update rule was applied with (the SGD family:
                                      lr / q per query; the stateful rules: the group's lr, on
                                      the mean of the step's queries)
     "loss": [l+, l-]}                (one-sided: [l+, L(theta)]; ForwardGrad: [L(theta)])

plus an optimizer's own fields (ZO-SGD-Cons: ``choice``, ``cons_losses``; the hybrid:
``fo_loss``). With the base weights, the options and this log, a replay regenerates every
direction and repeats every update (``ZOOptimizer.replay``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["group_steps"]


def _check_shape(rec: dict[str, Any], groups: int) -> None:
    if len(rec["grad"]) != groups or len(rec["lr"]) != groups:
        raise ValueError(f"log record for step {rec['step']} has {len(rec['grad'])} groups, "
                         f"this optimizer has {groups}")


def group_steps(log: Sequence[dict[str, Any]], groups: int, first_step: int, owner: str,
                check: Callable[[dict[str, Any]], None]) -> list[list[dict[str, Any]]]:
    """Split a log into whole, consecutive steps continuing from ``first_step``, all checked.

    Raises:
        ValueError: a record with another number of groups or one ``check`` refuses; a step
            whose queries are not 0, 1, ...; a first step other than ``first_step``; a gap.
    """
    steps: list[list[dict[str, Any]]] = []
    for rec in log:
        _check_shape(rec, groups)
        check(rec)
        if steps and steps[-1][0]["step"] == rec["step"]:
            steps[-1].append(rec)
        else:
            steps.append([rec])
    why = (f"a replay continues this {owner}'s run, step by step from its step count (a fresh optimizer "
           "starts at step 0; or load the state_dict saved at the log's first step)")
    for recs in steps:
        if [r["query"] for r in recs] != list(range(len(recs))):
            raise ValueError(f"log records of step {recs[0]['step']} have queries {[r['query'] for r in recs]}, "
                             "expected 0, 1, ...: pass whole steps, in order")
    if steps and steps[0][0]["step"] != first_step:
        raise ValueError(f"cannot replay step {steps[0][0]['step']} onto an optimizer at step {first_step}: {why}")
    for prev, recs in zip(steps, steps[1:]):
        if recs[0]["step"] != prev[0]["step"] + 1:
            raise ValueError(f"cannot replay: the log jumps from step {prev[0]['step']} to step "
                             f"{recs[0]['step']}: {why}")
    return steps
