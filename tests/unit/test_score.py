"""Scoring a saved folder without training (launch/evaluate.py's job) reproduces the run's final metrics.

A LoRA run saves a peft adapter folder; ``score`` puts it on the base model and must find the
held-out metrics training wrote last (same examples: same data.* and seed). A full fine-tune's
``final/`` folder is scored the same way. Bad input stops before the model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoscale.train.config import load_config
from zoscale.models import tiny_llama
from zoscale.train.score import _with_adapter, score
from zoscale.train.trainer import train

DATA = ["data.task=copa", f"data.path={Path(__file__).resolve().parents[1] / 'fixtures' / 'COPA'}",
        "data.n_train=16", "data.n_dev=4", "data.n_eval=8"]


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _final_metrics(run: Path) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]


@pytest.mark.parametrize("peft", [False, True])
def test_score_reproduces_the_final_evaluation(tmp_path: Path, peft: bool) -> None:
    extra = ["model.peft.type=lora", "optimizer.params.lr=0.01", "optimizer.params.eps=0.01"] if peft else [
        "optimizer.params.lr=0.001", "optimizer.params.eps=0.001"]
    run = tmp_path / "run"
    train(load_config(None, ["model.name=tiny-llama", "steps=3", "batch_size=4", "eval_every=0",
                             f"output_dir={run}", *DATA, *extra]), progress=False)
    final = _final_metrics(run)
    model = "tiny-llama" if peft else str(run / "final")
    cfg = load_config(None, [f"model.name={model}", f"output_dir={tmp_path / 'eval'}", "data.predictions=true", *DATA])
    got = score(cfg, adapter=str(run / "final") if peft else None)
    assert got["eval_accuracy"] == final["eval_accuracy"] and got["dev_accuracy"] == final["dev_accuracy"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["eval_accuracy"] == final["eval_accuracy"]
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 8
    if peft:  # the adapter really is applied: the loaded model's logits differ from the base's
        ids = torch.tensor([[5, 6, 7, 8]])
        base = tiny_llama()
        with torch.no_grad():
            plain = base(input_ids=ids).logits
            adapted = _with_adapter(tiny_llama(), str(run / "final"))(input_ids=ids).logits
        assert (adapted - plain).abs().max() > 1e-6


def test_score_refuses_a_missing_adapter_and_a_context_too_long(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=tiny-llama", f"output_dir={tmp_path}", *DATA])
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        score(cfg, adapter=str(tmp_path / "absent"))
    cfg = load_config(None, ["model.name=tiny-llama", f"output_dir={tmp_path}", "data.max_length=1024", *DATA])
    with pytest.raises(ValueError, match=r"data.max_length 1024 exceeds the context of model 'tiny-llama' \(256"):
        score(cfg)
