"""PyTorch FSDP2 (``fully_shard``): the shard provider, the wrapping helpers and the engine builder.

FSDP2 turns every parameter of a ``fully_shard``-ed module into a ``DTensor`` sharded ``Shard(0)``
on the mesh's shard dimension, with ``torch.chunk`` semantics and no padding in what
``to_local()`` returns: ``d0`` rows over ``ws`` ranks give ``ceil(d0 / ws)`` rows to each rank
from the first, the last non-empty rank gets the remainder, and ranks past the end get none
(1001 rows -> 501 + 500). ``to_local()`` is a view of FSDP's (padded) sharded buffer, which is
what each forward all-gathers, so in-place edits of it are what the next forward sees.
:class:`FSDPShards` hands that view to the optimizer, flattened, with its global flat offset
``first_row * prod(shape[1:])``.

Two FSDP2 behaviours the wrapping must respect (see :func:`apply_fsdp`):
    * The root module does not reshard after forward unless told to: with the default
      ``reshard_after_forward=None``, lazy initialisation switches the root's post-forward
      reshard off (``_FSDPState._lazy_init`` in ``torch/distributed/fsdp/_fully_shard/_fsdp_state.py``)
      so its parameters (embeddings, final norm, lm_head) stay gathered between forwards, and
      edits to their local shards are silently ignored. :func:`apply_fsdp` passes ``True``.
    * ``fully_shard`` replaces every ``Parameter`` by a new DTensor one (names are unchanged).
      An optimizer must be built on the wrapped module's parameters *after* wrapping; a list
      taken before still points at the old full tensors (and keeps them alive).

HSDP: a 2-D mesh ``(replicate, shard)`` gives placements ``(Replicate(), Shard(0))``; both replicas
hold the same rows, so the offsets are the same on both, and they stay equal because they apply
the same seeded update. A ZO step therefore needs no traffic across replica groups besides the
loss pair, which is averaged over every data-parallel rank (each holds a different micro-batch).

Meta-device initialisation: a model built on ``torch.device("meta")``
(:func:`zoscale.engines.meta_init.meta_causal_lm`) is sharded as it is, then each rank allocates
its shards and reads its rows from the safetensors files (:mod:`zoscale.engines.meta_init`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zoscale.engines.meta_init import fill_from_safetensors, meta_causal_lm, streams_from
from zoscale.engines.saving import save_pretrained
from zoscale.shards import LocalShards, ShardCapabilities, ShardView

__all__ = ["FSDPShards", "FSDPEngine", "FSDPBuilder", "apply_fsdp", "build_mesh", "chunk_rows",
           "find_blocks"]


def chunk_rows(rows: int, parts: int, index: int) -> tuple[int, int]:
    """``(first row, row count)`` of chunk ``index`` of ``torch.chunk(t, parts)`` along dim 0.

    Chunks hold ``ceil(rows / parts)`` rows; the tail chunks may be short or empty (an empty
    chunk starts at ``rows``).

    >>> [chunk_rows(1001, 2, r) for r in range(2)]
    [(0, 501), (501, 500)]
    >>> [chunk_rows(2, 4, r) for r in range(4)]
    [(0, 1), (1, 1), (2, 0), (2, 0)]
    """
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"chunk index {index} out of range for {parts} chunks")
    size = -(-rows // parts)
    start = min(index * size, rows)
    return start, min(size, rows - start)


def _is_dtensor(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


class FSDPShards:
    """Shard provider for a model wrapped by FSDP2 (``fully_shard``), with FSDP or HSDP meshes.

    DTensor parameters must be ``Shard(0)`` on exactly one mesh dimension and ``Replicate()`` on
    the others (what ``fully_shard`` produces for 1-D and HSDP meshes); other parameters are
    treated as replicas, as :class:`~zoscale.shards.LocalShards` does.

    Args:
        loss_group: the group over which the loss pair is averaged: every data-parallel rank,
            across replica groups under HSDP (None: the default group, right when the mesh
            spans the world).
        module: the wrapped module, if known: a plain parameter that is not one of its
            parameters is then rejected (an optimizer built before ``fully_shard`` replaced
            the parameters would otherwise edit tensors no forward reads).

    ``capabilities``: views are shards (rows of DTensors), and FSDP2 reduces gradients in
    backward (reduce-scatter over the shard dimension, all-reduce across HSDP replicas).

    Raises (from :meth:`view`):
        NotImplementedError: a DTensor with another layout (``Shard(d)`` with ``d > 0`` from a
            ``shard_placement_fn``, several sharded mesh dimensions as with tensor parallelism,
            ``Partial``).
        ValueError: a stale parameter (see ``module``).
    """

    capabilities = ShardCapabilities(whole_parameters=False, reduces_gradients=True, engine="fsdp")

    def __init__(self, loss_group: object | None = None, module: torch.nn.Module | None = None) -> None:
        self.loss_group = loss_group
        self._replicas = LocalShards(loss_group)
        self._known: set[int] | None = None if module is None else {id(p) for p in module.parameters()}

    def view(self, param: torch.Tensor) -> ShardView:
        """This rank's rows of ``param``, as a flat view of the DTensor's local tensor."""
        if not _is_dtensor(param):
            if self._known is not None and id(param) not in self._known:
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} is not a parameter of the FSDP-wrapped model: "
                    "fully_shard replaces every parameter, so build the optimizer on "
                    "engine.module.named_parameters() after wrapping"
                )
            return self._replicas.view(param)
        from torch.distributed.tensor import Replicate, Shard

        placements = tuple(param.placements)
        sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
        if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
            raise NotImplementedError(
                f"DTensor placements {placements}: zoscale handles Shard(0) on one mesh dimension "
                "(Replicate() on the others), as fully_shard / HSDP produce"
            )
        mesh = param.device_mesh
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise RuntimeError("this rank is not in the parameter's device mesh")
        dim = sharded[0]
        shape = param.shape
        start, rows = chunk_rows(shape[0], mesh.size(dim), coordinate[dim])
        with torch.no_grad():
            local = param.to_local().detach()
        if local.shape[0] != rows or tuple(local.shape[1:]) != tuple(shape[1:]):
            raise RuntimeError(
                f"local shard of shape {tuple(local.shape)} is not rows [{start}, {start + rows}) of a "
                f"{tuple(shape)} tensor: unexpected FSDP layout"
            )
        if not local.is_contiguous():
            raise ValueError(f"local shard of shape {tuple(local.shape)} is not contiguous")
        row = math.prod(shape[1:])
        return ShardView(local=local.view(-1), offset=start * row, numel=param.numel(), global_shape=shape,
                         replicated=False)


# ---------------------------------------------------------------------- wrapping
def find_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model``: the modules of its largest ``nn.ModuleList``.

    Hugging Face keeps decoder layers in one ``ModuleList`` (``model.model.layers``,
    ``model.model.decoder.layers``, ``transformer.h``, ...); the largest list (by parameter
    count) is taken, whatever its name. Empty if there is none.
    """
    best: list[torch.nn.Module] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def build_mesh(hsdp: tuple[int, int] | None = None, device_type: str | None = None) -> Any:
    """A device mesh over the world: 1-D for FSDP, or 2-D ``(replicate, shard)`` for HSDP.

    Args:
        hsdp: ``(replicas, shard size)`` with ``replicas * shard size == world size``; ranks
            ``[i * s, (i + 1) * s)`` form replica ``i`` (shard inside a node, replicate across
            nodes when ``s`` is the node size). None: plain FSDP over all ranks.
        device_type: "cuda" or "cpu" (default: cuda if available).

    Raises:
        ValueError: the HSDP shape does not match the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    world = dist.get_world_size()
    if hsdp is None:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    replicas, shard = hsdp
    if replicas * shard != world:
        raise ValueError(f"HSDP mesh {replicas} x {shard} does not match the world size {world}")
    return init_device_mesh(device_type, (replicas, shard), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: torch.nn.Module, mesh: Any, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block, then the root.

    Args:
        model: the loaded model (every rank holds the same weights).
        mesh: from :func:`build_mesh` (1-D FSDP or 2-D HSDP).
        param_dtype: compute dtype (e.g. ``torch.bfloat16``): shards keep their dtype (fp32),
            forwards all-gather a cast copy. None: compute in the shards' dtype.
        reshard_after_forward: for the blocks (the root always reshards: see the module
            docstring; False on the blocks keeps them gathered between the two SPSA forwards,
            which is wrong for the same reason, so leave it True for ZO training).

    Returns:
        ``model``, now holding DTensor parameters (new ``Parameter`` objects, same names).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in find_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=True, **kwargs)
    return model


def _mesh_group(mesh: Any) -> object | None:
    """A group of every rank of ``mesh`` (None when that is the whole world)."""
    ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if len(ranks) == dist.get_world_size():
        return None
    # new_group is collective over the world: every rank calls it with the same list.
    return dist.new_group(ranks)


# ---------------------------------------------------------------------- the engine
class FSDPEngine:
    """The trainer's view of an FSDP2-wrapped model (see :class:`zoscale.engines.base.Engine`).

    The optimizer must be built on ``module.named_parameters()`` with ``shards`` *after* this
    engine exists (``fully_shard`` replaced the parameters).

    Args:
        model: the loaded model; wrapped in place by :func:`apply_fsdp`.
        mesh: device mesh (default: :func:`build_mesh` of ``hsdp``).
        hsdp: ``(replicas, shard size)`` for HSDP when ``mesh`` is None.
        param_dtype: compute dtype for :class:`~torch.distributed.fsdp.MixedPrecisionPolicy`.
    """

    def __init__(self, model: torch.nn.Module, mesh: Any = None, hsdp: tuple[int, int] | None = None,
                 param_dtype: torch.dtype | None = None) -> None:
        self.mesh = mesh if mesh is not None else build_mesh(hsdp)
        weights = streams_from(model)
        self.module: torch.nn.Module = apply_fsdp(model, self.mesh, param_dtype=param_dtype)
        if weights is not None:  # built on the meta device: each rank reads its own rows
            fill_from_safetensors(self.module, weights, torch.device(self.mesh.device_type))
        self.loss_group = _mesh_group(self.mesh)
        self.shards = FSDPShards(self.loss_group, module=self.module)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size(self.loss_group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every data-parallel rank (both replica groups under HSDP), in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.loss_group)
        return tensor

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The consolidated weights on CPU, on rank 0 (empty elsewhere); collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_pretrained(self, path: Path, tokenizer: Any) -> None:
        """Consolidate the shards (collective) and write a Hugging Face folder on rank 0.

        A peft model is written as an adapter folder, gathering only the adapters (see
        :func:`zoscale.engines.saving.save_pretrained`).
        """
        save_pretrained(self, path, tokenizer, self.full_state_dict)


class FSDPBuilder:
    """Builds an :class:`FSDPEngine`. A model in a folder of safetensors files is built on the
    meta device and each rank reads only its rows (``stream_weights``,
    :mod:`zoscale.engines.meta_init`); others (the tiny models, built in code; peft models) are
    loaded whole on every rank first.

    Args:
        hsdp: ``(replicas, shard size)`` for HSDP, None for FSDP over the world.
        param_dtype: compute dtype (bf16 compute over fp32 shards), None for the shards' dtype.
    """

    name = "fsdp"
    load_dtype = torch.float32
    """The dtype the model is loaded in: FSDP2 keeps fp32 shards and computes in ``param_dtype``."""

    def __init__(self, hsdp: tuple[int, int] | None = None, param_dtype: torch.dtype | None = None) -> None:
        self.hsdp = hsdp
        self.param_dtype = param_dtype

    #: Build models that have safetensors files on the meta device (see the class docstring).
    stream_weights = True

    def loading(self) -> contextlib.AbstractContextManager[None]:
        """Nothing special: the whole model is loaded on each rank (see :meth:`model_from_files`)."""
        return contextlib.nullcontext()

    def model_from_files(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module | None:
        """The model of ``folder`` on the meta device; :meth:`build` reads each rank's rows."""
        return meta_causal_lm(folder, dtype)

    def build(self, model: torch.nn.Module) -> FSDPEngine:
        return FSDPEngine(model, hsdp=self.hsdp, param_dtype=self.param_dtype)

