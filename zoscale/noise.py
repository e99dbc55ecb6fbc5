"""Sharding-invariant perturbation noise.

The perturbation of element ``i`` (index into the *unsharded, flattened* tensor) of a trainable
tensor at step ``t``, query ``k`` is a pure function of ``(seed, t, k, stable_id, i)``:

    key   = blake2b(seed, t, k, stable_id)              # 64 bits, computed on the host
    H(j)  = fmix64((j XOR key) * GAMMA)                  # counter-based 64-bit hash
    z_i   = +1/-1 from bit (i mod 64) of H(i div 64)     # "rademacher": 64 signs per hash
    z_i   = Box-Muller(top 24 bits, low 24 bits of H(i)) # "gaussian"
    (z_2j, z_2j+1) = both Box-Muller normals of H(j)     # "gaussian_pairs": 2 normals per hash

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

"gaussian" keeps one normal per hash, ``r cos(2 pi u2)`` with ``r = sqrt(-2 ln u1)``, ``u1 = (top
24 bits + 1/2) / 2**24``, ``u2 = low 24 bits / 2**24``, and throws the sine away. "gaussian_pairs"
uses both: the pair ``(2j, 2j+1)`` gets ``(r cos(2 pi u2), r sin(2 pi u2))`` from ``H(j)`` (same
``u1``, ``u2`` extraction), which halves the hashes, logarithms and square roots. Its cosine and
sine are evaluated by an exact octant reduction of the 24-bit integer angle and fixed
polynomials on [0, pi/4] (absolute error < 1e-7, below fp32's ``cos``), the same float operations
on every backend. The values are a pure function of the global index, so an odd ``start`` or an
odd cut still gives the same bits: the middle of a shard is processed as whole pairs, packed two
to an integer word (an fp32 pair as one int64, a bf16/fp16 pair as one int32: one hash per word
and contiguous vector loads, where inductor's strided access to the two halves of ``[n/2, 2]``
was slower than a hash per element), and an unpaired element at either end in a small scratch
block through the same kernel. "gaussian_pairs" has different values from "gaussian" (runs and
step logs of one kind do not replay under the other); it is the cheaper Gaussian (a pass over
SmolLM2-135M's parameters: ~4.6x the memory floor instead of ~7.9x, on 2 AVX-512 cores; see
benchmarks/bench_step.py).

Two-stream kernels (``axpbz2_``, ``update_master_perturb_``) regenerate two noise streams (two
keys) in one pass, for the two-pass ZO step that folds query ``k``'s pending update into query
``k+1``'s first perturbation: ``x <- a x + b1 z_k + b2 z_{k+1}``.

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
import inspect
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
    "axpbz2_",
    "perturb_from_master_",
    "update_master_",
    "update_master_perturb_",
    "backend",
    "mask_words",
    "masked_axpbz_pack_",
    "masked_axpbz_",
    "masked_perturb_from_master_",
    "masked_update_master_",
]

logger = logging.getLogger(__name__)

NoiseKind = Literal["gaussian", "gaussian_pairs", "rademacher"]
NOISE_KINDS: tuple[str, ...] = ("gaussian", "gaussian_pairs", "rademacher")

# Constants as signed int64 (torch has no uint64 arithmetic on every backend).
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_INV_2_24 = 1.0 / 16777216.0
_TWO_PI = 6.283185307179586
# "gaussian_pairs": the angle 2 pi k / 2**24 of a 24-bit integer k is octant k >> 21 plus
# (k & (2**21 - 1)) * _OCTANT_STEP radians.
_OCTANT_STEP = math.pi / 4 / (1 << 21)

# Eager (reference) chunk: bounds transient memory to ~20 bytes x chunk.
EAGER_CHUNK = 1 << 16
# Compiled chunk: the fused kernel allocates nothing per element; the chunk only bounds
# memory should a backend ever materialise an intermediate.
COMPILED_CHUNK = 1 << 24

# "gaussian_pairs" packs a pair of values into one integer word: (word dtype, half dtype, bits).
_PACKED: dict[torch.dtype, tuple[torch.dtype, torch.dtype, int]] = {
    torch.float32: (torch.int64, torch.int32, 32),
    torch.bfloat16: (torch.int32, torch.int16, 16),
    torch.float16: (torch.int32, torch.int16, 16),
}
# An unpaired element at either end of a shard runs through the pair kernel in a scratch block
# of this many elements (more than 2 pairs: no 0/1-size specialisation, the same compiled code
# as the middle of the shard).
_PAIR_SCRATCH = 32


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


def _box_muller_radius(h: torch.Tensor) -> torch.Tensor:
    """``sqrt(-2 ln u1)`` with ``u1 = (top 24 bits of h + 1/2) / 2**24`` in (0, 1): finite."""
    u1 = (_srl(h, 40).to(torch.float32) + 0.5) * _INV_2_24
    return torch.sqrt(-2.0 * torch.log(u1))


def _cos_sin_24(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos t, sin t)`` of ``t = 2 pi k / 2**24`` for int32 ``k`` in ``[0, 2**24)``.

    Exact octant reduction on the integer (octant ``o = k >> 21``, offset ``f`` folded to the
    nearer octant edge, so the reduced angle ``p`` is in [0, pi/4]), then Taylor polynomials of
    degree 9 (sin) and 10 (cos) on ``p`` (truncation < 2e-9; fp32 rounding ~1e-7 in all), swapped
    and signed by the octant. Only +, *, where and integer ops: the eager and compiled backends
    evaluate the same float operations.
    """
    o = k >> 21
    f = k & 0x1FFFFF
    g = torch.where((o & 1) == 0, f, 0x200000 - f)
    p = g.to(torch.float32) * _OCTANT_STEP
    q = p * p
    sin_p = p * (1.0 + q * (-1.0 / 6 + q * (1.0 / 120 + q * (-1.0 / 5040 + q * (1.0 / 362880)))))
    cos_p = 1.0 + q * (-0.5 + q * (1.0 / 24 + q * (-1.0 / 720 + q * (1.0 / 40320 + q * (-1.0 / 3628800)))))
    # Octants 1, 2, 5, 6 measure p from a multiple of pi/2 plus or minus pi/4: cos and sin swap.
    swap = ((o + 1) & 2) != 0
    sin_sign = (1 - ((o >> 1) & 2)).to(torch.float32)  # -1 for o in 4..7
    cos_sign = (1 - (((o + 2) >> 1) & 2)).to(torch.float32)  # -1 for o in 2..5
    return torch.where(swap, sin_p, cos_p) * cos_sign, torch.where(swap, cos_p, sin_p) * sin_sign


def _z_pairs(j: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(z_2j, z_2j+1)`` of "gaussian_pairs": both Box-Muller normals of ``H(j)``."""
    h = _hash(j, key)
    r = _box_muller_radius(h)
    c, s = _cos_sin_24((h & 0xFFFFFF).to(torch.int32))
    return r * c, r * s


def _z_pairs_elementwise(i: torch.Tensor, key: int) -> torch.Tensor:
    """fp32 "gaussian_pairs" noise of global indices ``i``, element by element (bit for bit the
    values of :func:`_z_pairs`: the same operations, then a select by parity)."""
    h = _hash(i >> 1, key)
    r = _box_muller_radius(h)
    c, s = _cos_sin_24((h & 0xFFFFFF).to(torch.int32))
    return r * torch.where((i & 1) == 0, c, s)


def _z(like: torch.Tensor, start: int, key: int, kind: str) -> torch.Tensor:
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
    if kind == "gaussian":
        h = _hash(i, key)
        u1 = (_srl(h, 40).to(torch.float32) + 0.5) * _INV_2_24  # (0, 1): log is finite
        u2 = (h & 0xFFFFFF).to(torch.float32) * _INV_2_24
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
    if kind == "gaussian_pairs":
        return _z_pairs_elementwise(i, key)
    bits = (_hash(i >> 6, key) >> (i & 63)) & 1
    return bits.to(torch.float32) * -2.0 + 1.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# The kernels take their tensors in one of three layouts, chosen by _run: flat 1-D, Rademacher
# rows [rows, 64], or ("gaussian_pairs") packed pairs, a 1-D integer view holding two values per
# word. ``fmt`` is None for the first two and, for packed pairs, the value dtype of each tensor
# argument in order. A tensor's values are a list: [t] unpacked, [even, odd] packed, and so is
# the noise; the arithmetic is written once over these lists.
def _values(t: torch.Tensor, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The values a kernel argument holds: ``[t]``, or ``[even, odd]`` of a packed-pair word.

    A bf16 pair comes out as two fp32 tensors (a bf16 value is the top half of an fp32 one):
    integer shifts and one int32 -> fp32 bitcast, no 16-bit lanes.
    """
    if dtype is None:
        return [t]
    if dtype == torch.bfloat16:
        return [(t << 16).view(torch.float32), (t & -65536).view(torch.float32)]
    _, half, bits = _PACKED[dtype]
    return [t.to(half).view(dtype), (t >> bits).to(half).view(dtype)]


def _bf16_bits(v: torch.Tensor) -> torch.Tensor:
    """The bf16 bits (low 16 of an int32) of fp32 ``v`` rounded to nearest even, as ``v.to(bfloat16)``.

    c10's rounding, NaN included (0x7FC0), on the fp32 bits.
    """
    u = v.view(torch.int32)
    r = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(v), 0x7FC0, r)


def _store(t: torch.Tensor, values: list[torch.Tensor], dtype: torch.dtype | None) -> None:
    """Round ``values`` to the argument's value dtype (once) and write them (packing pairs)."""
    if dtype is None:
        t.copy_(values[0])
        return
    if dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in values):
        t.copy_(_bf16_bits(values[0]) | (_bf16_bits(values[1]) << 16))
        return
    _, half, bits = _PACKED[dtype]
    even = values[0].to(dtype).view(half).to(t.dtype) & ((1 << bits) - 1)
    odd = values[1].to(dtype).view(half).to(t.dtype) << bits
    t.copy_(even | odd)


def _noise(like: torch.Tensor, start: int, key: int, kind: str, fmt: tuple | None) -> list[torch.Tensor]:
    """The fp32 noise of ``like``'s elements as a list matching :func:`_values`."""
    if fmt is None:
        return [_z(like, start, key, kind)]
    j = torch.arange(like.numel(), device=like.device, dtype=torch.int64) + start // 2
    return list(_z_pairs(j, key))


def _dtypes(tensors: tuple[torch.Tensor, ...], fmt: tuple | None) -> tuple:
    return fmt if fmt is not None else (None,) * len(tensors)


def _axpbz_kernel(x: torch.Tensor, start: int, key: int, a: float, b: float, kind: str, fmt: tuple | None) -> None:
    (dx,) = _dtypes((x,), fmt)
    acc = _acc_dtype(dx or x.dtype)
    zs = _noise(x, start, key, kind, fmt)
    _store(x, [v.to(acc) * a + z.to(acc) * b for v, z in zip(_values(x, dx), zs)], dx)


def _axpbz2_kernel(x: torch.Tensor, start: int, key1: int, key2: int, a: float, b1: float, b2: float, kind: str,
                   fmt: tuple | None) -> None:
    (dx,) = _dtypes((x,), fmt)
    acc = _acc_dtype(dx or x.dtype)
    z1s, z2s = _noise(x, start, key1, kind, fmt), _noise(x, start, key2, kind, fmt)
    new = [v.to(acc) * a + z1.to(acc) * b1 + z2.to(acc) * b2 for v, z1, z2 in zip(_values(x, dx), z1s, z2s)]
    _store(x, new, dx)


def _from_master_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float, kind: str,
                        fmt: tuple | None) -> None:
    dd, dm = _dtypes((dst, master), fmt)
    mdt = dm or master.dtype
    zs = _noise(dst, start, key, kind, fmt)
    _store(dst, [m + z.to(mdt) * b for m, z in zip(_values(master, dm), zs)], dd)


def _update_master_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                          kind: str, fmt: tuple | None) -> None:
    dd, dm = _dtypes((dst, master), fmt)
    mdt = dm or master.dtype
    zs = _noise(dst, start, key, kind, fmt)
    new = [m * a + z.to(mdt) * b for m, z in zip(_values(master, dm), zs)]
    _store(master, new, dm)
    _store(dst, new, dd)


def _update_master_perturb_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key1: int, key2: int,
                                  a: float, b1: float, b2: float, kind: str, fmt: tuple | None) -> None:
    dd, dm = _dtypes((dst, master), fmt)
    mdt = dm or master.dtype
    z1s, z2s = _noise(dst, start, key1, kind, fmt), _noise(dst, start, key2, kind, fmt)
    new = [m * a + z1.to(mdt) * b1 for m, z1 in zip(_values(master, dm), z1s)]
    _store(master, new, dm)
    _store(dst, [m + z2.to(mdt) * b2 for m, z2 in zip(new, z2s)], dd)


def _generate_kernel(out: torch.Tensor, start: int, key: int, kind: str, fmt: tuple | None) -> None:
    (do,) = _dtypes((out,), fmt)
    _store(out, _noise(out, start, key, kind, fmt), do)


_KERNELS: dict[str, Callable[..., None]] = {
    "axpbz": _axpbz_kernel,
    "axpbz2": _axpbz2_kernel,
    "from_master": _from_master_kernel,
    "update_master": _update_master_kernel,
    "update_master_perturb": _update_master_perturb_kernel,
    "generate": _generate_kernel,
}
_compiled: dict[str, Callable[..., None]] = {}


def backend() -> str:
    """``"compiled"`` (default) or ``"eager"``, from ``ZOSCALE_NOISE_BACKEND``."""
    value = os.environ.get("ZOSCALE_NOISE_BACKEND", "compiled")
    if value not in ("compiled", "eager"):
        raise ValueError(f"Invalid ZOSCALE_NOISE_BACKEND: {value!r} (expected 'compiled' or 'eager')")
    return value


# One graph per (dtype, kind, layout, 0/1-size specialisation) of a kernel: more than dynamo's
# default 8 recompiles. These limits hold only while a kernel compiles: torch's global dynamo
# config, which user code may rely on, is left as it was.
_RECOMPILE_LIMITS = {"recompile_limit": 64, "accumulated_recompile_limit": 1024}
# torch.compile(recompile_limit=...) (torch >= 2.12) applies a per-region limit during compiles
# only, at no cost per call; older versions patch the global config around every call.
_COMPILE_TAKES_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


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


def _with_accumulated_limit(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` (compiled with its own ``recompile_limit``), run with the global
    ``accumulated_recompile_limit`` raised to that limit only where a user lowered it below (one
    config read per call otherwise): by default it is 256 > 64, and never binds."""
    cfg = torch._dynamo.config
    if not hasattr(cfg, "accumulated_recompile_limit"):
        return fn
    need = _RECOMPILE_LIMITS["recompile_limit"]

    def call(*args: object) -> None:
        old = cfg.accumulated_recompile_limit
        if old >= need:
            fn(*args)
            return
        cfg.accumulated_recompile_limit = need
        try:
            fn(*args)
        finally:
            cfg.accumulated_recompile_limit = old

    return call


def _kernel(name: str, force_eager: bool) -> tuple[Callable[..., None], int]:
    if force_eager or backend() == "eager":
        return _KERNELS[name], EAGER_CHUNK
    fn = _compiled.get(name)
    if fn is None:
        # dynamic_threads: always emit an OpenMP region. Otherwise inductor decides serial vs
        # parallel from the first call's size, and a small first tensor (a norm weight) would
        # leave every later pass single-threaded -- and the compile cache would keep it so.
        options = {"dynamic": True, "fullgraph": True, "options": {"cpp.dynamic_threads": True}}
        if _COMPILE_TAKES_LIMIT:
            compiled = torch.compile(_KERNELS[name], recompile_limit=_RECOMPILE_LIMITS["recompile_limit"], **options)
            fn = _with_accumulated_limit(compiled)
        else:
            fn = _with_recompile_limits(torch.compile(_KERNELS[name], **options))
        _compiled[name] = fn
    return fn, COMPILED_CHUNK


def _run(name: str, tensors: tuple[torch.Tensor, ...], start: int, keys: tuple[int, ...],
         scalars: tuple[float, ...], kind: str, eager: bool) -> None:
    """Run kernel ``name`` over equal-length flat shards ``tensors`` of global indices from ``start``.

    The kernel is called as ``fn(*tensor_parts, part_start, *keys, *scalars, kind, fmt)``, once
    per segment (see :func:`_segments`) and chunk; ``keys`` are the noise streams it draws.
    """
    check_kind(kind)
    n = tensors[0].numel()
    for t in tensors:
        if t.dim() != 1 or not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"noise kernels take contiguous 1-D tensors of equal length, got {tuple(t.shape)}")
    if n == 0:
        return
    fn, chunk = _kernel(name, eager)
    for lo, hi, layout in _segments(start, n, kind, tensors):
        if layout == "pair_edge":
            _run_pair_edge(fn, tensors, start, lo, hi, keys, scalars, kind)
            continue
        fmt = tuple(t.dtype for t in tensors) if layout == "pairs" else None
        for a, b in _chunks(lo, hi, chunk, 4 if layout == "pairs" else 1):
            if layout == "rows":
                parts = [t[a:b].view(-1, 64) for t in tensors]
            elif layout == "pairs":
                parts = [t[a:b].view(_PACKED[t.dtype][0]) for t in tensors]
            else:
                parts = [t[a:b] for t in tensors]
            fn(*parts, start + a, *keys, *scalars, kind, fmt)


def _chunks(lo: int, hi: int, chunk: int, min_last: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` in pieces of ``chunk``; a last piece shorter than ``min_last`` joins the one before."""
    out = [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_last:
        out[-2:] = [(out[-2][0], hi)]
    return out


def _pairs_packable(tensors: tuple[torch.Tensor, ...], lo: int) -> bool:
    """Whether every tensor's ``[lo:]`` can be viewed as packed pairs (dtype and storage alignment)."""
    return all(t.dtype in _PACKED and (t.storage_offset() + lo) % 2 == 0 for t in tensors)


def _segments(start: int, n: int, kind: str, tensors: tuple[torch.Tensor, ...] = ()) -> list[tuple[int, int, str]]:
    """``(lo, hi, layout)`` pieces of ``[0, n)``; layout "flat", "rows", "pairs" or "pair_edge".

    Rademacher: the 64-aligned middle as rows of 64 (one hash per row), the edges flat.
    "gaussian_pairs": the pair-aligned middle as packed pairs (one hash per pair); an unpaired
    element at either end, or a middle of a single pair, as "pair_edge" (a scratch block through
    the same kernel). Where a dtype has no packed form (fp64) or the shard's storage is not
    aligned for the packed view, the flat element-by-element formula (the same values).
    """
    if kind == "rademacher":
        head = min(n, (-start) % 64)
        mid = (n - head) // 64 * 64
        segs = [(0, head, "flat")] if head else []
        if mid:
            segs.append((head, head + mid, "rows"))
        if head + mid < n:
            segs.append((head + mid, n, "flat"))
        return segs
    if kind == "gaussian_pairs" and tensors:
        head = min(n, start % 2)
        mid = (n - head) // 2 * 2
        if not _pairs_packable(tensors, head):
            return [(0, n, "flat")]
        segs = [(0, head, "pair_edge")] if head else []
        if mid:
            segs.append((head, head + mid, "pairs" if mid >= 4 else "pair_edge"))
        if head + mid < n:
            segs.append((head + mid, n, "pair_edge"))
        return segs
    return [(0, n, "flat")]


def _run_pair_edge(fn: Callable[..., None], tensors: tuple[torch.Tensor, ...], start: int, lo: int, hi: int,
                   keys: tuple[int, ...], scalars: tuple[float, ...], kind: str) -> None:
    """Run the packed-pair kernel on ``[lo, hi)`` (at most one pair's worth) through scratch blocks.

    The block starts at the global pair boundary below ``start + lo``; elements outside the
    shard are zeros in the scratch and are never copied back.
    """
    first = (start + lo) & ~1
    off = start + lo - first
    scratch = []
    for t in tensors:
        s = torch.zeros(_PAIR_SCRATCH, dtype=t.dtype, device=t.device)
        s[off:off + hi - lo] = t[lo:hi]
        scratch.append(s)
    fmt = tuple(t.dtype for t in tensors)
    fn(*(s.view(_PACKED[s.dtype][0]) for s in scratch), first, *keys, *scalars, kind, fmt)
    for t, s in zip(tensors, scratch):
        t[lo:hi] = s[off:off + hi - lo]


def generate(start: int, n: int, key: int, kind: str = "gaussian", *, device: torch.device | str = "cpu",
             eager: bool = False) -> torch.Tensor:
    """Return the fp32 noise of global flat indices ``[start, start + n)`` (allocates ``n``)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    _run("generate", (out,), start, (key,), (), kind, eager)
    return out


def axpbz_(x: torch.Tensor, start: int, key: int, a: float, b: float, kind: str = "gaussian", *,
           eager: bool = False) -> torch.Tensor:
    """In place ``x = a*x + b*z`` with ``z`` the noise of ``[start, start + x.numel())``.

    Computed in at least fp32 and rounded once to ``x.dtype``. ``x`` is a contiguous 1-D view
    (a flat shard).
    """
    _run("axpbz", (x,), start, (key,), (float(a), float(b)), kind, eager)
    return x


def axpbz2_(x: torch.Tensor, start: int, key1: int, key2: int, a: float, b1: float, b2: float,
            kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """In place ``x = a*x + b1*z1 + b2*z2``, two noise streams (keys ``key1``, ``key2``) in one pass.

    ``z1``, ``z2`` are the noise of ``[start, start + x.numel())`` under each key. Computed in at
    least fp32 as ``(a*x + b1*z1) + b2*z2`` and rounded once to ``x.dtype``: for an fp32 ``x`` the
    same bits as ``axpbz_(x, .., key1, a, b1)`` then ``axpbz_(x, .., key2, 1, b2)``, for bf16 one
    rounding instead of two. The two-pass ZO step uses it to apply query k's deferred restore and
    update, ``theta <- a (theta + eps z_k) - lr g_k z_k`` (``a = 1 - lr*wd``, so ``b1 = a*eps -
    lr*g_k``), together with query k+1's perturbation ``+eps z_{k+1}`` (``b2 = eps``).
    """
    _run("axpbz2", (x,), start, (key1, key2), (float(a), float(b1), float(b2)), kind, eager)
    return x


def perturb_from_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float,
                         kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``dst = cast(master + b*z)``: write a perturbed compute copy from an fp32 master shard."""
    _run("from_master", (dst, master), start, (key,), (float(b),), kind, eager)
    return dst


def update_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                   kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``master = a*master + b*z; dst = cast(master)`` in one pass."""
    _run("update_master", (dst, master), start, (key,), (float(a), float(b)), kind, eager)
    return dst


def update_master_perturb_(dst: torch.Tensor, master: torch.Tensor, start: int, key1: int, key2: int, a: float,
                           b1: float, b2: float, kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``master = a*master + b1*z1; dst = cast(master + b2*z2)`` in one pass (two noise streams).

    The master-weight form of :func:`axpbz2_`: the master takes query k's update (key ``key1``),
    the compute copy gets the updated master perturbed by query k+1's noise (key ``key2``). The
    master is computed in its own dtype (fp32 or wider) and ``dst`` rounded once: bit for bit
    ``update_master_(dst, master, .., key1, a, b1)`` then ``perturb_from_master_(dst, master, ..,
    key2, b2)``.
    """
    _run("update_master_perturb", (dst, master), start, (key1, key2), (float(a), float(b1), float(b2)), kind,
         eager)
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


def _z_blocks(like: torch.Tensor, start: int, key: int, kind: str) -> torch.Tensor:
    """The fp32 noise of ``like`` (whole blocks of 4096 elements from ``start``), shaped like it."""
    rows = like.numel() // 64
    row = torch.arange(rows, device=like.device, dtype=torch.int64) + start // 64
    col = torch.arange(64, device=like.device, dtype=torch.int64)
    if kind == "gaussian":
        h = _hash(row[:, None] * 64 + col, key)
        u1 = (_srl(h, 40).to(torch.float32) + 0.5) * _INV_2_24
        u2 = (h & 0xFFFFFF).to(torch.float32) * _INV_2_24
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
    elif kind == "gaussian_pairs":
        z = _z_pairs_elementwise(row[:, None] * 64 + col, key)
    else:
        z = ((_hash(row, key)[:, None] >> col) & 1).to(torch.float32) * -2.0 + 1.0
    return z.view(like.shape)


def _row_bit(like: torch.Tensor) -> torch.Tensor:
    return torch.arange(32, device=like.device, dtype=torch.int32)[None, None, :, None]


def _masked_axpbz_pack_kernel(x: torch.Tensor, words: torch.Tensor, start: int, key: int, a: float, b: float,
                              threshold: float, kind: str) -> None:
    # x: [blocks, 2, 32, 64], words: [blocks, 2, 64] int32.
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    m = xa.abs() <= threshold
    words.copy_((m.to(torch.int32) << _row_bit(x)).sum(dim=2, dtype=torch.int32))
    z = _z_blocks(x, start, key, kind).to(acc)
    x.copy_(torch.where(m, (xa * a + z * b).to(x.dtype), x))


def _masked_axpbz_kernel(x: torch.Tensor, words: torch.Tensor, start: int, key: int, a: float, b: float,
                         kind: str) -> None:
    acc = _acc_dtype(x.dtype)
    # Compared as fp32 so that the select is a float vector mask.
    m = ((words[:, :, None, :] >> _row_bit(x)) & 1).to(torch.float32) != 0.0
    z = _z_blocks(x, start, key, kind).to(acc)
    x.copy_(torch.where(m, (x.to(acc) * a + z * b).to(x.dtype), x))


def _masked_from_master_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, b: float,
                               threshold: float, kind: str, fmt: tuple | None) -> None:
    dd, dm = _dtypes((dst, master), fmt)
    mdt = dm or master.dtype
    zs = _noise(dst, start, key, kind, fmt)
    _store(dst, [torch.where(m.abs() <= threshold, m + z.to(mdt) * b, m) for m, z in zip(_values(master, dm), zs)],
           dd)


def _masked_update_master_kernel(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                                 threshold: float, kind: str, fmt: tuple | None) -> None:
    dd, dm = _dtypes((dst, master), fmt)
    mdt = dm or master.dtype
    zs = _noise(dst, start, key, kind, fmt)
    new = [torch.where(m.abs() <= threshold, m * a + z.to(mdt) * b, m) for m, z in zip(_values(master, dm), zs)]
    _store(master, new, dm)
    _store(dst, new, dd)


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
        fn(scratch.view(1, 2, 32, 64), words[w:w + 128].view(1, 2, 64), first, key, *scalars, kind)
        x[lo:hi] = scratch[off:off + hi - lo]
    for a in range(head, head + mid, chunk):
        b = min(head + mid, a + chunk)
        w = (((start + a) >> 12) - base) * 128
        fn(x[a:b].view(-1, 2, 32, 64), words[w:w + (b - a) // 32].view(-1, 2, 64), start + a, key, *scalars,
           kind)


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
    _run("masked_from_master", (dst, master), start, (key,), (float(b), float(threshold)), kind, eager)
    return dst


def masked_update_master_(dst: torch.Tensor, master: torch.Tensor, start: int, key: int, a: float, b: float,
                          threshold: float, kind: str = "gaussian", *, eager: bool = False) -> torch.Tensor:
    """``master = |master| <= threshold ? a*master + b*z : master; dst = cast(master)`` in one pass.

    The mask is taken from the master before the update.
    """
    _run("masked_update_master", (dst, master), start, (key,), (float(a), float(b), float(threshold)), kind,
         eager)
    return dst
