"""Saving the final model, the same way on every engine.

A peft model is written as its adapter folder (:func:`zoscale.peft.save_adapter`, which gathers
only the adapters), anything else as a Hugging Face folder written by rank 0 from the full state
dict. Getting that state dict is the one engine-specific part: each engine's ``save_pretrained``
calls :func:`save_pretrained` with its own ``full_state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from zoscale.engines.base import Engine

__all__ = ["save_pretrained"]


def save_pretrained(engine: Engine, path: str | Path, tokenizer: Any,
                    full_state_dict: Callable[[], dict[str, torch.Tensor] | None]) -> None:
    """Write ``engine.module`` (and ``tokenizer``, if given) to ``path``; collective, rank 0 writes.

    Args:
        engine: the engine whose ``module`` is saved; ``rank`` says who writes.
        path: the output folder.
        tokenizer: saved next to the weights (None: not saved).
        full_state_dict: the consolidated weights on rank 0 (collective: called on every rank;
            None: the module's own ``state_dict()``, right when every rank holds the whole model).
            Not called for a peft model.
    """
    from zoscale.peft import is_peft_model, save_adapter

    if is_peft_model(engine.module):
        save_adapter(engine.module, path, tokenizer)
        return
    state = full_state_dict()
    if engine.rank == 0:
        engine.module.save_pretrained(path, state_dict=_without_tied_copies(engine.module, state))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _without_tied_copies(module: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """``state`` without the second name of a tied parameter (``lm_head.weight`` when it is the
    input embedding), as ``PreTrainedModel.save_pretrained`` writes a model's own state dict.

    transformers drops a tied name by finding two keys on one storage; a consolidated state dict
    (FSDP2's ``get_model_state_dict`` with ``cpu_offload``) holds separate copies, so it would
    write the tensor twice, and a folder unlike the one the other engines write.
    """
    if state is None:
        return None
    first: dict[int, str] = {}
    dropped = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first and name in state and first[id(p)] in state:
            dropped.add(name)
        first.setdefault(id(p), name)
    return {k: v for k, v in state.items() if k not in dropped}
