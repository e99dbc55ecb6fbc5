"""How an update rule (``zoscale.optim.rules``) is applied to a step's queries.

A *query* is the list of its directions (one per entry it moved) and its projected gradient per
param group. The compute copy sits at ``theta + offset d`` along the last query's direction when
the update starts (``offset`` per group; zeros at theta); every applier restores and updates in
the same pass.

    FusedRule     the SGD family: each query's ``(decay, coef)`` through the directions' own
                  fused pass; a query is applied with ``lr / count``
    ChunkedRule   stateful rules (momentum, Adam): the mean gradient ``sum_k (g_k / count) z_k``
                  rebuilt chunk by chunk from dense directions, torch's ops on the chunk and its
                  state; transient memory O(chunk)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from zoscale.optim.directions import ShardEntry, written

if TYPE_CHECKING:
    from zoscale.optim.base import ZOOptimizer

__all__ = ["Query", "FusedRule", "ChunkedRule", "CHUNK", "spans"]

#: Elements per chunk of the eager (generate + torch ops) passes: 1 MiB of fp32 per transient.
CHUNK = 1 << 18

Query = tuple[Sequence[Any], Sequence[float]]  # (directions, g per group)


def spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, chunk):
        yield lo, min(n, lo + chunk)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class FusedRule:
    """A rule of the SGD family, ``(lr, g, group) -> (decay, coef)`` per group.

    Queries are applied in order, each with the lr it is given (the schedule's ``lr / count``:
    :meth:`logged_lr`); the restore from ``offset`` is fused into the last one.
    """

    def __init__(self, scalars: Callable[[float, float, dict[str, Any]], tuple[float, float]]) -> None:
        self.scalars = scalars

    def logged_lr(self, lr: float, count: int) -> float:
        """The lr a query is applied (and logged) with: ``lr / count``."""
        return lr * (1.0 / count)

    def pairs(self, opt: "ZOOptimizer", grads: Sequence[float], lrs: Sequence[float]) -> list[tuple[float, float]]:
        """``(decay, coef)`` per group of one query applied with ``lrs``."""
        return [self.scalars(lr, gk, group) for lr, group, gk in zip(lrs, opt.param_groups, grads)]

    def apply(self, opt: "ZOOptimizer", step: int, queries: Sequence[Query], lrs: Sequence[float], count: int,
              offset: Sequence[float]) -> None:
        zeros = [0.0] * len(opt.param_groups)
        for j, (dirs, grads) in enumerate(queries):
            pairs = self.pairs(opt, grads, lrs)
            off = offset if j == len(queries) - 1 else zeros
            for d in dirs:
                gi = d.entry.group_index
                d.update_(pairs[gi][0], pairs[gi][1], off[gi])


class ChunkedRule:
    """A stateful rule on dense directions: subclasses give ``begin`` (per tensor) and ``chunk``.

    ``begin(entry, group, lr) -> ctx`` creates or advances the tensor's state; ``chunk(entry,
    group, ctx, lr, param, grad, lo, hi)`` updates ``param`` (fp32 chunk of theta) in place from
    ``grad`` and the state's ``[lo, hi)``, ``opt.chunk_size`` elements at a time. The step log records
    the group's lr.
    """

    def logged_lr(self, lr: float, count: int) -> float:
        """The lr the rule is applied (and logged) with: the group's."""
        return lr

    def begin(self, e: ShardEntry, group: dict[str, Any], lr: float) -> Any:
        raise NotImplementedError

    def chunk(self, e: ShardEntry, group: dict[str, Any], ctx: Any, lr: float, param: torch.Tensor,
              grad: torch.Tensor, lo: int, hi: int) -> None:
        raise NotImplementedError

    def apply(self, opt: "ZOOptimizer", step: int, queries: Sequence[Query], lrs: Sequence[float], count: int,
              offset: Sequence[float]) -> None:
        masters = opt.param_groups[0]["master_weights"]
        for i, d in enumerate(queries[-1][0]):
            e = d.entry
            dirs = [q[0][i] for q in queries]
            coefs = [grads[e.group_index] / count for _, grads in queries]
            self._apply_one(e, opt.param_groups[e.group_index], dirs, coefs, lrs[e.group_index],
                            -offset[e.group_index], masters, opt.chunk_size)

    def _apply_one(self, e: ShardEntry, group: dict[str, Any], dirs: list[Any], coefs: list[float], lr: float,
                   back: float, masters: bool, chunk: int) -> None:
        v = e.view
        acc = acc_dtype(v.local.dtype)
        ctx = self.begin(e, group, lr)
        for lo, hi in spans(v.local.numel(), chunk):
            zs = [d.values(lo, hi).to(acc) for d in dirs]
            if masters:
                param = e.state["master"][lo:hi]
            else:
                param = v.local[lo:hi].to(acc)
                if back != 0.0:  # theta = x - offset z (within the +-eps round-trip drift)
                    param = param + zs[-1] * back
            grad = zs[0] * coefs[0]
            for z, c in zip(zs[1:], coefs[1:]):
                grad.add_(z * c)
            self.chunk(e, group, ctx, lr, param, grad, lo, hi)
            v.local[lo:hi].copy_(param)
        written(v)
