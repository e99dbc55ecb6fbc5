"""Examples and their tokenisation: a prompt, its candidates, left truncation and left padding.

Every task turns a raw record into an :class:`Example` (the sample model of MeZO's code): a
prompt (``encode``), the candidates that may follow it (``verbalize`` = prompt + candidate) and
which of them are right. A candidate's *option tokens* are the tokens of prompt + candidate beyond
those of the prompt; only they are scored.

A sequence is the tokenizer's leading special tokens (a BOS, if it adds one), the prompt, then
the option. A prompt too long for ``max_length`` loses tokens from its start (MeZO truncates from
the left); the special tokens and the option are kept. Each truncation is counted in the batch
(``"truncated"``), and the trainer reports the count: never silent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["Example", "Encoder", "left_pad"]


@dataclass(frozen=True)
class Example:
    """One example of a task.

    Attributes:
        prompt: The text the model reads (MeZO's ``encode``).
        candidates: Texts that may follow the prompt: label words (classification), options
            (multiple choice), or the one training target (generation, e.g. ``" Paris\\n"``).
        correct: Indices of the right candidates (one for classification; ReCoRD may have
            several; generation: ``(0,)``, the target).
        answers: Generation only: every acceptable answer, for exact match and F1.
        where: The record's origin (``"<file> line N"``), for error messages.
    """

    prompt: str
    candidates: tuple[str, ...]
    correct: tuple[int, ...]
    answers: tuple[str, ...] = ()
    where: str = ""

    @property
    def label(self) -> int:
        """The first right candidate: the class of a classification example, the training target."""
        return self.correct[0]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (``[B, T]``, ``T`` the longest) with padding on the left."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class Encoder:
    """Tokenises prompts and prompt + candidate pairs for one tokenizer and context length.

    Args:
        tokenizer: The model's tokenizer; it needs a pad token (padded positions are masked).
        max_length: Longest sequence in tokens (prompt, special tokens and option together).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix = _special_prefix(tokenizer)

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def option_ids(self, prompt: str, candidate: str, where: str = "") -> list[int]:
        """The option tokens of ``candidate`` after ``prompt``.

        The pair is tokenised jointly and split where the prompt's own tokens end; if the
        tokenizer merges across that boundary, the candidate is tokenised alone.

        Raises:
            ValueError: The candidate tokenises to nothing (named, with ``where``).
        """
        prompt_ids = self.ids(prompt)
        joint = self.ids(prompt + candidate)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            option = joint[len(prompt_ids):]
        else:
            option = self.ids(candidate)
        if not option:
            raise ValueError(f"{where or 'example'}: candidate {candidate!r} tokenises to nothing")
        return option

    def sequence(self, prompt: str, option: Sequence[int] = (), reserve: int = 0,
                 where: str = "") -> tuple[list[int], bool]:
        """Special prefix + left-truncated prompt + option, and whether the prompt was truncated.

        Args:
            prompt: The prompt text.
            option: Option tokens to append (kept whole).
            reserve: Tokens to leave free after the sequence (generation's new tokens).
            where: The example's origin, for error messages.

        Raises:
            ValueError: ``max_length`` leaves no room for one prompt token, or the sequence would
                start with the option (an empty prompt and no special prefix): no position would
                predict its first token.
        """
        prompt_ids = self.ids(prompt)
        if not prompt_ids and not self.prefix:
            raise ValueError(f"{where or 'example'}: the prompt is empty and the tokenizer adds no BOS token, "
                             "so nothing precedes the first option (or generated) token")
        room = self.max_length - reserve - len(self.prefix) - len(option)
        if room < 1:
            raise ValueError(
                f"max_length {self.max_length} leaves no room for the prompt: the special tokens, the "
                f"option ({len(option)} tokens) and {reserve} reserved tokens take {self.max_length - room}"
            )
        truncated = len(prompt_ids) > room
        return self.prefix + prompt_ids[-room:] + list(option), truncated

    def prompts(self, examples: Sequence[Example], reserve: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch of the examples' prompts, with ``truncated`` (how many lost tokens)."""
        if not examples:
            raise ValueError("Cannot collate an empty batch")
        encoded = [self.sequence(ex.prompt, reserve=reserve, where=ex.where) for ex in examples]
        batch = left_pad([seq for seq, _ in encoded], self.tokenizer.pad_token_id)
        batch["truncated"] = torch.tensor(sum(cut for _, cut in encoded))
        return batch

    def options(self, pairs: Sequence[tuple[Example, str]]) -> dict[str, torch.Tensor]:
        """A left-padded batch of prompt + candidate rows, with ``option_lengths`` and ``truncated``."""
        if not pairs:
            raise ValueError("Cannot collate an empty batch")
        rows, lengths, cut = [], [], 0
        for ex, candidate in pairs:
            option = self.option_ids(ex.prompt, candidate, ex.where)
            seq, truncated = self.sequence(ex.prompt, option, where=ex.where)
            rows.append(seq)
            lengths.append(len(option))
            cut += truncated
        batch = left_pad(rows, self.tokenizer.pad_token_id)
        batch["option_lengths"] = torch.tensor(lengths)
        batch["truncated"] = torch.tensor(cut)
        return batch


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before the text by default (e.g. a BOS), possibly none.

    Special tokens a tokenizer appends (an EOS) are left out: nothing may follow the answer
    position.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start: start + len(plain)] == plain:
            return special[:start]
    return []
