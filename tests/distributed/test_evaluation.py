"""Held-out evaluation on 2 ZeRO-3, 2 FSDP2 and 2 replica ranks equals the one-process evaluation, and ends.

One spawn per engine scores three families (classification with multi-token candidates: RTE;
multiple choice: COPA; generation: SQuAD) on 7 examples with batches of 2: rank 0 holds 4
examples (2 batches), rank 1 holds 3 (one full batch and one padded). A forward hook makes a row
emit EOS once its sequence reaches a length that depends on the prompt, so rows (and ranks)
finish decoding at different steps: a rank that finished must keep stepping, or the other's
all-gathers would hang (the spawn would then time out instead of returning).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.distributed.spawn import run  # noqa: E402
from zoscale.data.formats import read_split  # noqa: E402
from zoscale.data.tasks import Encoder, Task, build_family, task_spec  # noqa: E402
from zoscale.models import tiny_llama, tiny_tokenizer  # noqa: E402
from zoscale.engines.local import LocalEngine  # noqa: E402
from zoscale.train.evaluation import evaluate  # noqa: E402

pytestmark = pytest.mark.distributed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = (("rte", "RTE", {}), ("copa", "COPA", {}), ("squad", "squad", {"max_new_tokens": 8}))
N, BATCH, MAX_LENGTH = 7, 2, 256


def _cases() -> list[tuple[str, Task, list]]:
    out = []
    for name, folder, options in CASES:
        spec = task_spec(name)
        task = Task(spec, build_family(spec.family, options))
        out.append((name, task, task.examples(read_split(FIXTURES / folder, spec.dataset, "validation"))[:N]))
    return out


def _early_eos(module: torch.nn.Module) -> None:
    """A row emits EOS when its length is a multiple of 5: after 0-4 new tokens, by prompt length."""
    eos = tiny_tokenizer().eos_token_id

    def hook(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
        stop = kwargs["attention_mask"].sum(-1) % 5 == 0
        out.logits[stop, -1, eos] += 1e4
        return out

    module.register_forward_hook(hook, with_kwargs=True)


def _evaluate_all(engine: Any) -> dict[str, Any]:
    results = {}
    encoder = Encoder(tiny_tokenizer(), MAX_LENGTH)
    for name, task, examples in _cases():
        metrics, rows = evaluate(engine, task, examples, encoder, BATCH, predictions=True)
        results[name] = {"metrics": metrics, "predictions": sorted((r["where"], r["prediction"]) for r in rows)}
    return results


def _worker(rank: int, world: int, kind: str, out: str) -> None:
    model = tiny_llama(seed=4)
    _early_eos(model)
    if kind == "zero3":
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        from zoscale.engines.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(model, {"train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10**6,
                                         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    elif kind == "fsdp":
        from zoscale.engines.fsdp import FSDPEngine

        engine = FSDPEngine(model)
    else:  # data-parallel replicas: every rank holds the whole model
        engine = LocalEngine(model)
    results = _evaluate_all(engine)
    if rank == 0:
        Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    model = tiny_llama(seed=4)
    _early_eos(model)
    return json.loads(json.dumps(_evaluate_all(LocalEngine(model))))


@pytest.mark.parametrize("kind", ["zero3", "fsdp", "replicas"])
def test_sharded_evaluation_equals_one_process(kind: str, reference: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")
    out = tmp_path / "results.json"
    run(_worker, 2, kind, str(out))
    got = json.loads(out.read_text())
    decoded = [p for _, p in reference["squad"]["predictions"]]
    assert len({len(p) for p in decoded}) > 1, decoded  # rows really finished at different lengths
    for name in reference:
        assert got[name]["predictions"] == reference[name]["predictions"], name
        for metric, value in reference[name]["metrics"].items():
            assert got[name]["metrics"][metric] == pytest.approx(value, abs=1e-12), (name, metric)
