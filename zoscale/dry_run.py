"""True-scale dry runs: a 30B-70B model sharded for many ranks, checked without allocating a weight.

The model is built from its config on the meta device and sharded as each engine would shard it
for ``world`` ranks, rank by rank, on torch's fake process group (no communication, no memory):

* FSDP2: ``fully_shard`` itself (one call on a module holding parameters of the model's names and
  shapes: the layout of a parameter does not depend on how parameters are grouped);
* DeepSpeed ZeRO-3: each parameter gets the attributes ``zero.Init`` gives it, its partition
  sized by DeepSpeed's own padding arithmetic (``Init._aligned_size``), every parameter
  partitioned (a persistence threshold of 0; persistent parameters are whole replicas anyway).

On each rank a MeZO optimizer is built over the sharded parameters with zoscale's provider for
the engine, and its shard entries are what is checked (:func:`check_layout`): every tensor's views
tile its global flat indices exactly once across the ranks, the stable ids are unique, and the
noise keys differ per tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from zoscale.noise import noise_key
from zoscale.shards import canonical_name

__all__ = ["meta_model", "shard_views", "check_layout", "LayoutReport", "ENGINES"]

#: Engines a dry run shards for.
ENGINES = ("fsdp", "zero3")


def meta_model(config: Any) -> torch.nn.Module:
    """The model of ``config`` on the meta device (no weight allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@contextlib.contextmanager
def _fake_rank(rank: int, world: int) -> Iterator[None]:
    """torch's fake process group as ``rank`` of ``world`` (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _standin(named: list[tuple[str, torch.Size]]) -> tuple[torch.nn.Module, list[str]]:
    """A module with one meta parameter per model parameter (names kept aside: dots are not allowed)."""
    root = torch.nn.Module()
    for i, (_, shape) in enumerate(named):
        root.register_parameter(f"p{i}", torch.nn.Parameter(torch.empty(shape, device="meta")))
    return root, [name for name, _ in named]


def _partition_size(param: torch.Tensor, world: int) -> int:
    """The partition size ``zero.Init`` gives ``param`` on ``world`` ranks: DeepSpeed's own
    ``Init._aligned_size`` (the padding to a multiple of the ranks), divided by the ranks."""
    from deepspeed.runtime.zero.partition_parameters import Init

    class Sizer:
        _aligned_size, _padding_size = Init._aligned_size, Init._padding_size

        def _partition_world_size(self, _: torch.Tensor) -> int:
            return world

    return Sizer()._aligned_size(param) // world


def _zero3_params(named: list[tuple[str, torch.Size]], world: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Meta parameters with the attributes ``zero.Init`` gives a partitioned parameter."""
    out = []
    for name, shape in named:
        p = torch.nn.Parameter(torch.empty(0, device="meta"))
        p.ds_numel, p.ds_shape, p.ds_process_group, p.ds_persist = shape.numel(), shape, None, False
        p.ds_tensor = torch.empty(_partition_size(p, world), device="meta")
        out.append((name, p))
    return out


def _entries(engine: str, named: list[tuple[str, torch.Size]], world: int) -> list[Any]:
    """This (fake) rank's shard entries of a MeZO optimizer over the sharded parameters."""
    from zoscale.optim import build_optimizer

    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from zoscale.engines.fsdp import FSDPShards

        from torch.distributed.device_mesh import init_device_mesh

        module, names = _standin(named)
        # A mesh unequal to the other ranks' (its dim name): DTensor reuses the spec of an equal
        # mesh, and equal meshes of two fake ranks differ only in the coordinate it would keep.
        rank = dist.get_rank()
        fully_shard(module, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=(f"rank{rank}",)))
        params = list(zip(names, module.parameters()))
        shards: Any = FSDPShards(module=module)
    elif engine == "zero3":
        from zoscale.engines.deepspeed import DeepSpeedShards

        params, shards = _zero3_params(named, world), DeepSpeedShards()
    else:
        raise ValueError(f"unknown engine {engine!r}; dry runs shard for {', '.join(ENGINES)}")
    return build_optimizer("mezo", params, {"lr": 1e-6, "eps": 1e-3}, shards=shards).shard_entries()


def shard_views(model: torch.nn.Module, engine: str, world: int) -> dict[str, list[tuple[int, int, bool]]]:
    """Stable id -> ``(offset, length, replicated)`` of every rank's view, ranks in order (a rank
    whose share of a tensor is empty has none)."""
    named = [(n, p.shape) for n, p in model.named_parameters()]
    views: dict[str, list[tuple[int, int, bool]]] = {}
    for rank in range(world):
        with _fake_rank(rank, world):
            for e in _entries(engine, named, world):
                views.setdefault(e.stable_id, []).append((e.view.offset, e.view.local.numel(), e.view.replicated))
    return views


@dataclass
class LayoutReport:
    tensors: int
    elements: int
    views: int
    largest_view: int


def _tiles(sid: str, numel: int, pieces: list[tuple[int, int, bool]]) -> None:
    if all(replicated for *_, replicated in pieces):  # replicas: each holds the whole tensor
        bad = [p for p in pieces if p[:2] != (0, numel)]
        if bad:
            raise AssertionError(f"{sid}: a replica view {bad[0][:2]} is not the whole tensor of {numel} elements")
        return
    end = 0
    for offset, length, _ in sorted(pieces):
        if offset != end and length:
            raise AssertionError(f"{sid}: global indices [{min(offset, end)}, {max(offset, end)}) are "
                                 f"{'held twice' if offset < end else 'held by no rank'}")
        end = max(end, offset + length)
    if end != numel:
        raise AssertionError(f"{sid}: the views end at {end}, the tensor has {numel} elements")


def check_layout(model: torch.nn.Module, engine: str, world: int, seed: int = 0) -> LayoutReport:
    """Shard ``model`` (meta) for ``world`` ranks of ``engine`` and check zoscale's views of it.

    Raises:
        AssertionError: a tensor's views do not tile it exactly once, or stable ids / noise keys
            collide (named).
    """
    numels = {}
    for name, p in model.named_parameters():
        sid = canonical_name(name)
        if sid in numels:
            raise AssertionError(f"stable id {sid!r} names two tensors")
        numels[sid] = p.numel()
    views = shard_views(model, engine, world)
    if set(views) != set(numels):
        raise AssertionError(f"views for {sorted(set(views) ^ set(numels))[:3]}, which are not the model's tensors")
    for sid, pieces in views.items():
        # A rank whose share of a tensor is empty (FSDP2's last rows) has no entry for it.
        if len(pieces) > world or (pieces[0][2] and len(pieces) != world):
            raise AssertionError(f"{sid}: {len(pieces)} views on {world} ranks")
        _tiles(sid, numels[sid], pieces)
    for step, query in ((0, 0), (1, 0), (0, 1)):
        keys = {noise_key(seed, step, query, sid) for sid in numels}
        if len(keys) != len(numels):
            raise AssertionError(f"noise keys collide at step {step} query {query}")
    flat = [length for pieces in views.values() for _, length, _ in pieces]
    return LayoutReport(tensors=len(numels), elements=sum(numels.values()), views=len(flat), largest_view=max(flat))
