"""What metrics.jsonl reports per step (issue 11 defects): the lr the step used and the mean
projected gradient of all its queries.

Before: ``lr`` was the last record's lr times q, right for MeZO's family (which logs lr/q per
query) and twice the real value for ZO-SGD-MMT, ZO-Adam, ZO-SGD-Cons and LOZO-M at q = 2; and
``projected_grad`` was the last query's (block-wise ZO: the last block's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoscale.train.config import load_config
from zoscale.train.trainer import build, train_step


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


@pytest.mark.parametrize("optimizer, extra", [("mezo", ["optimizer.params.q=2"]), ("zo_sgd_mmt", ["optimizer.params.q=2"]),
                                              ("zo_adam", ["optimizer.params.q=2"]), ("blockwise", [])])
def test_a_step_reports_its_lr_and_the_mean_projected_gradient(tmp_path: Path, optimizer: str,
                                                               extra: list[str]) -> None:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"sentence": f"a film {i}", "label": i % 2}) + "\n" for i in range(24)))
    cfg = load_config(None, ["model.name=tiny-llama", f"data.path={data}", "data.n_train=16", "data.n_eval=4",
                             'data.label_words=[" bad", " good"]', "batch_size=4", f"optimizer.type={optimizer}",
                             "optimizer.params.lr=0.002", "optimizer.params.eps=0.001", f"output_dir={tmp_path}",
                             *extra])
    run = build(cfg)
    entry = train_step(run, 1)
    records = run.optimizer.step_log
    assert len(records) >= 2  # two queries, or one record per block
    assert entry["lr"] == 0.002
    assert entry["projected_grad"] == pytest.approx(sum(r["grad"][0] for r in records) / len(records), rel=1e-12)
    assert entry["projected_grad"] != pytest.approx(records[-1]["grad"][0], rel=1e-9)
