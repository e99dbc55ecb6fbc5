"""MeZO's SST-2 prompt task: sentiment classification as next-word prediction.

A sentence ``<S>`` becomes the prompt ``"<S> It was"``, and the model's class is whichever label
word it scores higher as the next token: ``" terrible"`` (0) or ``" great"`` (1). The loss is the
cross-entropy over the label words' logits at that position (MeZO's classification loss), so a
forward pass only needs the logits of the last position.

Batches are padded on the left, which puts every prompt's answer position at the last index.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

__all__ = ["SST2Task", "evaluate_accuracy", "label_logits", "loss_fn"]


@dataclass(frozen=True)
class SST2Task:
    """The SST-2 prompt ``<S> It was [terrible|great]`` (MeZO, Malladi et al. 2023, Table 13).

    Attributes:
        label_words: One word per class, in label order, each with its leading space; each must
            be a single token for the tokenizer in use. ``(" bad", " good")`` is a common
            alternative.
        suffix: Text appended to the sentence; the label word would follow it.
    """

    label_words: tuple[str, ...] = (" terrible", " great")
    suffix: str = " It was"

    def __post_init__(self) -> None:
        if len(self.label_words) < 2:
            raise ValueError(f"Invalid label_words: {self.label_words!r} (need at least two)")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"Invalid label_words: {self.label_words!r} (duplicates)")

    @property
    def labels(self) -> tuple[int, ...]:
        """The valid labels, ``0 .. len(label_words) - 1``."""
        return tuple(range(len(self.label_words)))

    def prompt(self, sentence: str) -> str:
        """The prompt text for one sentence: ``f"{sentence} It was"``."""
        return sentence + self.suffix

    def label_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token id of each label word, in label order.

        Args:
            tokenizer: The model's tokenizer.

        Returns:
            One id per label word.

        Raises:
            ValueError: A label word is not exactly one token for this tokenizer, or two label
                words share a token.
        """
        ids = []
        for word in self.label_words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ValueError(
                    f"Label word {word!r} is {len(tokens)} tokens {tokens} for this tokenizer, not one; "
                    "choose label words that are single tokens"
                )
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"Label words {self.label_words!r} map to repeated token ids {ids}")
        return ids

    def collate(
        self, rows: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> dict[str, torch.Tensor]:
        """Tokenize and left-pad a batch of rows.

        Each prompt is the tokenizer's leading special tokens (if it adds any, e.g. OPT's
        ``</s>``), the sentence, then the suffix. A prompt longer than ``max_length`` loses
        tokens from the start of the sentence; the special tokens and the suffix are kept, so
        the answer position stays the last one.

        Args:
            rows: Rows ``{"sentence": str, "label": int}``.
            tokenizer: The model's tokenizer; it needs a pad token (any id works, padded
                positions are masked).
            max_length: Maximum prompt length in tokens.

        Returns:
            ``input_ids`` and ``attention_mask`` (``[B, T]``, ``T`` the longest prompt, padding
            on the left) and ``labels`` (``[B]`` class indices).

        Raises:
            ValueError: Empty batch, no pad token, a label out of range, or ``max_length`` too
                short to hold the special tokens, the suffix and one sentence token.
        """
        if not rows:
            raise ValueError("Cannot collate an empty batch")
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)")
        labels = [row["label"] for row in rows]
        for label in labels:
            if label not in self.labels:
                raise ValueError(f"Label {label!r} not in {list(self.labels)}")

        sentences = [row["sentence"] for row in rows]
        prefix = _special_prefix(tokenizer)
        sentence_ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        joint_ids = tokenizer([self.prompt(s) for s in sentences], add_special_tokens=False)["input_ids"]
        fallback_suffix = None
        sequences = []
        for sentence, joint in zip(sentence_ids, joint_ids):
            # Split the jointly tokenized prompt where the sentence's own tokens end; if the
            # tokenizer merges across that boundary, use the separately tokenized suffix.
            if joint[: len(sentence)] == sentence and len(joint) > len(sentence):
                suffix = joint[len(sentence) :]
            else:
                if fallback_suffix is None:
                    fallback_suffix = tokenizer(self.suffix, add_special_tokens=False)["input_ids"]
                suffix = fallback_suffix
            room = max_length - len(prefix) - len(suffix)
            if room < 1:
                raise ValueError(
                    f"max_length {max_length} leaves no room for the sentence: the special tokens and "
                    f"{self.suffix!r} take {len(prefix) + len(suffix)} tokens"
                )
            sequences.append(prefix + sentence[-room:] + suffix)

        width = max(len(seq) for seq in sequences)
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before the text by default (e.g. a BOS), possibly none.

    Special tokens a tokenizer appends (an EOS) are left out: nothing may follow the answer
    position.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    start = _find(special, plain)
    return special[:start] if start is not None else []


def _find(haystack: list[int], needle: list[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return None


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


def label_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_ids: Sequence[int]) -> torch.Tensor:
    """Logits of the label words at the last position of a left-padded batch.

    Position ids are counted from each row's first real token, as if the row were unpadded
    (learned-position models such as OPT need this; rotary models do not mind). Only the last
    position's logits are computed when the model's forward accepts ``logits_to_keep``
    (transformers' causal LMs do); otherwise the full logits are sliced.

    A ``peft.PeftModel`` gets the base model's keyword arguments (peft passes them through).
    Virtual tokens keep the positions consistent with padding: prefix tuning's key/value prefix
    occupies positions ``0..n-1`` (peft shifts the given position ids by ``n``); prompt tuning's
    prepended embeddings take positions ``0..n-1`` and the row's real tokens follow at ``n..``
    (peft drops given position ids for prompt tuning, so they are computed from the extended
    attention mask inside the base model's forward). So a row scores the same whatever padding
    its batch has, which keeps sharded runs (smaller per-rank batches, other padding) on the
    single-process trajectory. The answer position is still the last one.

    Args:
        model: A causal LM returning an output with ``.logits`` (``[B, T or 1, V]``).
        batch: ``input_ids`` and ``attention_mask`` as made by :meth:`SST2Task.collate`; other
            keys are ignored.
        label_ids: Token id of each label word (:meth:`SST2Task.label_token_ids`).

    Returns:
        ``[B, len(label_ids)]`` logits in the model's dtype.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    target, peft_config = _forward_target(model)
    parameters = inspect.signature(target.forward).parameters
    # Prompt-tuning-like methods prepend embeddings (prefix tuning's virtual tokens are a cache).
    prepends = peft_config is not None and peft_config.is_prompt_learning and peft_config.peft_type not in (
        "PREFIX_TUNING", "CARTRIDGE")
    if "position_ids" in parameters and not prepends:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    positions = _positions_from_mask(target) if prepends and "position_ids" in parameters else contextlib.nullcontext()
    with positions:
        logits = model(**kwargs).logits
    index = torch.as_tensor(list(label_ids), device=logits.device)
    return logits[:, -1, :].index_select(-1, index)


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_ids: Sequence[int]) -> torch.Tensor:
    """MeZO's classification loss: mean cross-entropy over the label words' logits.

    Args:
        model: A causal LM.
        batch: A batch from :meth:`SST2Task.collate` (with ``labels``).
        label_ids: Token id of each label word.

    Returns:
        Scalar float32 loss.
    """
    logits = label_logits(model, batch, label_ids).float()
    return F.cross_entropy(logits, batch["labels"].to(logits.device))


def evaluate_accuracy(
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    task: SST2Task,
    batch_size: int = 16,
    max_length: int = 128,
) -> float:
    """Fraction of rows whose higher-scoring label word is the right one.

    Runs in eval mode under ``torch.no_grad()`` and restores the model's previous train/eval
    mode afterwards.

    Args:
        model: A causal LM.
        rows: Rows ``{"sentence": str, "label": int}``.
        tokenizer: The model's tokenizer.
        task: The prompt task.
        batch_size: Rows per forward pass.
        max_length: Maximum prompt length in tokens.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: No rows, or a non-positive batch size.
    """
    if not rows:
        raise ValueError("Cannot evaluate on zero rows")
    if batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size}")
    label_ids = task.label_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = task.collate(rows[start : start + batch_size], tokenizer, max_length)
                predictions = label_logits(model, batch, label_ids).argmax(-1).cpu()
                correct += int((predictions == batch["labels"]).sum())
    finally:
        model.train(was_training)
    return correct / len(rows)
