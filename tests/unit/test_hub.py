"""Hub names (``data.path=hub``): the hub's rows become the records the templates read.

No network here, so ``datasets.load_dataset`` is replaced by one that returns in-memory
``datasets.Dataset`` objects in the hub's layout (SuperGLUE's flat MultiRC, SQuAD's
``answers: {"text", "answer_start"}``, DROP's ``answers_spans``), and records which name, config
and split were asked for.
"""

from __future__ import annotations

from typing import Any

import datasets
import pytest

from zoscale.data.splits import load_task_data
from zoscale.data.tasks import build_task
from zoscale.train.config import DataConfig

ROWS: dict[str, list[dict[str, Any]]] = {
    "super_glue/rte": [{"premise": f"P{i}.", "hypothesis": f"H{i}", "label": i % 2, "idx": i} for i in range(12)],
    "squad": [{"id": str(i), "title": "T", "context": f"C {i}.", "question": f"Q{i}?",
               "answers": {"text": [f"a{i}", f"b{i}"], "answer_start": [0, 2]}} for i in range(12)],
    "drop": [{"passage": f"P{i}.", "question": f"Q{i}?", "query_id": str(i), "section_id": "s",
              "answers_spans": {"spans": [f"s{i}"], "types": ["span"]}} for i in range(12)],
}


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(name: str, config: str | None = None, split: str | None = None) -> datasets.Dataset:
        calls.append((name, config, split))
        key = f"{name}/{config}" if config else name
        if key not in ROWS:
            raise FileNotFoundError(f"Couldn't reach '{key}' on the Hub (no network)")
        return datasets.Dataset.from_list(ROWS[key])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _data(task: str, path: str, **kw: Any) -> DataConfig:
    return DataConfig(task=task, path=path, n_train=6, n_dev=2, n_eval=4, **kw)


def test_hub_uses_the_tasks_usual_name_and_both_splits(asked: list[tuple]) -> None:
    cfg = _data("rte", "hub")
    got = load_task_data(build_task(cfg), cfg, seed=0)
    assert asked == [("super_glue", "rte", "train"), ("super_glue", "rte", "validation")]
    assert (len(got.train), len(got.dev), len(got.eval)) == (6, 2, 4)
    first = got.eval[0]
    assert first.where.startswith("super_glue/rte[validation][") and first.candidates == ("Yes", "No")
    assert first.prompt.endswith('" is true? Yes or No?\n')


@pytest.mark.parametrize("task", ["squad", "drop"])
def test_hub_answer_columns_become_the_answers_list(asked: list[tuple], task: str) -> None:
    cfg = _data(task, f"hub:{task}")
    got = load_task_data(build_task(cfg), cfg, seed=0)
    index = int(got.eval[0].where.split("[")[-1].rstrip("]"))
    want = ROWS[task][index]["answers"]["text"] if task == "squad" else ROWS[task][index]["answers_spans"]["spans"]
    assert list(got.eval[0].answers) == want and got.eval[0].candidates == (f" {want[0]}\n",)


def test_hub_errors_name_the_path(asked: list[tuple]) -> None:
    with pytest.raises(ValueError, match=r"data.path=hub:nope/x: could not load nope/x split 'train' from the hub"):
        cfg = _data("rte", "hub:nope/x")
        load_task_data(build_task(cfg), cfg, seed=0)
    with pytest.raises(ValueError, match="expected hub:<name> or hub:<name>/<config>"):
        cfg = _data("rte", "hub:a/b/c")
        load_task_data(build_task(cfg), cfg, seed=0)
    with pytest.raises(ValueError, match="no hub name is known for this task"):
        cfg = DataConfig(task="custom", template="{x}", label_words=("a", "b"), path="hub", n_train=2, n_eval=2)
        load_task_data(build_task(cfg), cfg, seed=0)
