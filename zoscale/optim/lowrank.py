"""LOZO's low-rank direction ``U V^T`` of a matrix, on the rows a rank's shard touches.

Each 2-D weight ``W`` (``m x n``) is perturbed along a rank-``r`` matrix ``U V^T`` instead of a
full ``z``. Sharded, a rank holding the flat range ``[a, b)`` of the row-major ``W`` needs the rows
``a // n .. (b - 1) // n`` of ``U`` and all of ``V``: it builds the perturbation block of those rows
a few rows at a time and slices it to ``[a, b)``, so a pass allocates ``O(rows * r + n * r)`` for
the factors plus ``O(max(ROW_CHUNK, n))`` for the block, never the ``m x n`` matrix. ``U`` and
``V`` come from :func:`zoscale.noise.generate` with keys derived from ``(seed, step, query, id)``
like every other noise in zoscale, so they are the same on every rank and under every sharding.
Tensors that are not 2-D take the dense ``z`` (:class:`~zoscale.optim.directions.Dense`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch

from zoscale import noise
from zoscale.optim.directions import Dense, Passes, ShardEntry, written

if TYPE_CHECKING:
    from zoscale.optim.base import ZOOptimizer

__all__ = ["LowRankDirection", "LowRank", "lowrank_axpb_", "outer_sum", "row_range", "factor_u", "factor_v",
           "U_SUFFIX", "V_SUFFIX", "ROW_CHUNK"]

#: Appended to a tensor's stable id to key its ``U`` (per step and query) ...
U_SUFFIX = "/lozo.U"
#: ... and its ``V`` (per lazy-sampling window ``step // nu``; query index 0).
V_SUFFIX = "/lozo.V"
#: Elements of the perturbation block built at a time (whole rows; at least one row).
ROW_CHUNK = 1 << 16


def row_range(offset: int, length: int, cols: int) -> tuple[int, int]:
    """Rows ``[first, last)`` of a row-major ``? x cols`` matrix that flat ``[offset, offset + length)`` touches."""
    return offset // cols, (offset + length - 1) // cols + 1


def outer_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
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
        block = outer_sum(A[c0 - row0:c1 - row0], V).view(-1)
        lo, hi = max(start, c0 * cols), min(end, c1 * cols)
        piece = block[lo - c0 * cols:hi - c0 * cols]
        s = src[lo - start:hi - start]
        piece += s.to(acc) * a if a != 1.0 else s
        dst[lo - start:hi - start].copy_(piece)
    return dst




def factor_v(stable_id: str, seed: int, window: int, cols: int, rank: int, kind: str,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``cols x r`` factor ``V`` of a matrix for a lazy-sampling window (fp32)."""
    key = noise.noise_key(seed, window, 0, stable_id + V_SUFFIX)
    return noise.generate(0, cols * rank, key, kind, device=device).view(cols, rank)


def factor_u(stable_id: str, seed: int, step: int, query: int, rows: tuple[int, int], rank: int, kind: str,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows ``[rows[0], rows[1])`` of the ``m x r`` factor ``U`` of a matrix (fp32)."""
    key = noise.noise_key(seed, step, query, stable_id + U_SUFFIX)
    return noise.generate(rows[0] * rank, (rows[1] - rows[0]) * rank, key, kind, device=device).view(-1, rank)


class LowRankDirection(Passes):
    """The direction ``U V^T`` of one matrix, restricted to the rows a rank's shard touches.

    Its passes are those of every direction (``zoscale.optim.directions``); ``update_`` moves
    along ``U V^T / r`` (the estimator's ``1/r``, see :class:`~zoscale.optim.lozo.LOZO`). No
    two-stream kernel for ``U V^T``: a held two-pass update takes a pass of its own.

    Attributes:
        U: ``(rows, r)`` fp32: rows ``row0 .. row0 + rows - 1`` of the ``m x r`` factor.
        V: ``(n, r)`` fp32: the whole ``n x r`` factor.
        row0: the global row of ``U[0]``.
    """

    def __init__(self, entry: ShardEntry, U: torch.Tensor, V: torch.Tensor, row0: int, masters: bool) -> None:
        self.entry, self.U, self.V, self.row0, self.masters = entry, U, V, row0, masters

    def _axpb(self, dst: torch.Tensor, src: torch.Tensor, a: float, b: float, A: torch.Tensor | None = None) -> None:
        lowrank_axpb_(dst, src, self.entry.view.offset, self.U if A is None else A, self.V, self.row0, a=a, b=b)

    def perturb_(self, scale: float, delta: float) -> None:
        v = self.entry.view
        if self.masters:
            self._axpb(v.local, self.entry.state["master"], 1.0, delta)
        else:
            self._axpb(v.local, v.local, 1.0, scale)
        written(v)

    def update_(self, decay: float, coef: float, offset: float) -> None:
        v, r = self.entry.view, self.U.shape[1]
        if self.masters:
            master = self.entry.state["master"]
            self._axpb(master, master, decay, coef / r)
            v.local.copy_(master)
        else:
            # theta = x - off * P  =>  decay*theta + (c/r) P = decay*x + (c/r - decay*off) P
            self._axpb(v.local, v.local, decay, coef / r - decay * offset)
        written(v)


Direction = Union[Dense, LowRankDirection]


class LowRank:
    """LOZO's directions: ``U V^T`` for every 2-D tensor (its global shape), ``z`` for the others.

    ``U``: per step and query; ``V``: per lazy-sampling window ``step // nu`` (options ``rank``,
    ``nu``, ``noise``, ``seed`` of the optimizer).
    """

    @staticmethod
    def for_query(opt: "ZOOptimizer", entries: Sequence[ShardEntry], step: int, query: int,
                  seed: int | None = None) -> list[Direction]:
        g = opt.param_groups[0]
        seed = g["seed"] if seed is None else seed
        return [LowRank.direction(e, g, seed, step, query) for e in entries]

    @staticmethod
    def direction(e: ShardEntry, g: dict, seed: int, step: int, query: int) -> Direction:
        v = e.view
        if len(v.global_shape) != 2:
            return Dense(e, noise.noise_key(seed, step, query, e.stable_id), g["noise"], g["master_weights"])
        cols, rank, kind, device = v.global_shape[1], g["rank"], g["noise"], v.local.device
        rows = row_range(v.offset, v.local.numel(), cols)
        U = factor_u(e.stable_id, seed, step, query, rows, rank, kind, device)
        V = factor_v(e.stable_id, seed, step // g["nu"], cols, rank, kind, device)
        return LowRankDirection(e, U, V, rows[0], g["master_weights"])
