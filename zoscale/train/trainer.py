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

from zoscale.data import SST2Task, evaluate_accuracy, load_labelled_file, load_rotten_tomatoes, loss_fn, split_train_eval
from zoscale.models import load_causal_lm
from zoscale.optim import build_optimizer
from zoscale.train.config import TrainConfig

__all__ = ["train", "trainable_parameters", "batches"]

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
    """Endless batches: a fresh seeded permutation every epoch (local RNG, never the global one)."""
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


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run a fine-tune described by ``cfg``; returns a summary (accuracies, timings, paths)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    # Data first: a malformed file fails before the model is loaded.
    rows = load_rotten_tomatoes() if cfg.data.path is None else load_labelled_file(cfg.data.path)
    train_rows, eval_rows = split_train_eval(rows, cfg.data.n_train, cfg.data.n_eval, cfg.seed)
    task = SST2Task(label_words=tuple(cfg.data.label_words))

    model, tokenizer = load_causal_lm(cfg.model.name, dtype=_DTYPES[cfg.model.dtype])
    if tokenizer is None:
        raise ValueError(f"model {cfg.model.name!r} has no tokenizer files; a prompt task needs one")
    model.eval()  # deterministic forwards: both SPSA evaluations must see the same function
    label_ids = task.label_token_ids(tokenizer)
    params = trainable_parameters(model, cfg.model.trainable)
    options = {"seed": cfg.seed, **cfg.optimizer.params}
    optimizer = build_optimizer(cfg.optimizer.type, params, options)

    def evaluate() -> float:
        return evaluate_accuracy(model, eval_rows, tokenizer, task, batch_size=cfg.eval_batch_size,
                                 max_length=cfg.data.max_length)

    metrics = (out / "metrics.jsonl").open("w")

    def record(entry: dict[str, Any]) -> None:
        metrics.write(json.dumps(entry) + "\n")
        metrics.flush()

    t_start = time.perf_counter()
    acc_before = evaluate()
    record({"step": 0, "eval_accuracy": acc_before})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="zo-train", dynamic_ncols=True)
    stream = batches(train_rows, cfg.batch_size, cfg.seed)
    acc = acc_before
    for step in range(1, cfg.steps + 1):
        batch = task.collate(next(stream), tokenizer, cfg.data.max_length)
        t0 = time.perf_counter()
        loss = optimizer.step(lambda: loss_fn(model, batch, label_ids))
        dt = time.perf_counter() - t0
        last = optimizer.step_log[-1]
        entry = {
            "step": step,
            "loss": loss,
            "projected_grad": last["grad"][0],
            "lr": last["lr"][0] * optimizer.param_groups[0]["q"],
            "step_s": dt,
            **{f"{k}_s": v for k, v in optimizer.last_step_timing.items()},
            "examples_per_s": cfg.batch_size / dt,
            "peak_memory_mb": _peak_memory_mb(),
        }
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            acc = evaluate()
            entry["eval_accuracy"] = acc
        record(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
    acc_after = evaluate()
    record({"step": cfg.steps, "eval_accuracy": acc_after})
    if bar is not None:
        bar.close()
    metrics.close()
    final_dir = None
    if cfg.save_final:
        final_dir = out / "final"
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
    return {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "steps": cfg.steps,
        "seconds": time.perf_counter() - t_start,
        "metrics": str(out / "metrics.jsonl"),
        "final_dir": str(final_dir) if final_dir else None,
    }
