"""Gradient accumulation: a step over 4 micro-batches of b equals the step on one batch of 4b.

The closure averages the micro-batches' mean losses; with equal micro-batches that is the mean
over all 4b examples, up to float32 summation order (a few ulp in the loss), which the projected
gradient amplifies by 1/(2 eps): losses agree to 1e-5 relative and weights to 1e-6 after 4 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoscale.train.config import load_config
from zoscale.train.launch import _accumulation
from zoscale.train.trainer import train


def _data(path: Path) -> Path:
    words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
    with path.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"sentence": f"a {words[i % 2][i % 4]} film number {i}", "label": i % 2}) + "\n")
    return path


def _run(tmp: Path, name: str, batch: int, accumulate: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = load_config(None, [
        "model.name=tiny-llama", f"data.path={_data(tmp / 'toy.jsonl')}", "data.n_train=32", "data.n_eval=8",
        'data.label_words=[" bad", " good"]', "model.trainable=all", "steps=4", "eval_every=0",
        f"batch_size={batch}", f"gradient_accumulation_steps={accumulate}", f"output_dir={tmp / name}",
        "optimizer.params.lr=0.001", "optimizer.params.eps=0.001"])
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").open()]
    return [r["loss"] for r in rows if "loss" in r], load_file(tmp / name / "final" / "model.safetensors")


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def test_four_micro_batches_equal_one_batch_of_four_times_the_size(tmp_path: Path) -> None:
    big_losses, big = _run(tmp_path, "big", batch=8, accumulate=1)
    acc_losses, acc = _run(tmp_path, "acc", batch=2, accumulate=4)
    small_losses, _ = _run(tmp_path, "small", batch=2, accumulate=1)
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)
    assert small_losses[0] != pytest.approx(big_losses[0], rel=1e-3)  # the batch really differs without it
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=0, atol=1e-6)


def test_deepspeed_json_accumulation_is_checked_against_train_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    micro = {"train_micro_batch_size_per_gpu": 4}
    assert _accumulation(micro, "x.json") == 1
    assert _accumulation({**micro, "gradient_accumulation_steps": 3}, "x.json") == 3
    assert _accumulation({**micro, "train_batch_size": 24}, "x.json") == 3  # derived, as DeepSpeed does
    assert _accumulation({**micro, "train_batch_size": 24, "gradient_accumulation_steps": 3}, "x.json") == 3
    with pytest.raises(ValueError, match=r"x.json: train_batch_size 16 != .* 4 x gradient_accumulation_steps 3 x 2"):
        _accumulation({**micro, "train_batch_size": 16, "gradient_accumulation_steps": 3}, "x.json")
    with pytest.raises(ValueError, match="not a multiple"):
        _accumulation({**micro, "train_batch_size": 12}, "x.json")
    with pytest.raises(ValueError, match="'gradient_accumulation_steps' must be a positive integer"):
        _accumulation({**micro, "gradient_accumulation_steps": 0}, "x.json")
