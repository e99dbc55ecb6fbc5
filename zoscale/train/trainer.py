"""The training loop: model + data + a ZO optimizer, metrics, held-out evaluation.

The loop has no per-algorithm branches: the optimizer carries the difference. It runs the
closure (a forward on this step's batch) through ``optimizer.step`` and records what happened.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from zoscale.data import SST2Task, load_labelled_file, load_rotten_tomatoes, loss_fn, split_train_eval
from zoscale.data.tasks import label_logits
from zoscale.models import load_causal_lm, prepare_model
from zoscale.optim import build_optimizer
from zoscale.peft import adapter_parameters, apply_peft, initialise_adapters, save_adapter
from zoscale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zoscale.train.config import TrainConfig
from zoscale.train.engine import Engine, EngineBuilder, LocalBuilder

__all__ = ["train", "trainable_parameters", "batches", "evaluate"]

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


def batches(rows: list[dict], batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[dict]]:
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


@torch.no_grad()
def evaluate(engine: Engine, rows: list[dict], tokenizer: Any, task: SST2Task, label_ids: list[int],
             batch_size: int, max_length: int) -> float:
    """Held-out accuracy, each rank scoring a slice; every rank runs the same number of forwards.

    Sharded engines all-gather parameters inside each forward, so a rank with fewer batches
    would leave the others waiting: short slices are padded with repeats that are not counted.
    """
    rank, world = engine.rank, engine.world_size
    mine = rows[rank::world]
    n_batches = -(-len(rows[0::world]) // batch_size)  # rank 0 has the longest slice
    correct = 0
    for b in range(n_batches):
        part = mine[b * batch_size:(b + 1) * batch_size]
        real = len(part)
        padded = part + [rows[0]] * (batch_size - real) if real < batch_size else part
        batch = task.collate(padded, tokenizer, max_length)
        pred = label_logits(engine.module, batch, label_ids).argmax(-1)[:real].cpu()
        correct += int((pred == batch["labels"][:real]).sum())
    counts = engine.all_reduce_sum(torch.tensor([correct, len(mine)], dtype=torch.float64))
    return float(counts[0] / counts[1])


def _load_model(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    model, tokenizer = load_causal_lm(cfg.model.name, dtype=_DTYPES[cfg.model.dtype])
    if tokenizer is None:
        raise ValueError(f"model {cfg.model.name!r} has no tokenizer files; a prompt task needs one")
    return model, tokenizer


def _prepare_once(name: str) -> None:
    """One-time model preparation on rank 0 while the others wait (no concurrent conversion)."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        prepare_model(name)
    if distributed:
        dist.barrier()


def train(cfg: TrainConfig, progress: bool = True, builder: EngineBuilder | None = None) -> dict[str, Any]:
    """Run a fine-tune described by ``cfg``; returns a summary (accuracies, timings, paths).

    Args:
        cfg: the run configuration.
        progress: show a progress bar (rank 0).
        builder: makes the engine; default :class:`~zoscale.train.engine.LocalBuilder` (one
            process, or data-parallel replicas when ``torch.distributed`` is initialised).
    """
    out = Path(cfg.output_dir)
    # Data first: a malformed file fails before the model is loaded.
    rows = load_rotten_tomatoes() if cfg.data.path is None else load_labelled_file(cfg.data.path)
    train_rows, eval_rows = split_train_eval(rows, cfg.data.n_train, cfg.data.n_eval, cfg.seed)
    task = SST2Task(label_words=tuple(cfg.data.label_words))

    builder = builder or LocalBuilder()
    _prepare_once(cfg.model.name)
    with builder.loading():
        model, tokenizer = _load_model(cfg)
    model.eval()  # deterministic forwards: both SPSA evaluations must see the same function
    label_ids = task.label_token_ids(tokenizer)
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
    rank, world = engine.rank, engine.world_size
    lead = rank == 0
    ckpt_root = out / "checkpoints"

    start = 0
    if cfg.resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            raise FileNotFoundError(f"resume requested but {ckpt_root} holds no complete checkpoint")
        start = load_checkpoint(latest, optimizer, rank, world)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics = (out / "metrics.jsonl").open("a" if cfg.resume else "w") if lead else None

    def record(entry: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

    def run_eval() -> float:
        return evaluate(engine, eval_rows, tokenizer, task, label_ids, cfg.eval_batch_size, cfg.data.max_length)

    t_start = time.perf_counter()
    acc_before = run_eval()
    record({"step": start, "eval_accuracy": acc_before})
    bar = None
    if progress and lead:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="zo-train", dynamic_ncols=True)
    micro = cfg.batch_size
    stream = batches(train_rows, micro * world, cfg.seed, start_step=start)
    acc = acc_before
    for step in range(start + 1, cfg.steps + 1):
        global_batch = next(stream)
        batch = task.collate(global_batch[rank * micro:(rank + 1) * micro], tokenizer, cfg.data.max_length)
        t0 = time.perf_counter()
        loss = optimizer.step(lambda: loss_fn(engine.module, batch, label_ids))
        dt = time.perf_counter() - t0
        last = optimizer.step_log[-1]
        entry = {
            "step": step,
            "loss": loss,
            "projected_grad": last["grad"][0],
            "lr": last["lr"][0] * optimizer.param_groups[0]["q"],
            "step_s": dt,
            **{f"{k}_s": v for k, v in optimizer.last_step_timing.items()},
            "examples_per_s": micro * world / dt,
            "peak_memory_mb": _peak_memory_mb(),
        }
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            acc = run_eval()
            entry["eval_accuracy"] = acc
        record(entry)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_root, step, optimizer, rank, world, cfg.keep_checkpoints)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
    acc_after = run_eval()
    record({"step": cfg.steps, "eval_accuracy": acc_after})
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    final_dir = out / "final" if cfg.save_final else None
    if final_dir is not None and cfg.model.peft is not None:
        save_adapter(engine.module, final_dir, tokenizer)  # a peft adapter folder
    elif final_dir is not None:
        engine.save_pretrained(final_dir, tokenizer)
    return {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "start_step": start,
        "steps": cfg.steps,
        "world_size": world,
        "seconds": time.perf_counter() - t_start,
        "metrics": str(out / "metrics.jsonl"),
        "final_dir": str(final_dir) if final_dir else None,
    }
