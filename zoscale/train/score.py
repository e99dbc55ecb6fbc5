"""Score a saved model or peft adapter folder on a task, without training, on any engine.

``launch/evaluate.py`` calls :func:`score`: the held-out set of ``data.*`` (and the dev set when
``data.n_dev`` > 0) is built exactly as training builds it (same seed, same sampling), the model
comes from ``model.name`` (a Hugging Face folder such as a run's ``final/``, or a built-in name)
with an optional peft adapter folder on top, and the metrics (and, with ``data.predictions``,
every example's prediction) are written to ``output_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoscale.data.splits import load_task_data
from zoscale.data.tasks import Encoder, build_task
from zoscale.engines.base import EngineBuilder
from zoscale.engines.local import LocalBuilder
from zoscale.train.config import TrainConfig
from zoscale.train.evaluation import evaluate
from zoscale.train.trainer import load_model

__all__ = ["score"]


def _with_adapter(model: Any, adapter: str | None) -> Any:
    if adapter is None:
        return model
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def score(cfg: TrainConfig, progress: bool = False, builder: EngineBuilder | None = None,
          adapter: str | None = None) -> dict[str, Any]:
    """Metrics of ``cfg.model.name`` (plus ``adapter``) on the task's held-out (and dev) examples."""
    task = build_task(cfg.data)
    data = load_task_data(task, cfg.data, cfg.seed)  # a malformed file fails before the model loads
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter}")
    builder = builder or LocalBuilder()
    model, tokenizer = load_model(cfg, builder)
    model = _with_adapter(model, adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    engine = builder.build(model)
    encoder = Encoder(tokenizer, cfg.data.max_length)
    metrics, rows = evaluate(engine, task, data.eval, encoder, cfg.eval_batch_size, cfg.data.predictions)
    summary: dict[str, Any] = {"task": task.name, "model": cfg.model.name, "adapter": adapter,
                               "n_eval": len(data.eval), **{f"eval_{k}": v for k, v in metrics.items()}}
    if data.dev:
        dev, _ = evaluate(engine, task, data.dev, encoder, cfg.eval_batch_size)
        summary.update({f"dev_{k}": v for k, v in dev.items()}, n_dev=len(data.dev))
    summary["data_notes"] = data.notes
    if engine.rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
        if rows is not None:
            with (out / "predictions.jsonl").open("w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    return summary
