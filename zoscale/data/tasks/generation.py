"""Generation (SQuAD, DROP): trained by teacher forcing on the answer, scored by greedy decoding.

Training, by default, is the teacher-forced loss of the target ``" <first answer>\\n"`` after the
prompt (per-example mean token NLL, averaged over examples as in multiple choice). MeZO's
non-differentiable objective is ``objective="f1"``: the loss is minus the mean F1 of the greedy
decodes of the batch, which ZO can optimise because it needs only the loss value.

Evaluation decodes greedily (no sampling, one beam), at most ``max_new_tokens`` new tokens (50), a
row stopping at EOS or at a token that holds a newline; the answer is the text before the first
newline, scored by SQuAD's exact match and F1, each maximised over the gold answers. Prompts are
truncated from the left to ``max_length - max_new_tokens``.

Decoding recomputes the whole sequence for each new token (``logits_to_keep=1``, no KV cache): the
same forward as every other family, so peft adapters, position ids and the engines' wrappers need
nothing special. Under ZeRO-3 and FSDP2 every forward gathers parameters, so every rank must run
the same number of forwards: after each token the ranks agree (``sync``, one all-reduce of a
flag) whether all of them are done, and a rank whose rows have finished keeps stepping until
then (transformers calls this ``synced_gpus``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zoscale.data.tasks.encoding import Encoder, Example
from zoscale.data.tasks.forward import last_logits, option_logprobs
from zoscale.data.tasks.metrics import best_em_f1

__all__ = ["Generation", "OBJECTIVES", "greedy_decode"]

OBJECTIVES = ("teacher_forcing", "f1")
Sync = Callable[[bool], bool]


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, batch: dict[str, torch.Tensor], encoder: Encoder,
                  max_new_tokens: int, sync: Sync | None = None) -> list[str]:
    """Greedy continuations of a left-padded prompt batch, each cut at its first newline.

    Args:
        model: A causal LM.
        batch: ``input_ids`` / ``attention_mask`` of the prompts (:meth:`Encoder.prompts`).
        encoder: The batch's encoder (its tokenizer decodes; its EOS stops a row).
        max_new_tokens: At most this many tokens per row.
        sync: Called after every token with whether this rank's rows are all done; returns
            whether every rank's are. None: this process alone.
    """
    tokenizer = encoder.tokenizer
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_new_tokens):
        step = last_logits(model, {"input_ids": ids, "attention_mask": mask}, keep=1)[:, -1].argmax(-1).cpu()
        for row in range(rows):
            if done[row]:
                continue
            token = int(step[row])
            if token == tokenizer.eos_token_id:
                done[row] = True
                continue
            generated[row].append(token)
            done[row] = "\n" in tokenizer.decode([token])
        finished = all(done)
        if sync is not None:
            finished = sync(finished)
        if finished:
            break
        ids = torch.cat([ids, step.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0] for tokens in generated]


class Generation:
    """Free-text answers: exact match and F1 of greedy decodes.

    Args:
        max_new_tokens: Decoding budget (MeZO: 50).
        objective: ``"teacher_forcing"`` (default) or ``"f1"`` (loss = -F1 of the greedy decode).
    """

    name = "generation"
    metrics = ("em", "f1")

    def __init__(self, max_new_tokens: int = 50, objective: str = "teacher_forcing") -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Invalid generation objective {objective!r}; expected one of {list(OBJECTIVES)}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"Invalid max_new_tokens: {max_new_tokens!r} (a positive integer)")
        self.max_new_tokens = max_new_tokens
        self.objective = objective

    def train_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, torch.Tensor]:
        if self.objective == "f1":
            return self.eval_batch(examples, encoder)
        return encoder.options([(ex, ex.candidates[ex.label]) for ex in examples])

    def eval_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict:
        batch = encoder.prompts(examples, reserve=self.max_new_tokens)
        batch["answers"] = [ex.answers for ex in examples]
        batch["encoder"] = encoder
        return batch

    def loss(self, model: torch.nn.Module, batch: dict, sync: Sync | None = None) -> torch.Tensor:
        if self.objective == "teacher_forcing":
            return -option_logprobs(model, batch).mean()
        texts = greedy_decode(model, batch, batch["encoder"], self.max_new_tokens, sync)
        f1s = [best_em_f1(text, answers)["f1"] for text, answers in zip(texts, batch["answers"])]
        return torch.tensor(-sum(f1s) / len(f1s), dtype=torch.float32)

    def predict(self, model: torch.nn.Module, batch: dict, encoder: Encoder, sync: Sync | None = None) -> list[str]:
        return greedy_decode(model, batch, encoder, self.max_new_tokens, sync)

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return best_em_f1(prediction, example.answers)
