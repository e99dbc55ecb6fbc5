"""The ranks' check that they run one optimizer: the same options, one small all-reduce.

A run whose ranks disagree on the seed (or any other option) would diverge silently: every rank
would draw its own noise. At the first step every rank hashes the options that must agree; one
all-reduce (int64, MAX) of two 62-bit hashes and their negations tells every rank alike whether
all agree (the MAX of a hash equals minus the MAX of its negation, its MIN, exactly when every
rank has that hash). Only on the failure path are the options all-gathered, to name what differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["OPTION_CHECK_SHAPE", "check_agreement", "ids_digest"]

#: Shape of the one all-reduce (int64, MAX) of the check.
OPTION_CHECK_SHAPE = (4,)
_HASH_MASK = (1 << 62) - 1


def canonical(value: Any) -> Any:
    """A rank-independent, hashable description of an option value (no addresses, no devices)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.detach().cpu().tolist())
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), canonical(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(canonical(v) for v in value))
    if isinstance(value, (bool, int, float, str, type(None))):
        return (type(value).__name__, repr(value))
    if callable(value) and hasattr(value, "__qualname__"):  # a class or function: by name, not address
        return ("callable", getattr(value, "__module__", ""), value.__qualname__)
    return (type(value).__name__, repr(value))


def ids_digest(ids: list[str]) -> str:
    """A short description of a list of stable ids (the options hold many names)."""
    digest = hashlib.blake2b("\n".join(ids).encode("utf-8"), digest_size=6).hexdigest()
    return f"{len(ids)} tensors, ids digest {digest}"


def _disagreement(label: str, values: list[Any], ranks: list[int]) -> str:
    """``'seed': rank 0 has 0, rank 1 has 1`` (ranks with equal values named together)."""
    order: list[Any] = []
    holders: dict[Any, list[int]] = {}
    shown: dict[Any, str] = {}
    for rank, (canon, text) in zip(ranks, values):
        if canon not in holders:
            order.append(canon)
            holders[canon] = []
            shown[canon] = text
        holders[canon].append(rank)
    parts = []
    for canon in order:
        rs = holders[canon]
        who = f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))
        parts.append(f"{who} {'has' if len(rs) == 1 else 'have'} {shown[canon]}")
    return f"{label!r}: " + ", ".join(parts)


def _hashes(options: dict[str, tuple[Any, str]]) -> list[int]:
    digest = hashlib.blake2b(repr(sorted((k, c) for k, (c, _) in options.items())).encode("utf-8"),
                             digest_size=16).digest()
    return [int.from_bytes(digest[:8], "little") & _HASH_MASK, int.from_bytes(digest[8:], "little") & _HASH_MASK]


def check_agreement(owner: str, shared: dict[str, Any], group: Any, device: torch.device) -> None:
    """Refuse to run when the ranks of ``group`` disagree on ``shared`` (collective).

    Args:
        owner: the optimizer's class name, for the message.
        shared: label -> value of everything the ranks must agree on.
        group: the process group (its size must be > 1).
        device: where the all-reduce runs (as the loss all-reduce).

    Raises:
        ValueError: ``ranks disagree on optimizer option 'seed': rank 0 has 0, rank 1 has 1``
            (every differing option), on every rank.
    """
    options = {label: (canonical(v), repr(v)) for label, v in shared.items()}
    h = _hashes(options)
    vals = torch.tensor([h[0], h[1], -h[0], -h[1]], dtype=torch.int64, device=device)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group)
    top = vals.tolist()
    if top[0] != -top[2] or top[1] != -top[3]:  # the max and the min of some hash differ
        _raise_disagreement(owner, options, group)


def _raise_disagreement(owner: str, options: dict[str, tuple[Any, str]], group: Any) -> None:
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, options, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not dist.group.WORLD else list(range(world))
    labels = list(dict.fromkeys(label for opts in gathered for label in opts))
    missing = (("unset",), "<not set>")
    differ = []
    for label in labels:
        values = [opts.get(label, missing) for opts in gathered]
        if any(v[0] != values[0][0] for v in values):
            differ.append(_disagreement(label, values, ranks))
    what = (f"option{'s' if len(differ) > 1 else ''} " + "; ".join(differ) if differ
            else "options (their hashes differ, their printed values do not)")
    raise ValueError(
        f"{owner}: ranks disagree on optimizer {what}. "
        "Every rank must build the optimizer with the same options, or the ranks' runs diverge; "
        "nothing was changed (checked before the first step moved any parameter)"
    )
