"""A fingerprint of the trainable weights that every layout computes alike.

Per trainable tensor, ``sum_i x_i w_i`` in float64 over the whole (unsharded) tensor, with ``w_i``
the Rademacher noise of a fixed key at global index ``i``: each rank sums over the elements it
holds and one all-reduce adds the ranks' sums (divided by how many ranks hold each element, for
replicas). Another base model, another checkpoint or another adapter initialisation changes it;
another engine or world size changes it only by float64 rounding (compared with a tolerance).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from zoscale import noise

__all__ = ["weights_fingerprint", "fingerprints_match"]

_KEY_SUFFIX = "/fingerprint"


def weights_fingerprint(optimizer: Any) -> dict[str, float]:
    """Stable id -> fingerprint of every trainable tensor (collective over the loss group)."""
    views = {}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p.requires_grad:
                views[optimizer._stable_id(group, i, p)] = optimizer.shards.view(p)
    ids = sorted(views)
    sums = torch.zeros(2 * len(ids), dtype=torch.float64)
    for k, sid in enumerate(ids):
        v = views[sid]
        local = v.local.detach()
        if local.numel():
            w = noise.generate(v.offset, local.numel(), noise.noise_key(0, 0, 0, sid + _KEY_SUFFIX), "rademacher")
            sums[k] = (local.double().cpu() * w.double()).sum()
        sums[len(ids) + k] = local.numel() / v.numel  # the share of the tensor this rank holds
    if optimizer._world() > 1:
        device = next((v.local.device for v in views.values()), torch.device("cpu"))
        moved = sums.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=optimizer._loss_group())
        sums = moved.cpu()
    return {sid: sums[k].item() / sums[len(ids) + k].item() for k, sid in enumerate(ids)}


def fingerprints_match(recorded: dict[str, float], current: dict[str, float]) -> list[str]:
    """The stable ids whose fingerprints differ (or exist on one side only); empty when they match."""
    names = sorted(set(recorded) | set(current))
    return [n for n in names if n not in recorded or n not in current
            or not math.isclose(recorded[n], current[n], rel_tol=1e-9, abs_tol=1e-9)]
