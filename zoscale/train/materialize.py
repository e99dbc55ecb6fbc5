"""A fine-tune shipped as its step log: the fine-tuned model written from the base and the log.

``launch/replay.py`` runs :func:`materialize` as its job: it builds the run's model, engine and
optimizer from the run's config (the log header's, or ``--config``) on one process or any engine,
checks that the base weights and the noise kind are the log's, replays every logged step
(:meth:`~zoscale.optim.base.ZOOptimizer.replay`: bit for bit, without a forward) and saves the
result as a Hugging Face folder (a peft adapter folder for a PEFT run), as the trainer's
``final/`` would be.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from zoscale.engines.base import EngineBuilder
from zoscale.train.config import TrainConfig
from zoscale.train.resume import check_log_header
from zoscale.train.step_log_file import read_step_log

__all__ = ["materialize", "config_from_log", "DS_OWNED_KEYS"]

#: Config keys a DeepSpeed JSON supplies (``zoscale.train.launch``): left out of a config file
#: written for a replay under ``--ds_config``.
DS_OWNED_KEYS = ("optimizer", "batch_size", "gradient_accumulation_steps")


def config_from_log(log: Path, out: Path, for_deepspeed: bool) -> Path:
    """Write the log header's run config to ``out/replay_config.json`` (for ``--config``)."""
    header, _ = read_step_log(log)
    config = dict(header["config"])
    for key in ("output_dir", "resume", "overwrite"):
        config.pop(key, None)
    if for_deepspeed:
        for key in DS_OWNED_KEYS:
            config.pop(key, None)
        config.get("model", {}).pop("dtype", None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "replay_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def materialize(cfg: TrainConfig, progress: bool = False, builder: EngineBuilder | None = None, *,
                log: Path) -> dict[str, Any]:
    """Replay ``log`` onto the base model of ``cfg`` and save it to ``cfg.output_dir``/``final``."""
    from zoscale.engines.local import LocalBuilder
    from zoscale.train.trainer import _wrap, load_model

    header, steps = read_step_log(log)
    builder = builder or LocalBuilder()
    model, tokenizer = load_model(cfg, builder)
    engine, optimizer = _wrap(cfg, model, builder)
    check_log_header(header, optimizer, log, from_base=True)
    t0 = time.perf_counter()
    optimizer.replay([r for _, records in steps for r in records])
    optimizer.flush()
    seconds = time.perf_counter() - t0
    final = Path(cfg.output_dir) / "final"
    engine.save_pretrained(final, tokenizer)
    return {"log": str(log), "log_bytes": log.stat().st_size, "steps": len(steps), "replay_s": seconds,
            "final_dir": str(final), "world_size": engine.world_size,
            "config": dataclasses.asdict(cfg)["optimizer"]}
