"""Tests of the SST-2 prompt task through the classification family (zoscale.data.tasks).

The template ``<S> It was`` + `` terrible`` / `` great`` (MeZO), its batches (left padding, left
truncation, single-token label words as ``label_ids``), the label-word logits against each prompt
run alone and unpadded, the ``logits_to_keep`` fast path and its fallback, the loss as the
cross-entropy over the label words, and held-out accuracy through
:func:`zoscale.train.evaluation.evaluate` against a reference loop.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from zoscale.data.tasks import Classification, Encoder, Task, build_task, label_logits, task_spec
from zoscale.data.tasks.suite import sst2
from zoscale.models import tiny_llama, tiny_opt, tiny_tokenizer
from zoscale.train.config import DataConfig
from zoscale.engines.local import LocalEngine
from zoscale.train.evaluation import evaluate

SENTENCES = [
    {"sentence": "a great little film", "label": 1},
    {"sentence": "bad", "label": 0},
    {"sentence": "the plot is thin but the acting is terrific and warm", "label": 1},
    {"sentence": "tedious , overlong and dull .", "label": 0},
    {"sentence": "good fun", "label": 1},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request):
    return tiny_llama(seed=1) if request.param == "llama" else tiny_opt(seed=1)


def _task(label_words: tuple[str, ...] | None = None) -> Task:
    return Task(task_spec("sst2"), Classification(), label_words=label_words)


def _examples(rows: list[dict[str, Any]], label_words: tuple[str, ...] | None = None):
    return _task(label_words).examples([(row, f"rows[{i}]") for i, row in enumerate(rows)])


def _batch(rows: list[dict[str, Any]], tokenizer, label_words: tuple[str, ...] | None = None,
           max_length: int = 128) -> dict[str, torch.Tensor]:
    return Classification().train_batch(_examples(rows, label_words), Encoder(tokenizer, max_length))


def _word_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """Each label word's single token, straight from the tokenizer."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


def test_label_token_ids(tokenizer) -> None:
    ids = _batch(SENTENCES, tokenizer)["label_ids"].tolist()
    assert [tokenizer.decode([i]) for i in ids] == [" terrible", " great"]
    assert _batch(SENTENCES, tokenizer, (" bad", " good"))["label_ids"].tolist() != ids
    # A label word of several tokens (" fantastic" is 10) is no longer an error: the batch leaves
    # the single-token fast path and scores one prompt + candidate row per class instead.
    slow = _batch(SENTENCES, tokenizer, (" terrible", " fantastic"))
    assert "label_ids" not in slow
    assert slow["groups"].tolist() == [2] * len(SENTENCES)
    assert slow["option_lengths"].tolist() == [1, 10] * len(SENTENCES)
    with pytest.raises(ValueError, match="at least two"):
        build_task(DataConfig(label_words=(" great",)))


def test_collate_left_pads_and_ends_with_the_prompt_suffix(tokenizer) -> None:
    batch = _batch(SENTENCES, tokenizer)
    suffix = tokenizer(" It was", add_special_tokens=False)["input_ids"]
    lengths = batch["attention_mask"].sum(-1)

    assert batch["labels"].tolist() == [row["label"] for row in SENTENCES]
    assert int(batch["truncated"]) == 0
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == int(lengths.max())
    assert bool(batch["attention_mask"][:, -1].all())  # the answer position is the last one
    for row, mask, ids, length in zip(SENTENCES, batch["attention_mask"], batch["input_ids"], lengths):
        pad = len(mask) - int(length)
        assert mask.tolist() == [0] * pad + [1] * int(length)
        assert ids[:pad].tolist() == [tokenizer.pad_token_id] * pad
        expected = tokenizer(row["sentence"] + " It was", add_special_tokens=False)["input_ids"]
        assert ids[pad:].tolist() == expected
        assert ids[-len(suffix) :].tolist() == suffix


def test_collate_truncates_the_start_of_the_sentence(tokenizer) -> None:
    row = {"sentence": "one two three four five six", "label": 1}
    batch = _batch([row], tokenizer, max_length=16)  # one token per byte: 9 + 7
    assert batch["input_ids"].shape == (1, 16)
    assert tokenizer.decode(batch["input_ids"][0]) == " five six It was"
    assert int(batch["truncated"]) == 1  # counted, never silent
    assert int(_batch([row, row, SENTENCES[1]], tokenizer, max_length=16)["truncated"]) == 2
    # The tokens that must be kept whole are the special tokens and the option: a 10-token label
    # word leaves no room for the prompt in 10 tokens (in 11, the prompt keeps its last token).
    words = (" terrible", " fantastic")
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        _batch([row], tokenizer, words, max_length=10)
    fits = _batch([row], tokenizer, words, max_length=11)
    assert fits["input_ids"].shape == (2, 11) and int(fits["truncated"]) == 2
    with pytest.raises(ValueError, match=r"label 2 \(int\) in field 'label' is not one of"):
        sst2({"sentence": "x", "label": 2}, "rows[0]")
    with pytest.raises(ValueError, match=r"rows\[0\]: label 2 \(int\) in field 'label' is not one of"):
        _batch([{"sentence": "x", "label": 2}], tokenizer, max_length=16)


def _reference_label_logits(model, tokenizer, rows: list[dict], words: tuple[str, ...] = (" terrible", " great"),
                            ) -> torch.Tensor:
    """Each prompt run alone, unpadded, with all logits; the last row of logits, label columns."""
    label_ids = _word_ids(tokenizer, words)
    out = []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["sentence"] + " It was", return_tensors="pt", add_special_tokens=False)
            out.append(model(input_ids=ids["input_ids"]).logits[0, -1, label_ids])
    return torch.stack(out)


def test_the_template_is_mezos_sst2_prompt() -> None:
    example = sst2({"sentence": "a fine film", "label": 1}, "rows[0]")
    assert example.prompt == "a fine film It was"
    assert example.candidates == (" terrible", " great") and example.correct == (1,)


def test_label_logits_match_unpadded_full_forward(model, tokenizer) -> None:
    batch = _batch(SENTENCES, tokenizer)
    label_ids = batch["label_ids"].tolist()
    assert label_ids == _word_ids(tokenizer, (" terrible", " great"))
    with torch.no_grad():
        got = label_logits(model, batch, label_ids)
        padded_full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    expected = _reference_label_logits(model, tokenizer, SENTENCES)
    assert got.shape == (len(SENTENCES), 2)
    # Same math on different shapes: only float32 summation order differs.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, padded_full[:, -1, label_ids], rtol=1e-5, atol=1e-5)
    assert got.std() > 0.01  # the tiny model's logits are not trivially flat


class _FullLogitsOnly(torch.nn.Module):
    """A model whose forward knows neither logits_to_keep nor position_ids."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen_shapes: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        self.seen_shapes.append(tuple(out.logits.shape))
        return out


def test_label_logits_uses_logits_to_keep_and_falls_back(tokenizer) -> None:
    model = tiny_llama(seed=2)
    batch = _batch(SENTENCES, tokenizer)
    label_ids = batch["label_ids"].tolist()
    shapes = []
    handle = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    with torch.no_grad():
        kept = label_logits(model, batch, label_ids)
        wrapper = _FullLogitsOnly(model)
        full = label_logits(wrapper, batch, label_ids)
    handle.remove()
    batch_size, width = batch["input_ids"].shape
    assert shapes[0] == (batch_size, 1, model.config.vocab_size)
    assert wrapper.seen_shapes == [(batch_size, width, model.config.vocab_size)]
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)


def test_loss_is_cross_entropy_over_label_words(model, tokenizer) -> None:
    words = (" bad", " good")
    batch = _batch(SENTENCES, tokenizer, words)
    assert batch["label_ids"].tolist() == _word_ids(tokenizer, words)
    loss = Classification().loss(model, batch)

    logits = _reference_label_logits(model, tokenizer, SENTENCES, words).double()
    labels = batch["labels"]
    by_hand = (logits.logsumexp(-1) - logits[torch.arange(len(labels)), labels]).mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), labels), rtol=1e-5, atol=1e-6)


def test_loss_backpropagates(tokenizer) -> None:
    model = tiny_opt(seed=3)
    Classification().loss(model, _batch(SENTENCES, tokenizer)).backward()
    assert model.model.decoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_evaluate_accuracy_matches_reference_and_keeps_mode(model, tokenizer) -> None:
    rows = SENTENCES * 3
    task, examples = _task(), _examples(rows)
    predictions = _reference_label_logits(model, tokenizer, rows).argmax(-1)
    expected = int((predictions == torch.tensor([r["label"] for r in rows])).sum()) / len(rows)
    engine, encoder = LocalEngine(model), Encoder(tokenizer, 128)

    # evaluate leaves the train/eval mode to its caller (the trainer keeps the model in eval mode;
    # the tiny models have no dropout, so both modes score alike) and computes no gradients.
    model.train()
    try:
        metrics, scored = evaluate(engine, task, examples, encoder, batch_size=4, predictions=True)
        assert metrics == {"accuracy": expected, "truncated": 0}
        assert [r["prediction"] for r in scored] == predictions.tolist()
        assert [r["where"] for r in scored] == [ex.where for ex in examples]
        assert model.training
        model.eval()
        metrics, scored = evaluate(engine, task, examples, encoder, batch_size=16)
        assert metrics == {"accuracy": expected, "truncated": 0} and scored is None
        assert not model.training
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="zero examples"):
        evaluate(engine, task, [], encoder, batch_size=4)


def test_evaluation_counts_truncated_prompts_once_whatever_the_padding(tokenizer) -> None:
    # 5 held-out examples, 2 of them too long, in batches of 4: the second batch is padded with 3
    # repeats of the first example (a long one), which must not be counted.
    rows = [{"sentence": "x" * 40, "label": 1}, {"sentence": "ok", "label": 0}, {"sentence": "fine", "label": 1},
            {"sentence": "y" * 40, "label": 0}, {"sentence": "good", "label": 1}]
    task = Task(task_spec("sst2"), Classification())
    examples = task.examples([(r, f"rows[{i}]") for i, r in enumerate(rows)])
    encoder = Encoder(tokenizer, 24)
    alone = sum(int(Classification().eval_batch([ex], encoder)["truncated"]) for ex in examples)
    metrics, _ = evaluate(LocalEngine(tiny_llama(seed=1)), task, examples, encoder, batch_size=4)
    assert alone == 2 and metrics["truncated"] == 2
