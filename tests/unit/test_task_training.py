"""Each family trains through the trainer on the tiny Llama: falling loss, rising held-out score.

MeZO at lr 3e-4, eps 1e-3, batch 8 on every weight of the tiny Llama (measured here: custom
3-class loss 1.19 -> 0.78 over the first and last 20 steps of 100, accuracy 0.25 -> 0.75; COPA
5.81 -> 5.35; the memorisable generation set F1 0 -> 1.0 in 300 steps, ~5 s). The bounds leave
room for other CPUs' rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoscale.train.config import load_config
from zoscale.train.trainer import train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WORDS = {"neg": ["awful", "dull"], "neu": ["plain", "fine"], "pos": ["superb", "lovely"]}


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _train(tmp: Path, steps: int, *extra: str) -> tuple[list[float], dict]:
    cfg = load_config(None, ["model.name=tiny-llama", "model.trainable=all", f"steps={steps}", "batch_size=8",
                             "eval_every=0", "optimizer.params.lr=3e-4", "optimizer.params.eps=0.001",
                             f"output_dir={tmp / 'run'}", "save_final=false", *extra])
    summary = train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").open()]
    return [r["loss"] for r in rows if "loss" in r], summary


def _fifths(losses: list[float]) -> tuple[float, float]:
    k = len(losses) // 5
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_a_custom_three_class_task_learns(tmp_path: Path) -> None:
    data = tmp_path / "three.jsonl"
    with data.open("w") as f:
        for i in range(48):
            mood = ("neg", "neu", "pos")[i % 3]
            f.write(json.dumps({"review": f"a {WORDS[mood][i % 2]} film, number {i}", "mood": mood}) + "\n")
    losses, summary = _train(tmp_path, 100, "data.task=custom", "data.template={review} It was",
                             'data.label_words=[" bad", " good", " great"]', 'data.labels=["neg", "neu", "pos"]',
                             "data.label_field=mood", f"data.path={data}", "data.n_train=36", "data.n_eval=12")
    first, last = _fifths(losses)
    assert last < 0.85 * first, (first, last)
    assert summary["accuracy_after"] > summary["accuracy_before"]


def test_multiple_choice_copa_learns(tmp_path: Path) -> None:
    losses, _ = _train(tmp_path, 100, "data.task=copa", f"data.path={FIXTURES / 'COPA'}", "data.n_train=24",
                       "data.n_dev=4", "data.n_eval=8")
    first, last = _fifths(losses)
    assert last < 0.97 * first, (first, last)


def test_generation_f1_rises_on_a_memorisable_set(tmp_path: Path) -> None:
    data = tmp_path / "cars.jsonl"
    with data.open("w") as f:
        for i in range(16):
            f.write(json.dumps({"question": f"What colour is car {i}?", "answer": "blue"}) + "\n")
    _, summary = _train(tmp_path, 300, "data.task=custom", "data.family=generation", "data.template={question}\nAnswer:",
                        "data.answer_field=answer", f"data.path={data}", f"data.eval_path={data}", "data.n_train=16",
                        "data.n_eval=8", "data.max_new_tokens=8")
    assert summary["f1_before"] == 0.0
    assert summary["f1_after"] > 0.5
