"""Forward passes the task families share: the last positions' logits of a left-padded batch.

Every batch zoscale builds is padded on the left, so the answer position (classification) and the
option tokens (candidates, generation targets) sit at the end of every row. A forward then only
needs the logits of the last few positions, which transformers' causal LMs compute alone when
given ``logits_to_keep``: the lm_head over 49k words is most of a small model's forward.

Position ids are counted from each row's first real token, as if the row were unpadded
(learned-position models such as OPT need this; rotary models do not mind), so a row scores the
same whatever padding its batch has, which keeps sharded runs (smaller per-rank batches, other
padding) on the single-process trajectory.

A ``peft.PeftModel`` gets the base model's keyword arguments (peft passes them through).
Virtual tokens keep the positions consistent with padding: prefix tuning's key/value prefix
occupies positions ``0..n-1`` (peft shifts the given position ids by ``n``); prompt tuning's
prepended embeddings take positions ``0..n-1`` and the row's real tokens follow at ``n..`` (peft
drops given position ids for prompt tuning, so they are computed from the extended attention mask
inside the base model's forward).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["last_logits", "label_logits", "option_logprobs"]


def _forward_target(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The module whose forward receives the keyword arguments, and the active peft config (or None).

    Wrappers such as a DeepSpeed engine forward ``(*args, **kwargs)`` to ``.module``; a
    ``peft.PeftModel`` forwards its extra keyword arguments to the base model.
    """
    inner = getattr(model, "module", model)
    peft_config = getattr(inner, "active_peft_config", None)
    if peft_config is not None:
        return inner.get_base_model(), peft_config
    return inner, None


@contextlib.contextmanager
def _positions_from_mask(module: torch.nn.Module) -> Iterator[None]:
    """While active, ``module``'s forward gets ``position_ids`` counted from its attention mask."""

    def hook(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and mask is not None and mask.dim() == 2:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def last_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: int = 1) -> torch.Tensor:
    """Logits of the last ``keep`` positions of a left-padded batch, ``[B, keep, V]``.

    Only those positions are computed when the model's forward accepts ``logits_to_keep``
    (transformers' causal LMs do); otherwise the full logits are sliced.

    Args:
        model: A causal LM returning an output with ``.logits``.
        batch: ``input_ids`` and ``attention_mask`` (``[B, T]``, padding on the left); other keys
            are ignored.
        keep: How many trailing positions to return.
    """
    device = next(model.parameters()).device
    attention_mask = batch["attention_mask"].to(device)
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "attention_mask": attention_mask}
    target, peft_config = _forward_target(model)
    parameters = inspect.signature(target.forward).parameters
    # Prompt-tuning-like methods prepend embeddings (prefix tuning's virtual tokens are a cache).
    prepends = peft_config is not None and peft_config.is_prompt_learning and peft_config.peft_type not in (
        "PREFIX_TUNING", "CARTRIDGE")
    if "position_ids" in parameters and not prepends:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = keep
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    positions = _positions_from_mask(target) if prepends and "position_ids" in parameters else contextlib.nullcontext()
    with positions:
        logits = model(**kwargs).logits
    return logits[:, -keep:, :]


def label_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_ids: Sequence[int]) -> torch.Tensor:
    """Logits of single-token label words at the last position of a left-padded batch, ``[B, k]``."""
    logits = last_logits(model, batch, keep=1)
    index = torch.as_tensor(list(label_ids), device=logits.device)
    return logits[:, -1, :].index_select(-1, index)


def option_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean log-probability of each row's option tokens (its last ``option_lengths[i]`` tokens), ``[B]``.

    The logits that predict the last ``K`` tokens sit at positions ``-K-1 .. -2``, so one forward
    keeps ``K + 1`` positions, ``K`` the longest option of the batch. Log-probabilities are taken
    in float32.

    Args:
        model: A causal LM.
        batch: ``input_ids``, ``attention_mask`` and ``option_lengths`` (``[B]``, >= 1), as made by
            :func:`zoscale.data.tasks.encoding.collate_options`.
    """
    lengths = batch["option_lengths"]
    width = int(lengths.max())
    logits = last_logits(model, batch, keep=width + 1)[:, :-1, :].float()
    targets = batch["input_ids"][:, -width:].to(logits.device)
    token_logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # Right-aligned options: position j of the window is an option token iff j >= width - length.
    columns = torch.arange(width, device=logits.device)
    mask = columns.unsqueeze(0) >= (width - lengths.to(logits.device)).unsqueeze(1)
    return (token_logp * mask).sum(-1) / lengths.to(logits.device)
