"""Shard views: what a ZO optimizer sees of a trainable tensor.

Optimizers never see an engine. For each trainable parameter they ask a *shard provider* for a
:class:`ShardView`: the flat local tensor this rank edits in place, where it sits in the
unsharded flattened tensor (``offset``, ``numel``), the tensor's global shape, and whether this
rank holds a full replica. Noise is generated for global flat indices
``[offset, offset + local.numel())`` (see :mod:`zoscale.noise`), so every provider yields the same
trajectory.

Providers:
    * :class:`LocalShards` (here): one process, or data-parallel replicas (DDP, ZeRO 0-2).
    * DeepSpeed ZeRO-3 and FSDP2 providers live in ``zoscale.engines``.

A provider also names the process group over which the loss pair is averaged
(``loss_group``): the data-parallel group; ``None`` means the default group when
``torch.distributed`` is initialised, and no communication otherwise. And it states what its
layout lets code assume (``capabilities``, a :class:`ShardCapabilities`), so that an optimizer
that needs whole tensors or backpropagates asks the provider instead of probing parameters
for engine attributes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

__all__ = ["ShardView", "ShardCapabilities", "ShardProvider", "LocalShards", "canonical_name", "WRAPPER_PREFIXES"]

# Name fragments that wrappers insert and that must not change a tensor's identity.
WRAPPER_PREFIXES: tuple[str, ...] = (
    "module.",  # DeepSpeed engine, DDP
    "_orig_mod.",  # torch.compile
    "_fsdp_wrapped_module.",  # FSDP1
    "_checkpoint_wrapped_module.",  # activation checkpointing
    "base_model.model.",  # peft
)
_PREFIX_RE = re.compile("|".join(re.escape(p) for p in WRAPPER_PREFIXES))


def canonical_name(name: str) -> str:
    """The wrapper-independent name of a parameter, used as its stable noise id.

    Strips the name fragments that DeepSpeed, DDP, FSDP, activation checkpointing, peft and
    ``torch.compile`` insert, wherever they occur (wrappers nest).

    >>> canonical_name("module._orig_mod.base_model.model.model.layers.0.q_proj.lora_A.default.weight")
    'model.layers.0.q_proj.lora_A.default.weight'
    """
    return _PREFIX_RE.sub("", name)


@dataclass(frozen=True)
class ShardView:
    """One rank's part of one trainable tensor.

    Attributes:
        local: contiguous 1-D tensor sharing storage with the parameter; edits are seen by the
            next forward. Holds global flat elements ``[offset, offset + local.numel())``.
        offset: global flat index of ``local[0]`` in the unsharded, flattened tensor.
        numel: number of elements of the unsharded tensor.
        global_shape: shape of the unsharded tensor (LOZO / Sparse MeZO need rows and columns).
        replicated: True when this rank holds the whole tensor (a replica), False for a shard.
        after_write: called by the optimizer after each pass that wrote ``local`` (perturb,
            update, restore), for providers that must mirror ``local`` into another copy of the
            same values (e.g. a ZeRO-3 parameter kept gathered by the persistence threshold,
            whose partition must stay in sync). ``None``: nothing to do.
    """

    local: torch.Tensor
    offset: int
    numel: int
    global_shape: torch.Size
    replicated: bool
    after_write: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.local.dim() != 1 or not self.local.is_contiguous():
            raise ValueError(f"ShardView.local must be a contiguous 1-D tensor, got shape {tuple(self.local.shape)}")
        if self.offset < 0 or self.offset + self.local.numel() > self.numel:
            raise ValueError(
                f"ShardView range [{self.offset}, {self.offset + self.local.numel()}) "
                f"outside tensor of {self.numel} elements"
            )
        if math.prod(self.global_shape) != self.numel:
            raise ValueError(f"global_shape {tuple(self.global_shape)} does not have {self.numel} elements")


@dataclass(frozen=True)
class ShardCapabilities:
    """What a shard provider's layout guarantees, for every parameter it is asked about.

    Attributes:
        whole_parameters: every view is the whole tensor, in the parameter's own storage
            (``replicated``, ``offset`` 0, ``local.numel() == numel``): what forward-mode AD or a
            backward pass into the module's own tensors needs. False: views may be shards (ZeRO-3
            partitions, FSDP2 rows), even where one happens to cover a whole tensor.
        reduces_gradients: the engine reduces ``.grad`` over the data-parallel ranks during
            ``loss.backward()`` (FSDP2's reduce-scatter, and the all-reduce across replicas
            under HSDP), so an optimizer that backpropagates must not reduce it again. False:
            after ``loss.backward()`` each rank holds its own micro-batch's gradient (replicas,
            DeepSpeed without its own optimizer, whose reduction hooks are then absent).
        engine: the registry name of the engine the layout comes from (``local``,
            ``deepspeed``, ``fsdp``; see ``zoscale.engines.registry``), for messages.
    """

    whole_parameters: bool
    reduces_gradients: bool
    engine: str


@runtime_checkable
class ShardProvider(Protocol):
    """Maps a parameter to this rank's :class:`ShardView`."""

    loss_group: object | None
    capabilities: ShardCapabilities
    """What every view of this provider guarantees (see :class:`ShardCapabilities`)."""

    def view(self, param: torch.Tensor) -> ShardView:
        """The view of ``param`` on this rank."""
        ...


class LocalShards:
    """Provider for a process that holds every parameter whole (single process, DDP replicas).

    Args:
        loss_group: process group over which the loss pair is averaged (None: the default
            group if ``torch.distributed`` is initialised).
    """

    capabilities = ShardCapabilities(whole_parameters=True, reduces_gradients=False, engine="local")

    def __init__(self, loss_group: object | None = None) -> None:
        self.loss_group = loss_group

    def view(self, param: torch.Tensor) -> ShardView:
        data = param.data
        if not data.is_contiguous():
            raise ValueError(
                f"parameter of shape {tuple(data.shape)} is not contiguous; a ZO optimizer edits "
                "parameters in place through a flat view, so make it contiguous before building the optimizer"
            )
        return ShardView(
            local=data.view(-1), offset=0, numel=data.numel(), global_shape=data.shape, replicated=True
        )
