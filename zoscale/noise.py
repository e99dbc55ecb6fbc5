"""Sharding-invariant perturbation noise.

The perturbation of element ``i`` (index into the *unsharded, flattened* tensor) of a trainable
tensor at step ``t``, query ``k`` is a pure function of ``(seed, t, k, stable_id, i)``:

    key   = blake2b(seed, t, k, stable_id)              # 64 bits, computed on the host
    H(j)  = fmix64((j XOR key) * GAMMA)                  # counter-based 64-bit hash
    z_i   = +1/-1 from bit (i mod 64) of H(i div 64)     # "rademacher": 64 signs per hash
    z_i   = Box-Muller(top 24 bits, low 24 bits of H(i)) # "gaussian"

``fmix64`` is the SplitMix64 / Stafford "mix13" finalizer, ``GAMMA`` the golden-ratio odd
constant. Because ``z_i`` depends on ``i`` only, a rank holding the flat range ``[a, b)`` of a
tensor produces exactly the values the whole tensor would have there, however the tensor is cut
(ZeRO-3 flat partitions, FSDP2 row shards, one process). Two tensors (or two steps) use
different 64-bit keys; their element streams ``i XOR key`` could only coincide if the keys agreed
on all bits above ``log2(numel)``, a chance of about ``numel / 2**64``.

Rademacher noise takes 64 signs from one hash: the 64-aligned middle of a shard is processed as
rows of 64 (one hash per row, broadcast over the row), the unaligned head and tail element by
element with the same formula, so any cut of a tensor still yields the same bits (a pass costs
~1.4x the memory floor instead of ~4.5x with a hash per element).

Integer arithmetic is int64 with wrap-around multiplication (the behaviour of every torch
backend: vector intrinsics on CPU, two's-complement multiply in Triton). Logical right shifts
are written as an arithmetic shift plus a mask.

The kernels below fuse noise generation with the in-place parameter edit (``x = a*x + b*z``) so
that a pass reads and writes each parameter once and never materialises ``z``. They are compiled
with ``torch.compile`` (inductor: one vectorised C++ loop on CPU, one Triton kernel on GPU); the
same Python functions run eagerly, in bounded chunks, as the readable reference and as the
fallback where no compiler is available (``ZOSCALE_NOISE_BACKEND=eager``). Nothing here touches
torch's global RNG.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
from typing import Callable, Literal

import torch

__all__ = [
    "NOISE_KINDS",
    "NoiseKind",
    "noise_key",
    "generate",
    "axpbz_",
    "perturb_from_master_",
    "update_master_",
    "backend",
    "mask_words",
    "masked_axpbz_pack_",
    "masked_axpbz_",
    "masked_perturb_from_master_",
    "masked_update_master_",
]

logger = logging.getLogger(__name__)

NoiseKind = Literal["gaussian", "rademacher"]
NOISE_KINDS: tuple[str, ...] = ("gaussian", "rademacher")

# Constants as signed int64 (torch has no uint64 arithmetic on every backend).
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_INV_2_24 = 1.0 / 16777216.0
_TWO_PI = 6.283185307179586

# Eager (reference) chunk: bounds transient memory to ~20 bytes x chunk.
EAGER_CHUNK = 1 << 16
# Compiled chunk: the fused kernel allocates nothing per element; the chunk only bounds
# memory should a backend ever materialise an intermediate.
COMPILED_CHUNK = 1 << 24


def check_kind(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is a known noise kind."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"Invalid noise kind: {kind!r} (expected one of {', '.join(NOISE_KINDS)})")


def noise_key(seed: int, step: int, query: int, stable_id: str) -> int:
    """The 64-bit key of one tensor's noise at one (step, query), as a signed int64.

    Args:
        seed: the run's seed (the same on every rank).
        step: optimizer step counter.
        query: query index within the step (n-SPSA), or a block index.
        stable_id: the tensor's canonical name (see ``zoscale.shards.canonical_name``).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qqq", int(seed), int(step), int(query)))
    h.update(stable_id.encode("utf-8"))
    return struct.unpack("<q", h.digest())[0]


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of an int64 tensor."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _hash(j: torch.Tensor, key: int) -> torch.Tensor:
    """The 64-bit counter-based hash ``H(j)`` of int64 counters ``j``."""
    h = (j ^ key) * _GAMMA
    h = (h ^ _srl(h, 30)) * _MIX1
    h = (h ^ _srl(h, 27)) * _MIX2
    return h ^ _srl(h, 31)


def _z(like: torch.Tensor, start: int, key: int, gaussian: bool) -> torch.Tensor:
    """The fp32 noise for ``like``'s elements, which are global flat indices from ``start`` on.

    ``like`` is 1-D, or for Rademacher noise ``[rows, 64]`` with ``start`` a multiple of 64
    (one hash per row).
    """
    device = like.device
    if like.dim() == 2:
        r = torch.arange(like.shape[0], device=device, dtype=torch.int64) + start // 64
        col = torch.arange(64, device=device, dtype=torch.int64)
        bits = (_hash(r, key)[:, None] >> col[None, :]) & 1
        return bits.to(torch.float32) * -2.0 + 1.0
    i = torch.arange(like.numel(), device=device, dtype=torch.int64) + start
    if gaussian:
        h = _hash(i, key)
        u1 = (_srl(h, 40).to(torch.float32) + 0.5) * _INV_2_24  # (0, 1): log is finite
        u2 = (h & 0xFFFFFF).to(torch.float32) * _INV_2_24
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
    bits = (_hash(i >> 6, key) >> (i & 63)) & 1
    return bits.to(torch.float32) * -2.0 + 1.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _axpbz_kernel(x: torch.Tensor, start: int, key: int, a: float, b: float, gaussian: bool) -> None:
    acc = _acc_dtype(x.dtype)
    z = _z(x, start, key, gaussian).to(acc)
    x.copy_(x.to(acc) * a + z * b)


def _from_master_kernel(
    dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float, gaussian: bool
) -> None:
    z = _z(dst, start, key, gaussian).to(master.dtype)
    dst.copy_(master + z * b)


def _update_master_kernel(
    dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float, gaussian: bool
) -> None:
    z = _z(dst, start, key, gaussian).to(master.dtype)
    new = master * a + z * b
    master.copy_(new)
    dst.copy_(new)


def _generate_kernel(out: torch.Tensor, start: int, key: int, gaussian: bool) -> None:
    out.copy_(_z(out, start, key, gaussian))


_KERNELS: dict[str, Callable[..., None]] = {
    "axpbz": _axpbz_kernel,
    "from_master": _from_master_kernel,
    "update_master": _update_master_kernel,
    "generate": _generate_kernel,
}
_compiled: dict[str, Callable[..., None]] = {}


def backend() -> str:
    """``"compiled"`` (default) or ``"eager"``, from ``ZOSCALE_NOISE_BACKEND``."""
    value = os.environ.get("ZOSCALE_NOISE_BACKEND", "compiled")
    if value not in ("compiled", "eager"):
        raise ValueError(f"Invalid ZOSCALE_NOISE_BACKEND: {value!r} (expected 'compiled' or 'eager')")
    return value


# One graph per (dtype, kind, 0/1-size specialisation) of a kernel: more than dynamo's default 8
# recompiles. These limits hold only while a kernel runs (where dynamo compiles it): torch's
# global dynamo config, which user code may rely on, is left as it was.
_RECOMPILE_LIMITS = {"recompile_limit": 64, "accumulated_recompile_limit": 1024}


def _with_recompile_limits(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` run with dynamo's recompile limits raised to at least :data:`_RECOMPILE_LIMITS`."""
    cfg = torch._dynamo.config
    names = [k for k in _RECOMPILE_LIMITS if hasattr(cfg, k)]

    def call(*args: object) -> None:
        # A hand-written torch._dynamo.config.patch: ~8 us a call instead of ~22.
        saved = [getattr(cfg, k) for k in names]
        for k, old in zip(names, saved):
            setattr(cfg, k, max(old, _RECOMPILE_LIMITS[k]))
        try:
            fn(*args)
        finally:
            for k, old in zip(names, saved):
                setattr(cfg, k, old)

    return call


def _kernel(name: str, force_eager: bool) -> tuple[Callable[..., None], int]:
    if force_eager or backend() == "eager":
        return _KERNELS[name], EAGER_CHUNK
    fn = _compiled.get(name)
    if fn is None:
        # dynamic_threads: always emit an OpenMP region. Otherwise inductor decides serial vs
        # parallel from the first call's size, and a small first tensor (a norm weight) would
        # leave every later pass single-threaded -- and the compile cache would keep it so.
        compiled = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})
        fn = _compiled[name] = _with_recompile_limits(compiled)
    return fn, COMPILED_CHUNK


def _run(name: str, tensors: tuple[torch.Tensor, ...], start: int, key: int, scalars: tuple[float, ...],
         kind: str, eager: bool) -> None:
    check_kind(kind)
    n = tensors[0].numel()
    for t in tensors:
        if t.dim() != 1 or not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"noise kernels take contiguous 1-D tensors of equal length, got {tuple(t.shape)}")
    if n == 0:
        return
    fn, chunk = _kernel(name, eager)
    gaussian = kind == "gaussian"
    for lo, hi, rows in _segments(start, n, kind):
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            parts = (t[a:b].view(-1, 64) if rows else t[a:b] for t in tensors)
            fn(*parts, start + a, key, *scalars, gaussian)


def _segments(start: int, n: int, kind: str) -> list[tuple[int, int, bool]]:
    """``(lo, hi, as_rows)`` pieces of ``[0, n)``: Rademacher's 64-aligned middle as rows of 64."""
    if kind != "rademacher":
        return [(0, n, False)]
    head = min(n, (-start) % 64)
    mid = (n - head) // 64 * 64
    segs = [(0, head, False)] if head else []
    if mid:
        segs.append((head, head + mid, True))
    if head + mid < n:
        segs.append((head + mid, n, False))
    return segs


def generate(start: int, n: int, key: int, kind: str = "gaussian", *, device: torch.device | str = "cpu",
             eager: bool = False) -> torch.Tensor:
    """Return the fp32 noise of global flat indices ``[start, start + n)`` (allocates ``n``)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    _run("generate", (out,), start, key, (), kind, eager)
    return out


def axpbz_(x: torch.Tensor, start: int, key: int, a: float, b: float, kind: str = "gaussian", *,
           eager: bool = False) -> torch.Tensor:
    """In place ``x = a*x + b*z`` with ``z`` the noise of ``[start, start + x.numel())``.

    Computed in at least fp32 and rounded once to ``x.dtype``. ``x`` is a contiguous 1-D view
    (a flat shard).
    """
    _run("axpbz", (x,), start, key, (float(a), float(b)), kind, eager)
    return x


def perturb_from_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float,
                         kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``dst = cast(master + b*z)``: write a perturbed compute copy from an fp32 master shard."""
    _run("from_master", (dst, master), start, key, (float(b),), kind, eager)
    return dst


def update_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                   kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``master = a*master + b*z; dst = cast(master)`` in one pass."""
    _run("update_master", (dst, master), start, key, (float(a), float(b)), kind, eager)
    return dst


# ---------------------------------------------------------------------- masked kernels (Sparse MeZO)
# A per-element mask m restricts a pass to the selected elements: x = m ? a*x + b*z : x, where
# unselected elements keep their value bit for bit. Where m comes from:
#   * from a threshold on an fp32-or-wider master shard, m = |master| <= h (recomputed each
#     pass: the master does not move between the passes of a query);
#   * from a packed bit mask, 1 bit per element, for shards edited in place (no master): the
#     first pass of a query computes m = |x| <= h from the unperturbed x and writes the bits,
#     later passes read them (x is then perturbed and no longer tells m apart).
# Packed layout, by *global* flat index i: blocks of 4096 elements (64 rows of 64); block
# i div 4096 owns 128 int32 words, two halves of 64 (rows 0-31 and 32-63), and bit (r mod 32) of
# word c of half (r div 32) holds element 64 r + c of the block:
#     word  (i div 4096 - start div 4096) * 128 + ((i div 2048) mod 2) * 64 + i mod 64,
#     bit   (i div 64) mod 32.
# A block is packed by adding up rows (m << r), a reduction across rows that vectorises along the
# 64 words, and unpacked by one vector load of its words per row; packing along a row instead
# needs a horizontal reduction per 64 elements (measured 1.7x slower), and int32 words fill the
# same 16 lanes as fp32 values (int64 ones were ~15% slower). The noise is computed on the same
# [blocks, 2, 32, 64] view (z_i depends on i only: the same values as the flat kernels). A shard
# of n elements needs mask_words(start, n) <= n/32 + 256 int32 words (n/8 bytes: 1/32 of an fp32
# shard, plus at most two edge blocks); a partial edge block is processed in a scratch copy.
_MASK_BLOCK = 4096


def mask_words(start: int, n: int) -> int:
    """Number of int32 words of the packed mask of global flat indices ``[start, start + n)``."""
    if n <= 0:
        return 0
    return (((start + n + _MASK_BLOCK - 1) >> 12) - (start >> 12)) * 128


def _z_blocks(like: torch.Tensor, start: int, key: int, gaussian: bool) -> torch.Tensor:
    """The fp32 noise of ``like`` (whole blocks of 4096 elements from ``start``), shaped like it."""
    rows = like.numel() // 64
    row = torch.arange(rows, device=like.device, dtype=torch.int64) + start // 64
    col = torch.arange(64, device=like.device, dtype=torch.int64)
    if gaussian:
        h = _hash(row[:, None] * 64 + col, key)
        u1 = (_srl(h, 40).to(torch.float32) + 0.5) * _INV_2_24
        u2 = (h & 0xFFFFFF).to(torch.float32) * _INV_2_24
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
    else:
        z = ((_hash(row, key)[:, None] >> col) & 1).to(torch.float32) * -2.0 + 1.0
    return z.view(like.shape)


def _row_bit(like: torch.Tensor) -> torch.Tensor:
    return torch.arange(32, device=like.device, dtype=torch.int32)[None, None, :, None]


def _masked_axpbz_pack_kernel(x: torch.Tensor, words: torch.Tensor, start: int, key: int, a: float, b: float,
                              threshold: float, gaussian: bool) -> None:
    # x: [blocks, 2, 32, 64], words: [blocks, 2, 64] int32.
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    m = xa.abs() <= threshold
    words.copy_((m.to(torch.int32) << _row_bit(x)).sum(dim=2, dtype=torch.int32))
    z = _z_blocks(x, start, key, gaussian).to(acc)
    x.copy_(torch.where(m, (xa * a + z * b).to(x.dtype), x))


def _masked_axpbz_kernel(x: torch.Tensor, words: torch.Tensor, start: int, key: int, a: float, b: float,
                         gaussian: bool) -> None:
    acc = _acc_dtype(x.dtype)
    # Compared as fp32 so that the select is a float vector mask.
    m = ((words[:, :, None, :] >> _row_bit(x)) & 1).to(torch.float32) != 0.0
    z = _z_blocks(x, start, key, gaussian).to(acc)
    x.copy_(torch.where(m, (x.to(acc) * a + z * b).to(x.dtype), x))


def _masked_from_master_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float,
                               threshold: float, gaussian: bool) -> None:
    z = _z(dst, start, key, gaussian).to(master.dtype)
    dst.copy_(torch.where(master.abs() <= threshold, master + z * b, master))


def _masked_update_master_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                                 threshold: float, gaussian: bool) -> None:
    z = _z(dst, start, key, gaussian).to(master.dtype)
    new = torch.where(master.abs() <= threshold, master * a + z * b, master)
    master.copy_(new)
    dst.copy_(new)


_KERNELS.update({
    "masked_axpbz_pack": _masked_axpbz_pack_kernel,
    "masked_axpbz": _masked_axpbz_kernel,
    "masked_from_master": _masked_from_master_kernel,
    "masked_update_master": _masked_update_master_kernel,
})


def _run_words(name: str, x: torch.Tensor, words: torch.Tensor, start: int, key: int, scalars: tuple[float, ...],
               kind: str, eager: bool) -> None:
    """:func:`_run` for the kernels that take a packed mask: whole blocks as ``[blocks, 2, 32, 64]``.

    A partial block at either end (the shard does not start or end on a block boundary) is
    copied into a scratch block padded with NaN (|NaN| <= h is false: padding is never
    selected), processed, and copied back.
    """
    check_kind(kind)
    n = x.numel()
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"noise kernels take contiguous 1-D tensors, got {tuple(x.shape)}")
    if words.dtype != torch.int32 or words.dim() != 1 or not words.is_contiguous() \
            or words.numel() != mask_words(start, n):
        raise ValueError(f"the packed mask of {n} elements from {start} is a contiguous int32 tensor of "
                         f"{mask_words(start, n)} words, got {words.dtype} {tuple(words.shape)}")
    if n == 0:
        return
    fn, chunk = _kernel(name, eager)
    gaussian = kind == "gaussian"
    base = start >> 12
    head = min(n, (-start) % _MASK_BLOCK)
    mid = (n - head) // _MASK_BLOCK * _MASK_BLOCK
    for lo, hi in ((0, head), (head + mid, n)):
        if lo == hi:
            continue
        first = (start + lo) & ~(_MASK_BLOCK - 1)  # global index of the block's first element
        off = start + lo - first
        scratch = torch.full((_MASK_BLOCK,), math.nan, dtype=x.dtype, device=x.device)
        scratch[off:off + hi - lo] = x[lo:hi]
        w = ((first >> 12) - base) * 128
        fn(scratch.view(1, 2, 32, 64), words[w:w + 128].view(1, 2, 64), first, key, *scalars, gaussian)
        x[lo:hi] = scratch[off:off + hi - lo]
    for a in range(head, head + mid, chunk):
        b = min(head + mid, a + chunk)
        w = (((start + a) >> 12) - base) * 128
        fn(x[a:b].view(-1, 2, 32, 64), words[w:w + (b - a) // 32].view(-1, 2, 64), start + a, key, *scalars,
           gaussian)


def masked_axpbz_pack_(x: torch.Tensor, words: torch.Tensor, start: int, key: int, a: float, b: float,
                       threshold: float, kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """Select ``m = |x| <= threshold``, write it packed to ``words``, then ``x = m ? a*x + b*z : x``.

    The mask is taken from ``x`` before the edit (compared in at least fp32). ``words`` holds
    :func:`mask_words` ``(start, x.numel())`` int32 words (layout: see the section comment);
    every word is overwritten (bits of positions outside the shard are 0). Unselected
    elements keep their value bit for bit.
    """
    _run_words("masked_axpbz_pack", x, words, start, key, (float(a), float(b), float(threshold)), kind, eager)
    return x


def masked_axpbz_(x: torch.Tensor, words: torch.Tensor, start: int, key: int, a: float, b: float,
                  kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """In place ``x = m ? a*x + b*z : x`` with the mask ``m`` read from packed ``words``.

    With every bit set this is :func:`axpbz_`, bit for bit.
    """
    _run_words("masked_axpbz", x, words, start, key, (float(a), float(b)), kind, eager)
    return x


def masked_perturb_from_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float,
                                threshold: float, kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``dst = cast(|master| <= threshold ? master + b*z : master)``."""
    _run("masked_from_master", (dst, master), start, key, (float(b), float(threshold)), kind, eager)
    return dst


def masked_update_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                          threshold: float, kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``master = |master| <= threshold ? a*master + b*z : master; dst = cast(master)`` in one pass.

    The mask is taken from the master before the update.
    """
    _run("masked_update_master", (dst, master), start, key, (float(a), float(b), float(threshold)), kind, eager)
    return dst
