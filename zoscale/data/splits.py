"""A task's training, dev and held-out examples, from wherever ``data.path`` points, sampled per seed.

Three kinds of source:

* **A data set folder** as its distribution lays it out (``RTE/`` with SuperGLUE's ``train.jsonl``
  and ``val.jsonl``, ``squad/`` with ``train-v1.1.json`` and ``dev-v1.1.json``, ...; see
  :mod:`zoscale.data.formats`). MeZO's sampling: shuffle the train split with the seed; the first
  ``n_dev`` examples are the dev set (500 by default, 100 for CB and COPA), the next ``n_train`` the
  training set; the held-out (test) set is ``n_eval`` examples drawn with the same seed from the
  validation split (1000 by default).
* **Files**: ``data.path`` a JSONL, CSV or TSV file of records; the held-out set is
  ``data.eval_path`` and the dev set ``data.dev_path`` when given, else they are cut from
  ``data.path`` (the held-out set label-balanced for classification, as before).
* **The hub**, where a network exists: ``data.path=hub`` (the task's usual hub name) or
  ``hub:<name>[/<config>]`` (:mod:`zoscale.data.hub`), sampled like a data set folder.
* **Built in**: no ``data.path``, for a task that ships real data (``sst2``: the Rotten Tomatoes
  sentences; ``tweets``); sampled like a single file.

A split smaller than asked is used whole and reported (:attr:`TaskData.notes`); nothing is
dropped silently: every record goes through the task's template, and the first malformed one
stops the run with its file and line, before any model is loaded.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoscale.data.formats import read_jsonl, read_split, read_tsv, split_file
from zoscale.data.hub import is_hub, read_hub_split
from zoscale.data.sources import split_train_eval
from zoscale.data.tasks import Example, Task

__all__ = ["TaskData", "load_task_data", "read_records", "DEFAULT_N_EVAL_POOL", "DEFAULT_N_EVAL_DATASET"]

Record = tuple[dict[str, Any], str]
DEFAULT_N_EVAL_POOL = 200
"""Held-out size cut from one file or a built-in pool when ``data.n_eval`` is not set."""
DEFAULT_N_EVAL_DATASET = 1000
"""Held-out (test) size drawn from a data set's validation split when ``data.n_eval`` is not set (MeZO)."""
_INTEGER = re.compile(r"-?\d+")


@dataclass
class TaskData:
    """The examples of one run: ``train``, ``dev`` (may be empty) and ``eval`` (the held-out test set)."""

    train: list[Example]
    dev: list[Example]
    eval: list[Example]
    notes: list[str] = field(default_factory=list)


def _untyped(record: dict[str, Any]) -> dict[str, Any]:
    """CSV/TSV cells are text: integer-looking cells become ints (a label column of 0/1)."""
    return {k: int(v) if isinstance(v, str) and _INTEGER.fullmatch(v.strip()) else v for k, v in record.items()}


def _read_csv(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        start = reader.line_num + 1
        for row in reader:
            if row:
                if len(row) != len(header):
                    raise ValueError(f"{path} line {start}: expected {len(header)} fields like the header, got {len(row)}")
                records.append((dict(zip(header, row)), f"{path} line {start}"))
            start = reader.line_num + 1
    return records


def read_records(path: str | Path) -> list[Record]:
    """Records of one JSONL (``.jsonl``/``.json``), CSV or TSV file, each with its ``file line N``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = read_jsonl(path)
    elif suffix == ".csv":
        records = [(_untyped(r), w) for r, w in _read_csv(path)]
    elif suffix == ".tsv":
        records = [(_untyped(r), w) for r, w in read_tsv(path)]
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl, .json, .csv or .tsv")
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _dataset_split(folder: Path, dataset: str, split: str) -> list[Record]:
    records = read_split(folder, dataset, split)
    if split_file(folder, dataset, split).suffix.lower() == ".tsv":  # GLUE's SST-2: text cells
        records = [(_untyped(r), w) for r, w in records]
    return records


def _take(examples: list[Example], n: int, what: str, notes: list[str]) -> list[Example]:
    if len(examples) < n:
        notes.append(f"{what}: {len(examples)} examples, fewer than the {n} asked: using all of them")
    return examples[:n]


def _split_pool(task: Task, examples: list[Example], n_take: int, n_eval: int,
                seed: int) -> tuple[list[Example], list[Example]]:
    """(``n_take`` examples for training and dev, held-out): label-balanced held-out examples for
    classification (:func:`~zoscale.data.sources.split_train_eval`), else a seeded shuffle."""
    if task.family.name == "classification":
        rows = [{"label": ex.label, "example": ex} for ex in examples]
        rest, held_out = split_train_eval(rows, n_take, n_eval, seed)
        return [r["example"] for r in rest], [r["example"] for r in held_out]
    order = list(examples)
    random.Random(seed).shuffle(order)
    if len(order) < n_eval + n_take:
        raise ValueError(f"Not enough rows: {len(order)} rows, need {n_eval} for evaluation and {n_take} for training")
    return order[n_eval:n_eval + n_take], order[:n_eval]


def _from_dataset(task: Task, read: Callable[[str], list[Record]], source: str, data: Any, seed: int) -> TaskData:
    """MeZO's sampling from a data set's ``train`` and ``validation`` splits (``read(split)``)."""
    notes: list[str] = []
    train_split = task.examples(read("train"))
    random.Random(seed).shuffle(train_split)
    n_dev = task.spec.n_dev if data.n_dev is None else data.n_dev
    if len(train_split) <= n_dev:
        raise ValueError(f"{source} train split: {len(train_split)} examples leave none for training after a dev "
                         f"set of {n_dev} (lower data.n_dev)")
    dev = train_split[:n_dev]
    train = _take(train_split[n_dev:], data.n_train, f"{source} train split (after the dev set)", notes)
    validation = task.examples(read("validation"))
    n_eval = DEFAULT_N_EVAL_DATASET if data.n_eval is None else data.n_eval
    if len(validation) < n_eval:
        notes.append(f"{source} validation split: {len(validation)} examples, fewer than the {n_eval} asked: "
                     "using all of them")
    held_out = random.Random(seed).sample(validation, min(n_eval, len(validation)))
    return TaskData(train, dev, held_out, notes)


def _from_files(task: Task, records: list[Record], data: Any, seed: int) -> TaskData:
    """Training (and dev) examples from ``records``; held-out and dev from their own files if given."""
    notes: list[str] = []
    examples = task.examples(records)
    n_eval = DEFAULT_N_EVAL_POOL if data.n_eval is None else data.n_eval
    dev: list[Example] = []
    if data.dev_path is not None:
        dev = task.examples(read_records(data.dev_path))
        dev = _take(dev, len(dev) if data.n_dev is None else data.n_dev, str(data.dev_path), notes)
    n_dev = 0 if data.dev_path is not None else (data.n_dev or 0)
    if data.eval_path is not None:
        held_out = _take(task.examples(read_records(data.eval_path)), n_eval, str(data.eval_path), notes)
        rest = list(examples)
        random.Random(seed).shuffle(rest)
        if len(rest) < data.n_train + n_dev:
            raise ValueError(f"Not enough rows: {len(rest)} training rows, need {data.n_train + n_dev}")
    else:
        rest, held_out = _split_pool(task, examples, data.n_train + n_dev, n_eval, seed)
    if n_dev:
        dev = rest[:n_dev]
    return TaskData(rest[n_dev:n_dev + data.n_train], dev, held_out, notes)


def load_task_data(task: Task, data: Any, seed: int) -> TaskData:
    """The run's examples for ``task`` from a ``DataConfig`` (see the module docstring)."""
    if data.path is None:
        if task.spec.builtin is None:
            raise ValueError(f"task {task.name!r} has no built-in data: set data.path (a data set folder or a file)")
        return _from_files(task, task.spec.builtin(), data, seed)
    if is_hub(data.path):
        return _from_dataset(task, lambda split: read_hub_split(data.path, task.spec.dataset, split), data.path,
                             data, seed)
    path = Path(data.path)
    if path.is_dir():
        dataset = task.spec.dataset
        if dataset is None:
            raise ValueError(f"task {task.name!r} reads files, not a data set folder: data.path={path} is a folder")
        return _from_dataset(task, lambda split: _dataset_split(path, dataset, split), str(path), data, seed)
    return _from_files(task, read_records(path), data, seed)
