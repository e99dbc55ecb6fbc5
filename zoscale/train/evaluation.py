"""Held-out evaluation on any engine: each rank scores its slice, every rank runs the same forwards.

Sharded engines (ZeRO-3, FSDP2) all-gather parameters inside every forward, so a rank that ran
fewer forwards would leave the others waiting. Rank ``r`` scores examples ``r, r + W, ...``; every
rank runs as many batches as the longest slice (short ones padded with repeats that are not
counted), and generation agrees after every token whether all ranks are done
(:func:`zoscale.data.tasks.greedy_decode`). The per-example scores are summed with one all-reduce.
One process and replicas run the same code with a world of one or of replicas.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from zoscale.data.tasks import Encoder, Example, Task

__all__ = ["evaluate", "rank_sync"]


def rank_sync(engine: Any) -> Any:
    """``sync(done) -> all ranks done``, one all-reduce per call; None for a world of one."""
    if engine.world_size == 1:
        return None

    def sync(done: bool) -> bool:
        pending = engine.all_reduce_sum(torch.tensor([0.0 if done else 1.0], dtype=torch.float64))
        return float(pending[0]) == 0.0

    return sync


def _gather(items: list[Any], world: int) -> list[Any]:
    if world == 1:
        return items
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@torch.no_grad()
def evaluate(engine: Any, task: Task, examples: list[Example], encoder: Encoder, batch_size: int,
             predictions: bool = False) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    """Mean of each of the family's metrics over ``examples``, plus ``truncated`` (prompts cut).

    Args:
        engine: The engine (``module``, ``rank``, ``world_size``, ``all_reduce_sum``).
        task: The task.
        examples: The evaluation set (the same list on every rank).
        encoder: Tokenisation for the model.
        batch_size: Examples per forward batch, per rank.
        predictions: Also return every example's prediction (all ranks' slices, on every rank).

    Returns:
        ``(metrics, predictions or None)``.
    """
    if not examples:
        raise ValueError("Cannot evaluate on zero examples")
    family, rank, world = task.family, engine.rank, engine.world_size
    mine = examples[rank::world]
    n_batches = -(-len(examples[0::world]) // batch_size)  # rank 0 has the longest slice
    sync = rank_sync(engine)
    totals = torch.zeros(len(family.metrics) + 2, dtype=torch.float64)  # metrics, truncated, count
    rows: list[dict[str, Any]] = []
    repeat_cut = float(family.eval_batch(examples[:1], encoder)["truncated"])  # of each padding repeat
    for b in range(n_batches):
        part = mine[b * batch_size:(b + 1) * batch_size]
        padded = part + [examples[0]] * (batch_size - len(part))
        batch = family.eval_batch(padded, encoder)
        predicted = family.predict(engine.module, batch, encoder, sync)[:len(part)]
        for prediction, example in zip(predicted, part):
            scores = family.score(prediction, example)
            totals[:-2] += torch.tensor([scores[m] for m in family.metrics], dtype=torch.float64)
            if predictions:
                rows.append({"where": example.where, "prediction": prediction, **scores})
        # The padded repeats' truncations are not counted.
        totals[-2] += float(batch["truncated"]) - (batch_size - len(part)) * repeat_cut
        totals[-1] += len(part)
    totals = engine.all_reduce_sum(totals)
    metrics = {m: float(totals[i] / totals[-1]) for i, m in enumerate(family.metrics)}
    metrics["truncated"] = int(totals[-2])
    return metrics, (_gather(rows, world) if predictions else None)

