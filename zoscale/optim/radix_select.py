"""Exact order statistics of tensors whose elements are spread over ranks (radix select).

Sparse MeZO fixes each tensor's threshold as the k-th smallest magnitude over the whole,
unsharded tensor; :class:`RadixSelect` finds it with a few small all-reduces.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import torch

__all__ = ["RadixSelect", "tuned_count"]

# Elements per chunk of the threshold's histogram passes: bounds their transient memory (about
# 14 bytes per element of a chunk: |x| as fp32, the prefix test, the selected bits, the digits).
_SELECT_CHUNK = 1 << 18


def tuned_count(numel: int, sparsity: float) -> int:
    """``k = ceil((1 - s) * numel)``: how many smallest-magnitude entries a tensor tunes.

    ``s`` is read as the decimal it prints as (``0.8`` is 4/5, not the binary float just above
    it), so ``k`` is what the user expects: ``tuned_count(10, 0.8) == 2``. ``1 <= k <= numel``
    for ``0 <= s < 1`` and ``numel >= 1``.
    """
    return math.ceil((1 - Fraction(repr(float(sparsity)))) * numel)


def _float_of_bits(bits: int, width: int) -> float:
    if width == 32:
        return struct.unpack("<f", struct.pack("<i", bits))[0]
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class RadixSelect:
    """Exact k-th smallest ``|x|`` of many tensors whose elements are spread over ranks.

    Non-negative IEEE floats order like their bit patterns read as integers, so the k-th
    smallest magnitude is found one byte of its bit pattern at a time, most significant first
    (radix select): in round ``r`` every rank counts, per tensor, its elements whose leading
    ``8r`` bits equal the prefix found so far, in 256 bins of the next byte; the counts of all
    tensors are summed over the ranks in ONE all-reduce; the bin where the running count reaches
    ``k`` extends the prefix. fp32 (and bf16/fp16, compared as fp32) takes 4 rounds, fp64 8.
    Memory: the local shards, read in chunks, plus ``tensors x 257`` counts. Communication: 4
    (8 with fp64) all-reduces of ``tensors x 257`` int64 for ALL tensors together.

    Replicas: a rank may hold a tensor whole (a replica) or a shard, and replica groups (HSDP,
    DDP, ZeRO-3 persistent parameters) hold the same elements several times. Every element of a
    tensor is assumed to be held by the same number ``c`` of ranks of the group (true for every
    provider: each shard of an FSDP/HSDP/ZeRO layout is held once per replica group). The last
    column counts the elements held, so the summed total is ``c * numel``; comparing the summed
    counts with ``c * k`` (i.e. working in fractions of the total) is exact whatever ``c`` is.

    Usage (collective: every rank calls it with the same tensors in the same order)::

        sel = RadixSelect(numels, ks, widths)
        for r in range(sel.rounds):
            counts = sel.count(locals_, r)      # this rank's counts
            all_reduce_sum(counts)
            sel.advance(counts, r)
        sel.values()                            # the k-th smallest |x| of each tensor

    Args:
        numels: elements of each (unsharded) tensor.
        ks: the order statistic wanted per tensor, ``1 <= k <= numel`` (1 = the smallest).
        widths: 32 (fp32, bf16, fp16: compared in fp32) or 64 (fp64) per tensor.
    """

    def __init__(self, numels: list[int], ks: list[int], widths: list[int]) -> None:
        # Checks of the caller's arguments (ValueError). SparseMeZO.ensure_thresholds always passes
        # valid ones: it selects only tensors with 1 <= k < numel (k = N gets h = +inf instead).
        if not len(numels) == len(ks) == len(widths):
            raise ValueError(f"RadixSelect takes one numel, k and width per tensor, got {len(numels)} numels, "
                             f"{len(ks)} ks and {len(widths)} widths")
        for t, (n, k, w) in enumerate(zip(numels, ks, widths)):
            if not (1 <= k <= n and w in (32, 64)):
                raise ValueError(f"RadixSelect: tensor {t} has numel {n}, k {k}, width {w}; the order statistic "
                                 "needs 1 <= k <= numel and a width of 32 or 64 bits")
        self.numels, self.ks, self.widths = list(numels), list(ks), list(widths)
        self.prefix = [0] * len(numels)
        self.below = [0] * len(numels)  # summed count of held elements with a smaller prefix
        self.copies = [0] * len(numels)
        self.rounds = max(widths, default=32) // 8

    @staticmethod
    def bits(x: torch.Tensor, width: int) -> torch.Tensor:
        """The bit patterns of ``|x|`` as fp32 (int32) or fp64 (int64): non-negative integers."""
        if width == 32:
            return x.abs().to(torch.float32).view(torch.int32)
        return x.abs().to(torch.float64).view(torch.int64)

    def count(self, locals_: list[torch.Tensor], r: int) -> torch.Tensor:
        """This rank's ``[tensors, 257]`` counts of round ``r`` (column 256: elements held)."""
        device = locals_[0].device if locals_ else torch.device("cpu")
        out = torch.zeros(len(locals_), 257, dtype=torch.int64, device=device)
        for t, (x, width) in enumerate(zip(locals_, self.widths, strict=True)):
            out[t, 256] = x.numel()
            if r >= width // 8:
                continue
            shift = width - 8 * (r + 1)
            for a in range(0, x.numel(), _SELECT_CHUNK):
                b = self.bits(x[a:a + _SELECT_CHUNK], width)
                if r > 0:
                    b = b[(b >> (shift + 8)) == self.prefix[t]]
                out[t, :256] += torch.bincount((b >> shift) & 255, minlength=256)
        return out

    def advance(self, counts: torch.Tensor, r: int) -> None:
        """Extend every tensor's prefix by one byte from the counts summed over the ranks."""
        rows = counts.tolist()
        for t, row in enumerate(rows):
            if r == 0:
                held, n = row[256], self.numels[t]
                if held == 0 or held % n:
                    raise RuntimeError(
                        f"tensor {t}: the ranks hold {held} elements of a tensor of {n}; every element must "
                        "be held by the same number of ranks of the group (shards once per replica group)"
                    )
                self.copies[t] = held // n
            if r >= self.widths[t] // 8:
                continue
            target = self.ks[t] * self.copies[t]
            running = self.below[t]
            for digit in range(256):
                if running + row[digit] >= target:
                    break
                running += row[digit]
            else:  # unreachable when the counts are consistent
                raise RuntimeError(f"tensor {t}: counts do not reach k = {self.ks[t]} in round {r}")
            self.below[t] = running
            self.prefix[t] = (self.prefix[t] << 8) | digit

    def values(self) -> list[float]:
        """The k-th smallest magnitude of each tensor (after all rounds)."""
        return [_float_of_bits(p, w) for p, w in zip(self.prefix, self.widths)]
