"""The two-pass step: a query's update deferred into the next query's first perturbation.

A two-sided query of the SGD family costs three regeneration passes: ``+eps z_k``, ``-2 eps z_k``
and the fused restore + update. With ``two_pass=True`` the update is not applied at once; it is
held here and applied by the next pass over the same tensor, which is the next query's ``+eps``
perturbation (the next step's, for the last query of a step):

    theta <- decay (x - off z_k) + coef z_k + eps z_{k+1}      one pass, two noise streams

so a step costs two passes per query. Where the next query moves other tensors (LeZO's draw,
block-wise ZO's blocks), or with directions that have no two-stream kernel (Sparse MeZO's mask,
LOZO's factors), the held update is applied in a pass of its own first: the same result, no saving.

A held update leaves the weights at ``theta - eps z`` between steps, so it is applied before
anything reads them: :meth:`~zoscale.optim.base.ZOOptimizer.flush`, which ``state_dict``,
``shard_entries`` (checkpoints), ``replay`` and the trainer's evaluation and saving call; a
one-sided query (its first forward is at theta) and the hybrid's backward pass flush first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["PendingUpdates"]


@dataclass
class _Update:
    direction: Any
    decay: float
    coef: float
    offset: float

    def apply(self) -> None:
        self.direction.update_(self.decay, self.coef, self.offset)


class PendingUpdates:
    """The held updates of the last query: at most one per tensor."""

    def __init__(self) -> None:
        self._held: dict[int, _Update] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, dirs: Sequence[Any], pairs: Sequence[tuple[float, float]], offset: Sequence[float]) -> None:
        """Hold ``d.update_(decay, coef, offset)`` of every direction (``pairs``, ``offset`` per group)."""
        if self._held:
            raise RuntimeError("a deferred update is already held: apply it before holding another")
        for d in dirs:
            gi = d.entry.group_index
            self._held[id(d.entry.param)] = _Update(d, pairs[gi][0], pairs[gi][1], offset[gi])

    def flush(self) -> None:
        """Apply every held update (one pass per tensor)."""
        held, self._held = self._held, {}
        for update in held.values():
            update.apply()

    def perturb(self, dirs: Sequence[Any], scale: Sequence[float], delta: Sequence[float]) -> None:
        """The first perturbation of a query, with the held updates fused in where possible."""
        held, self._held = self._held, {}
        for d in dirs:
            gi = d.entry.group_index
            update = held.pop(id(d.entry.param), None)
            if update is not None and d.fuses_with(update.direction):
                d.update_perturb_(update.direction, update.decay, update.coef, update.offset, scale[gi], delta[gi])
                continue
            if update is not None:
                update.apply()
            d.perturb_(scale[gi], delta[gi])
        for update in held.values():  # tensors this query does not move
            update.apply()
