"""The training loop: a task + a model on an engine + a ZO optimizer, metrics, held-out evaluation.

Four pieces, as torchtitan's ``Trainer`` has them: :func:`build` (data, model, engine, optimizer,
resume), :func:`train_step` (one optimizer step on this step's batch), :func:`evaluate_run` (the
held-out set on every engine) and :func:`finish` (final evaluation, saving, the summary). The loop
has no per-algorithm and no per-task branches: the optimizer and the task carry the difference.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from zoscale.data.splits import TaskData, load_task_data
from zoscale.data.tasks import Encoder, Example, Task, build_task
from zoscale.engines.base import Engine, EngineBuilder
from zoscale.engines.local import LocalBuilder
from zoscale.models import load_causal_lm, load_tokenizer, prepare_model, weights_folder
from zoscale.optim import build_optimizer
from zoscale.optim.base import ZOOptimizer
from zoscale.peft import adapter_parameters, apply_peft, initialise_adapters
from zoscale.train.checkpoint import save_checkpoint
from zoscale.train.config import TrainConfig
from zoscale.train.evaluation import evaluate, rank_sync
from zoscale.train.preemption import EXIT_PREEMPTED, STOP_FILE, Preempted, PreemptionFlag
from zoscale.train.reporting import METRICS_FILE, Reporter
from zoscale.train.resume import open_step_log, resume
from zoscale.train.run_folder import prepare_run_folder, run_identity, write_run_folder
from zoscale.train.step_log_file import StepLogWriter

__all__ = ["Run", "batches", "build", "evaluate_run", "finish", "load_model", "train", "train_step",
           "trainable_parameters"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def trainable_parameters(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters to optimise; with ``non_embedding`` the embeddings (and a tied head) are frozen."""
    frozen: set[int] = set()
    if which == "non_embedding":
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                frozen.update(id(p) for p in module.parameters())
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and any(id(p) in frozen for p in head.parameters()):
            frozen.update(id(p) for p in head.parameters())  # tied to the embedding
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            out.append((name, p))
    return out


def batches(rows: list, batch_size: int, seed: int, start_step: int = 0) -> Iterator[list]:
    """Endless global batches: a fresh seeded permutation every epoch (local RNG, never the global one).

    ``start_step`` skips that many batches, so a resumed run sees the batches it would have seen.
    """
    per_epoch = max(1, len(rows) // batch_size)
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield [rows[i] for i in order[index * batch_size:(index + 1) * batch_size]]
        step += 1


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Run:
    """Everything one fine-tune holds while it runs."""

    cfg: TrainConfig
    task: Task
    data: TaskData
    engine: Engine
    optimizer: ZOOptimizer
    encoder: Encoder
    tokenizer: Any
    out: Path
    start: int
    reporter: Reporter | None
    stream: Iterator[list[Example]]
    train_truncated: int
    resumed_from: str | None = None
    identity: dict[str, Any] | None = None
    log: StepLogWriter | None = None

    @property
    def lead(self) -> bool:
        return self.engine.rank == 0

    def record(self, entry: dict[str, Any]) -> None:
        """Rank 0: the record, stamped with ``time`` and ``elapsed_s``, to metrics.jsonl (and TensorBoard)."""
        if self.reporter is not None:
            self.reporter.record(entry)


def _prepare_once(name: str) -> None:
    """One-time model preparation on rank 0 while the others wait (no concurrent conversion)."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        prepare_model(name)
    if distributed:
        dist.barrier()


def load_model(cfg: TrainConfig, builder: EngineBuilder) -> tuple[torch.nn.Module, Any]:
    """The configured model (prepared once, built in the engine's loading context) and its tokenizer."""
    _prepare_once(cfg.model.name)
    # An engine that keeps its own precision (FSDP2: fp32 shards, bf16 compute) says how to load.
    dtype = getattr(builder, "load_dtype", None) or _DTYPES[cfg.model.dtype]
    model = _model_from_files(cfg, builder, dtype)
    if model is not None:
        tokenizer = load_tokenizer(cfg.model.name)
    else:
        with builder.loading():
            model, tokenizer = load_causal_lm(cfg.model.name, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model.name!r} has no tokenizer files; a prompt task needs one")
    model.eval()  # deterministic forwards: both SPSA evaluations must see the same function
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and cfg.data.max_length > context:
        raise ValueError(f"data.max_length {cfg.data.max_length} exceeds the context of model {cfg.model.name!r} "
                         f"({context} positions); prompts are truncated from the left to data.max_length")
    return model, tokenizer


def _model_from_files(cfg: TrainConfig, builder: EngineBuilder, dtype: torch.dtype) -> torch.nn.Module | None:
    """The model built by the engine from its safetensors files, each rank reading only its part
    (FSDP2 from meta, ZeRO-3 from its partitions); None where the engine or model does not
    allow it (the tiny models are built in code; peft adapters need the whole-model path)."""
    folder = weights_folder(cfg.model.name)
    loader = getattr(builder, "model_from_files", None)
    if folder is None or loader is None or not getattr(builder, "stream_weights", False) or cfg.model.peft is not None:
        return None
    return loader(folder, dtype)


def _audit(task: Task, examples: list[Example], encoder: Encoder, chunk: int = 64) -> int:
    """Tokenise every training batch once before any parameter moves: a candidate that tokenises to
    nothing or a prompt that cannot fit fails here, naming its record; returns the prompts truncated."""
    return sum(int(task.family.train_batch(examples[i:i + chunk], encoder)["truncated"])
               for i in range(0, len(examples), chunk))


def _wrap(cfg: TrainConfig, model: torch.nn.Module, builder: EngineBuilder) -> tuple[Engine, ZOOptimizer]:
    if cfg.model.peft is not None:  # adapters only; the base weights are frozen
        model = apply_peft(model, cfg.model.peft, seed=cfg.seed)
    else:
        trainable_parameters(model, cfg.model.trainable)  # freeze before wrapping
    engine: Engine = builder.build(model)
    initialise_adapters(engine.module, engine.shards, cfg.model.peft, cfg.seed)  # prefix from real activations
    # After wrapping: FSDP2 replaces every Parameter object (DeepSpeed partitions them in place).
    params = (adapter_parameters(engine.module) if cfg.model.peft is not None
              else trainable_parameters(engine.module, cfg.model.trainable))
    optimizer = build_optimizer(cfg.optimizer.type, params, {"seed": cfg.seed, **cfg.optimizer.params},
                                shards=engine.shards, module=engine.module)
    return engine, optimizer


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build(cfg: TrainConfig, builder: EngineBuilder | None = None) -> Run:
    """Data and the run folder (checked before any model loads), model, engine, optimizer, resume."""
    started = time.time()  # metrics' elapsed_s counts from here: loading is part of the run's time
    task = build_task(cfg.data)
    data = load_task_data(task, cfg.data, cfg.seed)
    builder = builder or LocalBuilder()
    folder = prepare_run_folder(cfg, run_identity(cfg, data.train, builder.name, _world_size()))
    model, tokenizer = load_model(cfg, builder)
    encoder = Encoder(tokenizer, cfg.data.max_length)
    train_truncated = _audit(task, data.train, encoder)
    engine, optimizer = _wrap(cfg, model, builder)
    out = Path(cfg.output_dir)
    start, resumed = resume(folder, optimizer, engine)
    folder.step = start
    reporter = None
    if engine.rank == 0:
        write_run_folder(folder)
        if resumed is not None:
            print(f"[zoscale] resuming from {resumed} (step {start})", file=sys.stderr, flush=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        reporter = Reporter(out, cfg.report_to, start, started)
    log = open_step_log(folder, optimizer, cfg, start, engine.rank)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * engine.world_size
    stream = batches(data.train, per_step, cfg.seed, start_step=start)
    return Run(cfg, task, data, engine, optimizer, encoder, tokenizer, out, start, reporter, stream, train_truncated,
               resumed, folder.identity, log)


def _micro_batches(run: Run, global_batch: list[Example]) -> list[dict[str, Any]]:
    """This rank's share of the step's examples, as ``gradient_accumulation_steps`` micro-batches."""
    micro, accumulate = run.cfg.batch_size, run.cfg.gradient_accumulation_steps
    mine = global_batch[run.engine.rank * micro * accumulate:(run.engine.rank + 1) * micro * accumulate]
    return [run.task.family.train_batch(mine[i * micro:(i + 1) * micro], run.encoder) for i in range(accumulate)]


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step on the next global batch; the metrics record of that step."""
    parts = _micro_batches(run, next(run.stream))
    family, module, sync = run.task.family, run.engine.module, rank_sync(run.engine)

    def closure() -> torch.Tensor:
        losses = [family.loss(module, part, sync) for part in parts]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    t0 = time.perf_counter()
    loss = run.optimizer.step(closure)
    dt = time.perf_counter() - t0
    examples = run.cfg.batch_size * run.cfg.gradient_accumulation_steps * run.engine.world_size
    return {
        "step": step,
        "loss": loss,
        "projected_grad": run.optimizer.last_step["projected_grad"],
        "lr": run.optimizer.last_step["lr"],
        "step_s": dt,
        **{f"{k}_s": v for k, v in run.optimizer.last_step_timing.items()},
        "examples_per_s": examples / dt,
        "peak_memory_mb": _peak_memory_mb(),
    }


def evaluate_run(run: Run, examples: list[Example], prefix: str = "eval",
                 predictions: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The task's metrics on ``examples``, keyed ``<prefix>_<metric>`` (and ``<prefix>_truncated``)."""
    run.optimizer.flush()  # a two-pass step holds its last update until the next pass
    metrics, rows = evaluate(run.engine, run.task, examples, run.encoder, run.cfg.eval_batch_size, predictions)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}, rows


def finish(run: Run, before: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Final held-out (and dev) evaluation, predictions, the final folder; the run's summary."""
    cfg = run.cfg
    after, rows = evaluate_run(run, run.data.eval, predictions=cfg.data.predictions)
    dev = evaluate_run(run, run.data.dev, prefix="dev")[0] if run.data.dev else {}
    run.record({"step": cfg.steps, **after, **dev})
    if run.reporter is not None:
        run.reporter.close()
    if run.log is not None:
        run.log.close()
    if rows is not None and run.lead:
        with (run.out / "predictions.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    final_dir = run.out / "final" if cfg.save_final else None
    if final_dir is not None:  # a Hugging Face folder, or a peft adapter folder
        run.engine.save_pretrained(final_dir, run.tokenizer)
    metric_names = run.task.family.metrics
    return {
        "task": run.task.name,
        **{f"{m}_before": before[f"eval_{m}"] for m in metric_names},
        **{f"{m}_after": after[f"eval_{m}"] for m in metric_names},
        **{k: v for k, v in dev.items() if not k.endswith("truncated")},
        "n_train": len(run.data.train), "n_eval": len(run.data.eval), "n_dev": len(run.data.dev),
        "train_truncated": run.train_truncated, "eval_truncated": after["eval_truncated"],
        "data_notes": run.data.notes,
        "start_step": run.start,
        "resumed_from": run.resumed_from,
        "steps": cfg.steps,
        "world_size": run.engine.world_size,
        "seconds": time.perf_counter() - t_start,
        "metrics": str(run.out / METRICS_FILE),
        "predictions": str(run.out / "predictions.jsonl") if rows is not None else None,
        "final_dir": str(final_dir) if final_dir else None,
    }


def train(cfg: TrainConfig, progress: bool = True, builder: EngineBuilder | None = None) -> dict[str, Any]:
    """Run a fine-tune described by ``cfg``; returns a summary (metrics before/after, timings, paths).

    Args:
        cfg: the run configuration.
        progress: show a progress bar (rank 0).
        builder: makes the engine; default :class:`~zoscale.engines.local.LocalBuilder` (one
            process, or data-parallel replicas when ``torch.distributed`` is initialised).
    """
    run = build(cfg, builder)
    t_start = time.perf_counter()
    headline = f"eval_{run.task.family.metrics[0]}"
    before, _ = evaluate_run(run, run.data.eval)
    run.record({"step": run.start, **before, "train_truncated": run.train_truncated})
    bar = None
    if progress and run.lead:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=run.start, desc="zo-train", dynamic_ncols=True)
    score = before[headline]
    preemption = PreemptionFlag(run.out / STOP_FILE).install()
    try:
        _train_steps(run, bar, headline, score, preemption)
    finally:
        preemption.uninstall()
    if bar is not None:
        bar.close()
    return finish(run, before, t_start)


def _train_steps(run: Run, bar: Any, headline: str, score: float, preemption: PreemptionFlag) -> None:
    """Steps ``run.start + 1 .. cfg.steps``: log, evaluate, checkpoint; stop on a preemption signal."""
    cfg = run.cfg
    for step in range(run.start + 1, cfg.steps + 1):
        first = len(run.optimizer.step_log)
        entry = train_step(run, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            entry.update(evaluate_run(run, run.data.eval)[0])
            score = entry[headline]
        # metrics.jsonl first, then the log: a run killed in between redoes the step (its metrics
        # record is dropped on resume), so every step in the log has its record.
        run.record(entry)
        if run.log is not None:  # the step is a resume point as soon as it is in the log
            run.log.append(step, run.optimizer.step_log[first:])
        checkpointed = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        if checkpointed:
            run.record({"step": step, **_checkpoint(run, step)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", score=f"{score:.3f}")
        signum = preemption.agreed(run.engine)
        if signum:
            if not checkpointed:
                run.record({"step": step, **_checkpoint(run, step)})
            if run.lead:
                (run.out / STOP_FILE).unlink(missing_ok=True)  # acted on: a resumed run must not stop again
                print(f"[zoscale] preempted after step {step}: checkpoint written; exit {EXIT_PREEMPTED} "
                      "(resume with --resume)", file=sys.stderr, flush=True)
            if run.log is not None:
                run.log.close()
            if run.reporter is not None:
                run.reporter.close()
            raise Preempted(step, signum)


def _checkpoint(run: Run, step: int) -> dict[str, Any]:
    """Write the full checkpoint of ``step``; its size (every rank's files) and seconds, for metrics."""
    t0 = time.perf_counter()
    path = save_checkpoint(run.out / "checkpoints", step, run.optimizer, run.engine.rank, run.engine.world_size,
                           run.cfg.keep_checkpoints, run.identity)
    seconds = time.perf_counter() - t0
    return {"checkpoint_s": seconds, "checkpoint_bytes": sum(f.stat().st_size for f in path.iterdir())}
