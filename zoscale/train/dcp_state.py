"""An optimizer's shards and state as ``torch.distributed.checkpoint`` items at their global place.

A rank holds global flat elements ``[offset, offset + n)`` of each trainable tensor (its
:class:`~zoscale.shards.ShardView`), and state shaped like them (master weights, ZO-Adam's moments,
ZO-SGD-MMT's momentum) or like the rows they touch (LOZO-M's ``m x r`` momentum factor). DCP knows
DTensor and ShardedTensor layouts, not these: :class:`Chunk` tells its planners where a local
tensor sits in the global one, so each rank writes its chunk once and any other layout reads the
region it needs (``create_read_items_for_chunk_list`` reshards). What is saved:

* ``shards/<id>``: the parameter's flat chunk, global size ``(numel,)``;
* ``state/<id>/<name>``: a state tensor, the same flat chunk, or rows ``[first, last)`` of a
  global ``(rows, r)`` factor. A row cut by a shard boundary is held (identically) by both
  neighbours; the second one leaves it out, so the chunks never overlap;
* ``optimizer``: everything else of ``state_dict()`` (param groups, the step log and counters,
  per-tensor numbers such as ZO-Adam's step or Sparse MeZO's threshold), the same on every rank;
* ``rank/<r>``: what only that rank holds and no global layout describes (the hybrid's
  first-order torch-optimizer state): it loads on the same world size only.

Replicas (one process, ZeRO 0-2, HSDP's replica groups) write identical chunks; DCP keeps one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from zoscale.optim.lowrank import row_range

__all__ = ["Chunk", "ChunkSavePlanner", "ChunkLoadPlanner", "saved_state", "loading_state", "assemble",
           "TORCH_KEYS"]

#: The keys of ``state_dict()`` that every zoscale optimizer has and that are the same on every rank.
TORCH_KEYS = ("param_groups", "zo")


@dataclass
class Chunk:
    """``local`` is the region ``[offsets, offsets + local.shape)`` of a tensor of ``global_size``."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    global_size: tuple[int, ...]

    def size(self) -> torch.Size:  # DCP's load plan checks this against the saved size
        return torch.Size(self.global_size)

    def _storage(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.shape)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        if self.local.numel() == 0:
            return []
        data = TensorWriteData(chunk=self._storage(), properties=TensorProperties.create_from_tensor(self.local),
                               size=self.size())
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(self.offsets)), type=WriteItemType.SHARD,
                          tensor_data=data)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._storage()] if self.local.numel() else []


def _local(obj: Any) -> Any:
    return obj.local if isinstance(obj, Chunk) else obj


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, reading a :class:`Chunk`'s local tensor."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        return _local(self.state_dict[index.fqn])


class ChunkLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, writing into a :class:`Chunk`'s local tensor in place."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        # The default first materialises meta tensors, replacing objects it does not know (a
        # Chunk) with None; every tensor here is allocated already.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _local(self.state_dict[index.fqn])


def _flat(view: Any, tensor: torch.Tensor) -> Chunk:
    return Chunk(tensor.view(-1), (view.offset,), (view.numel,))


def _rows(view: Any) -> tuple[int, int, int]:
    """(first row, last row + 1, first row to write) of the 2-D tensor that ``view`` touches."""
    cols = view.global_shape[-1]
    first, last = row_range(view.offset, view.local.numel(), cols)
    return first, last, first + (1 if view.offset % cols else 0)


def _state_chunk(entry: Any, name: str, tensor: torch.Tensor) -> Chunk:
    view = entry.view
    if tuple(tensor.shape) == (view.local.numel(),):
        return _flat(view, tensor)
    if len(view.global_shape) == 2 and tensor.dim() == 2:
        first, last, write_from = _rows(view)
        if tensor.shape[0] == last - first:
            return Chunk(tensor[write_from - first:], (write_from, 0), (view.global_shape[0], tensor.shape[1]))
    raise ValueError(f"optimizer state {name!r} of {entry.stable_id!r} has shape {tuple(tensor.shape)}: neither "
                     f"the shard's {view.local.numel()} elements nor its rows of {tuple(view.global_shape)}, so it "
                     "has no place in a checkpoint's global layout")


def _indices(optimizer: Any) -> dict[int, Any]:
    """Torch's state-dict index of each trainable parameter -> its shard entry."""
    entries = {id(e.param): e for e in optimizer.shard_entries()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {k: entries[id(p)] for k, p in enumerate(params) if id(p) in entries}


def saved_state(optimizer: Any, rank: int) -> dict[str, Any]:
    """What :func:`torch.distributed.checkpoint.save` writes for this rank (see the module docstring)."""
    sd = optimizer.state_dict()
    out: dict[str, Any] = {f"shards/{e.stable_id}": _flat(e.view, e.view.local) for e in optimizer.shard_entries()}
    plain: dict[str, dict[str, Any]] = {}
    for k, entry in _indices(optimizer).items():
        for name, value in sd["state"].get(k, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"state/{entry.stable_id}/{name}"] = _state_chunk(entry, name, value)
            else:
                plain.setdefault(entry.stable_id, {})[name] = value
    out["optimizer"] = {**{key: sd[key] for key in TORCH_KEYS}, "plain_state": plain}
    own = {key: value for key, value in sd.items() if key not in ("state", *TORCH_KEYS)}
    if own:
        out[f"rank/{rank}"] = own
    return out


def _allocate(entry: Any, key: str, size: torch.Size, dtype: torch.dtype) -> Chunk:
    """The chunk this rank reads of the saved state tensor ``key`` of global ``size``."""
    view = entry.view
    device = view.local.device
    if tuple(size) == (view.numel,):
        return _flat(view, torch.empty(view.local.numel(), dtype=dtype, device=device))
    if len(size) == 2 and len(view.global_shape) == 2 and size[0] == view.global_shape[0]:
        first, last, _ = _rows(view)
        return Chunk(torch.empty(last - first, size[1], dtype=dtype, device=device), (first, 0), tuple(size))
    raise ValueError(f"checkpoint item {key} has size {tuple(size)}, which fits neither the shape "
                     f"{tuple(view.global_shape)} of {entry.stable_id!r} nor its rows")


def loading_state(optimizer: Any, metadata: Any, rank: int, where: str) -> dict[str, Any]:
    """The state dict that :func:`torch.distributed.checkpoint.load` fills for this rank: the
    shards in place in the parameters, the state tensors newly allocated (as saved).

    Raises:
        ValueError: the checkpoint's tensors do not match this model (named), before any is read.
    """
    saved = metadata.state_dict_metadata
    entries = {e.stable_id: e for e in optimizer.shard_entries()}
    have = {key[len("shards/"):] for key in saved if key.startswith("shards/")}
    missing, extra = sorted(set(entries) - have), sorted(have - set(entries))
    if missing or extra:
        raise ValueError(f"checkpoint {where} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out: dict[str, Any] = {}
    for sid, entry in entries.items():
        md = saved[f"shards/{sid}"]
        if tuple(md.size) != (entry.view.numel,) or md.properties.dtype != entry.view.local.dtype:
            raise ValueError(f"checkpoint {where}: {sid} is {tuple(md.size)} {md.properties.dtype}, the model has "
                             f"{entry.view.numel} elements of {entry.view.local.dtype}")
        out[f"shards/{sid}"] = _flat(entry.view, entry.view.local)
    for key, md in saved.items():
        if key.startswith("state/"):
            sid, _, name = key[len("state/"):].rpartition("/")
            out[key] = _allocate(entries[sid], key, md.size, md.properties.dtype)
    out["optimizer"] = None
    if f"rank/{rank}" in saved:
        out[f"rank/{rank}"] = None
    return out


def assemble(optimizer: Any, loaded: dict[str, Any], rank: int) -> dict[str, Any]:
    """The optimizer's ``state_dict()`` from what :func:`loading_state`'s dict received."""
    by_id: dict[str, dict[str, Any]] = {sid: dict(values) for sid, values in loaded["optimizer"]["plain_state"].items()}
    for key, value in loaded.items():
        if key.startswith("state/"):
            sid, _, name = key[len("state/"):].rpartition("/")
            by_id.setdefault(sid, {})[name] = value.local
    state = {k: by_id[e.stable_id] for k, e in _indices(optimizer).items() if e.stable_id in by_id}
    sd = {"state": state, **{key: loaded["optimizer"][key] for key in TORCH_KEYS}}
    sd.update(loaded.get(f"rank/{rank}") or {})
    return sd
