"""Making every rank start from rank 0's weights before ``ZOTrainer`` shards or replicates a model.

A Trainer user loads the model on every rank and then adds what is drawn at random: peft's
adapters (LoRA's ``A``, virtual-token embeddings), a new classification head. Unless the script
seeded every rank alike, those differ from rank to rank. DDP settles it by broadcasting the whole
model from rank 0 at construction; ZeRO-3 by broadcasting each parameter it converts. FSDP2's
``fully_shard`` does neither: each rank keeps its slice of its own tensor, so the sharded model
would be rows of different models, and no error would say so.

:func:`make_ranks_agree` does what DDP does at the cost of one small collective: per parameter
and buffer, a float64 fingerprint (sum and sum of squares) is gathered from every rank, and only
the tensors whose fingerprints differ are broadcast from rank 0. The pretrained weights, equal on
every rank, cost a pass over the local tensors and no traffic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["make_ranks_agree"]


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [(n, t) for n, t in named if t.device.type != "meta" and t.numel() > 0]


def _fingerprints(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[len(tensors), 2]`` float64: each tensor's sum and sum of squares."""
    rows = [torch.stack((t.detach().double().sum(), t.detach().double().square().sum())) for t in tensors]
    return torch.stack(rows).to(device) if rows else torch.zeros(0, 2, dtype=torch.float64, device=device)


@torch.no_grad()
def make_ranks_agree(module: torch.nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Broadcast from rank 0 every parameter or buffer of ``module`` that differs across ``group``'s ranks.

    Collective over ``group`` (default: the world); every rank must hold the same tensors by name
    and shape (whole, not yet sharded). A no-op without ``torch.distributed`` or on one rank.

    Returns:
        The names of the tensors that differed and were overwritten with rank 0's values.

    Raises:
        ValueError: the ranks hold different parameter names or shapes (they loaded different models).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return []
    named = _tensors(module)
    layout = [(n, tuple(t.shape)) for n, t in named]
    layouts: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    if any(other != layout for other in layouts):
        raise ValueError("ZOTrainer: the ranks hold different models (parameter names or shapes differ); "
                         "every rank must load the same model")
    device = _comm_device(group)
    mine = _fingerprints([t for _, t in named], device)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    differ = (low != high).any(dim=1).tolist()
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for (_, t), bad in zip(named, differ):
        if bad:
            _broadcast(t.data, src, group, device)
    return [name for (name, _), bad in zip(named, differ) if bad]


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the backend takes tensors: NCCL the current GPU, gloo the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Broadcast ``t`` in place, through a copy on ``device`` when it lives elsewhere (a model
    still on the CPU before FSDP2 moves its shards to the GPU)."""
    if t.device == device:
        dist.broadcast(t, src=src, group=group)
        return
    buf = t.to(device)
    dist.broadcast(buf, src=src, group=group)
    t.copy_(buf)
