"""``ZOTrainer``: ``transformers.Trainer`` with a zoscale zeroth-order optimizer.

A script changes ``Trainer`` to ``ZOTrainer`` and keeps its ``TrainingArguments``, data collator,
datasets and ``compute_metrics``. What differs from ``Trainer``, and why:

* **The step.** ``training_step`` runs the zoscale optimizer's ``step(closure)``; the closure
  computes the Trainer's loss (``compute_loss``) under ``torch.no_grad()`` on the optimizer step's
  micro-batches. There is no backward and no first-order update: the object the loop holds as
  ``self.optimizer`` (:class:`LoopOptimizer`) shares the ZO optimizer's param groups, so the lr
  scheduler drives the ZO lr, but its ``step()`` and ``zero_grad()`` do nothing (the step already
  ran), gradient clipping is skipped (there are no gradients: ``max_grad_norm`` is ignored, with
  one warning) and ``accelerator.backward`` is never called. Activation (gradient) checkpointing
  is switched off with a warning (it only saves activations kept for a backward).
* **Gradient accumulation.** The ``gradient_accumulation_steps`` micro-batches of one optimizer
  step become one closure: each SPSA evaluation runs all of them and combines their losses as the
  Trainer would before its backward (summed when the loss is already normalised over the
  accumulated tokens, ``num_items_in_batch``; else averaged), so one ZO step per optimizer step.
  The loop's earlier micro-batches only queue their inputs (their reported loss is 0; the step's
  is reported on the last one, so the logged loss is the step's).
* **Train mode.** The closure runs the model in eval mode: both forwards of an SPSA pair must
  evaluate the same function, which dropout would break (MeZO does the same).
* **Engines.** One process or data-parallel replicas (``torchrun``, no DDP wrapper: replicas stay
  equal because they apply the same seeded update; what differs across ranks at the start, such
  as unseeded peft adapters, is broadcast from rank 0 once, as DDP would: ``zoscale.hf.agree``),
  or DeepSpeed ZeRO through ``TrainingArguments(deepspeed=...)``. transformers' ``deepspeed_init``
  would hand accelerate a ``DummyOptim`` (or the Trainer's AdamW), and DeepSpeed would then build
  its own optimizer: for a zoscale type it fails, for any optimizer ZeRO-3 wraps it in its
  stage-3 optimizer (fp32 master and gradient partitions, ~4.5x the shard, and a ``step()``
  that needs gradients). So ``ZOTrainer`` resolves the config the same way
  (``trainer_config_finalize``: the ``"auto"`` values from the TrainingArguments and the model)
  and builds the DeepSpeed engine itself with zoscale's ``DeepSpeedEngine`` (``deepspeed.initialize``
  without any optimizer), then the ZO optimizer on its shards; the loop gets that engine as
  ``model_wrapped``/``deepspeed``. With accelerate's FSDP2 plugin (``TrainingArguments(fsdp=...)``
  or ``accelerate launch`` with an FSDP config) the same: zoscale's ``FSDPEngine`` shards the
  model with ``fully_shard`` (each block, then the root; compute dtype from the plugin's mixed
  precision; what differs across ranks is first broadcast from rank 0; HSDP from accelerate's
  ``ParallelismConfig``) and the ZO optimizer steps on its DTensor shards; accelerate prepares
  no model and no optimizer. FSDP1 and ``cpu_offload`` are refused.
* **Logs.** Each log adds the last ZO step's projected gradient, seconds and split by phase
  (``zo_projected_grad``, ``zo_step_s``, ``zo_forward_s``, ...); ``report_to`` gets them through
  transformers' own callbacks, and ``<output_dir>/metrics.jsonl`` holds them as zoscale's records
  (``zoscale.hf.metrics``), which ``launch/plot.py`` draws.
* **Checkpoints.** ``checkpoint-N/`` holds what ``Trainer`` writes (the model, trainer state,
  scheduler, RNG states) and, in ``checkpoint-N/zoscale/``, zoscale's full checkpoint: the
  trainable shards (and master shards), the optimizer state and its step log, through
  ``torch.distributed.checkpoint`` (``zoscale.train.checkpoint``: loadable on any layout).
  ``resume_from_checkpoint`` restores it, so a resumed run continues the same trajectory.
  ``save_model`` writes a Hugging Face folder (under ZeRO-3 consolidated from the partitions).
"""

from __future__ import annotations

import collections
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.utils import logging

from zoscale.hf.agree import make_ranks_agree
from zoscale.hf.config import resolve_zo_config
from zoscale.hf.metrics import MetricsCallback
from zoscale.optim import build_optimizer
from zoscale.optim.base import ZOOptimizer

__all__ = ["ZOTrainer", "LoopOptimizer", "ZO_CHECKPOINT_DIR"]

logger = logging.get_logger(__name__)

#: The folder inside ``checkpoint-N/`` that holds zoscale's checkpoint.
ZO_CHECKPOINT_DIR = "zoscale"
SCHEDULER_NAME = "scheduler.pt"
TRAINING_ARGS_NAME = "training_args.bin"


class LoopOptimizer(torch.optim.Optimizer):
    """What the Trainer's loop holds as ``self.optimizer``: a view of the ZO optimizer.

    ``param_groups`` and ``state`` are the ZO optimizer's own objects, so the lr scheduler (built
    on this object) sets the lr the next ZO step uses; ``state_dict``/``load_state_dict`` are the
    ZO optimizer's. ``step()`` without a closure does nothing (the loop calls it after
    ``training_step``, which already took the ZO step), ``step(closure)`` takes a ZO step, and
    ``zero_grad`` does nothing (nothing has gradients). torch's ``Optimizer.__init__`` is not
    called: it would copy the param groups instead of sharing them.
    """

    def __init__(self, zo: ZOOptimizer) -> None:  # noqa: D107 (see the class)
        self.zo = zo
        self.defaults = zo.defaults
        self._optimizer_step_pre_hooks: dict[int, Any] = collections.OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Any] = collections.OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Any] = collections.OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Any] = collections.OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Any] = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Any] = collections.OrderedDict()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.zo.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.zo.state

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return None if closure is None else self.zo.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zo.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"LoopOptimizer({type(self.zo).__name__})"


def _split_args(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The TrainingArguments given to ``Trainer(model, args, ...)``, positionally or by name."""
    return kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)


class ZOTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer step is a zoscale zeroth-order step.

    Args:
        *args, **kwargs: ``transformers.Trainer``'s.
        zo_config: ``{"type": "MeZO", "params": {"eps": 1e-3, ...}}`` (any registered zoscale
            optimizer, ``zoscale.optim.OPTIMIZERS``), or None: the DeepSpeed JSON's
            ``"optimizer"`` section when it names one, else MeZO. ``lr`` defaults to
            ``TrainingArguments.learning_rate`` and ``seed`` to its ``seed`` (see
            ``zoscale.hf.config``); ``weight_decay``, when not given, is the TrainingArguments'
            on the parameters ``Trainer`` decays (none by default).

    Attributes:
        zo_optimizer: the zoscale optimizer (built at the start of training, or on first use).
        zo_engine: zoscale's engine around the model (``LocalEngine``, ``DeepSpeedEngine`` or ``FSDPEngine``).

    Raises:
        ValueError: a first-order optimizer in the DeepSpeed JSON, an optimizer given both ways,
            a DeepSpeed ``"scheduler"`` section, ``optimizers=`` with a non-zoscale optimizer,
            ``torch_compile``, ``nn.DataParallel`` (several
            GPUs in one process); an invalid optimizer option (named).
            FSDP1 or FSDP ``cpu_offload`` in accelerate's plugin.
    """

    def __init__(self, *args: Any, zo_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not hasattr(Trainer, "_prepare_for_training"):
            import transformers

            raise ImportError(f"ZOTrainer replaces Trainer._prepare_for_training, which transformers "
                              f"{transformers.__version__} does not have (tested with 5.24)")
        training_args = _split_args(args, kwargs)
        if training_args is not None:
            # Before Trainer builds anything: the optimizer section is checked and taken out of
            # the config transformers and accelerate hand to DeepSpeed.
            self.zo_type, self.zo_params, self.zo_source = resolve_zo_config(zo_config, training_args)
            _take_optimizer_out_of_ds_config(training_args)
        super().__init__(*args, **kwargs)
        if training_args is None:
            self.zo_type, self.zo_params, self.zo_source = resolve_zo_config(zo_config, self.args)
        # Again: trl's SFTTrainer rebuilds the arguments; under accelerate launch, Trainer builds
        # the processed config in the accelerator's plugin only now.
        _take_optimizer_out_of_ds_config(self.args, getattr(self.accelerator.state, "deepspeed_plugin", None))
        self._refuse_unsupported()
        given = self.optimizer
        if given is not None and not isinstance(given, ZOOptimizer):
            raise ValueError(f"ZOTrainer got optimizers=({type(given).__name__}, ...), a first-order optimizer; "
                             "pass a zoscale optimizer, or none and zo_config")
        self.zo_optimizer: ZOOptimizer | None = given
        self.optimizer = None
        self.zo_engine: Any = None
        self._zo_pending: list[dict[str, Any]] = []
        self._zo_max_steps = 0
        self._zo_closure_calls = 0  # closure calls of the last ZO step (forward passes over its micro-batches)
        self._zo_in_step = False  # True while the ZO step (its closure) runs
        self._zo_step_s = 0.0  # seconds of the last ZO step
        self.add_callback(MetricsCallback())  # <output_dir>/metrics.jsonl, for launch/plot.py
        logger.info(f"ZOTrainer: {self.zo_type} {self.zo_params} (from {self.zo_source})")

    # ------------------------------------------------------------------ checks
    def _refuse_unsupported(self) -> None:
        a = self.args
        if getattr(a, "activation_checkpointing", False) or getattr(a, "gradient_checkpointing", False):
            # Switched off rather than refused: trl's SFTConfig turns it on by default.
            warnings.warn("ZOTrainer turns activation (gradient) checkpointing off: it saves memory on the "
                          "activations kept for a backward pass; a ZO step runs forwards only, under no_grad, and "
                          "keeps none, so it would only slow the forwards", stacklevel=3)
            a.activation_checkpointing = False
            if hasattr(a, "gradient_checkpointing"):
                a.gradient_checkpointing = False
        if a.torch_compile:
            raise ValueError("ZOTrainer: torch_compile is not supported: Trainer compiles the model inside "
                             "accelerate's prepare, which ZOTrainer does not use (it builds the engine itself); "
                             "pass an already compiled model (torch.compile(model)) instead")
        if a.n_gpu > 1:
            raise ValueError("ZOTrainer: several GPUs in one process (nn.DataParallel) are not supported; launch "
                             "one process per GPU (torchrun / deepspeed)")
        if self.is_fsdp_enabled:
            _check_fsdp_plugin(self.accelerator.state.fsdp_plugin)
            _hsdp_shape(getattr(self.accelerator, "parallelism_config", None))  # refuses tensor parallelism now
        if self.is_deepspeed_enabled and "scheduler" in self._ds_config():
            raise ValueError("ZOTrainer: the DeepSpeed config has a 'scheduler' section; DeepSpeed's schedulers step "
                             "DeepSpeed's optimizer, which ZOTrainer never creates: remove it and use "
                             "TrainingArguments' lr_scheduler_type / warmup_steps")
        if a.max_grad_norm and a.max_grad_norm > 0:
            warnings.warn(f"ZOTrainer ignores max_grad_norm={a.max_grad_norm}: a zeroth-order step has no gradient "
                          "to clip (set max_grad_norm=0 to silence this)", stacklevel=3)

    @property
    def _sharded(self) -> bool:
        """Whether an engine shards the model (DeepSpeed ZeRO or FSDP2): the engine is the loop's model."""
        return self.is_deepspeed_enabled or self.is_fsdp_enabled

    def _ds_config(self) -> dict[str, Any]:
        return self.accelerator.state.deepspeed_plugin.hf_ds_config.config

    # ------------------------------------------------------------------ building
    @property
    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _zo_setup(self) -> None:
        """Build zoscale's engine around the model and the ZO optimizer on its shards (once)."""
        if self.zo_engine is not None:
            return
        if self.is_deepspeed_enabled:
            from zoscale.engines.deepspeed import DeepSpeedEngine

            hf_cfg = self.accelerator.state.deepspeed_plugin.hf_ds_config
            hf_cfg.trainer_config_finalize(self.args, self.model, self._zo_max_steps)  # "auto" from args + model
            engine = DeepSpeedEngine(self.model, hf_cfg.config)
            self.model_wrapped = self.deepspeed = engine.engine
        elif self.is_fsdp_enabled:
            from zoscale.engines.fsdp import FSDPEngine

            self._start_from_rank_0()  # fully_shard keeps each rank's slice of its own tensors
            engine = FSDPEngine(self.model, hsdp=_hsdp_shape(getattr(self.accelerator, "parallelism_config", None)),
                                param_dtype=_fsdp_param_dtype(self.accelerator.state.fsdp_plugin))
            self.model = self.model_wrapped = engine.module  # Trainer's FSDP convention: both are the sharded model
        else:
            from zoscale.engines.local import LocalEngine

            self._start_from_rank_0()  # replicas start equal, as DDP makes them
            engine = LocalEngine(self.model)
            self.model_wrapped = self.model
        self.zo_engine = engine
        logger.info(f"ZOTrainer: {self.zo_type} on {type(engine).__name__}, {self._rank_world[1]} rank(s)")
        if self.zo_optimizer is not None:  # given through optimizers=(zo, ...)
            self.zo_optimizer.shards = engine.shards
        else:
            self.zo_optimizer = build_optimizer(self.zo_type, self._param_groups(engine.module), self.zo_params,
                                                shards=engine.shards, module=engine.module)
        self._register_with_accelerator()

    def _start_from_rank_0(self) -> None:
        """Give every rank rank 0's values of what was drawn differently (unseeded adapters or heads);
        see ``zoscale.hf.agree``. ZeRO-3 needs none of it: DeepSpeed broadcasts what it converts."""
        differed = make_ranks_agree(self.model)
        if differed and self._rank_world[0] == 0:
            shown = ", ".join(differed[:4]) + (f" and {len(differed) - 4} more" if len(differed) > 4 else "")
            logger.info(f"ZOTrainer: {len(differed)} tensors differed across ranks and now hold rank 0's values: "
                        f"{shown}")

    def _param_groups(self, module: torch.nn.Module) -> list[dict[str, Any]]:
        """Named trainable parameters; with the TrainingArguments' weight decay (when the ZO options
        set none) on the parameters ``Trainer`` decays, as its own optimizer groups them."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZOTrainer: the model has no trainable parameters (requires_grad=True)")
        if "weight_decay" in self.zo_params or not self.args.weight_decay:
            return [{"params": named}]
        decay = set(self.get_decay_parameter_names(module))
        groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def _register_with_accelerator(self) -> None:
        # accelerate frees its list at the start of every train(); with the engine in it,
        # evaluation_loop does not prepare (and so re-initialise) the model a second time.
        if self._sharded and not any(m is self.model_wrapped for m in self.accelerator._models):
            self.accelerator._models.append(self.model_wrapped)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The loop's view of the ZO optimizer (:class:`LoopOptimizer`); builds it if needed."""
        self._zo_setup()
        if not isinstance(self.optimizer, LoopOptimizer) or self.optimizer.zo is not self.zo_optimizer:
            self.optimizer = LoopOptimizer(self.zo_optimizer)
        return self.optimizer

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None) -> Any:
        """Trainer's set-up of model, optimizer and scheduler, without accelerate's prepare of the
        model and optimizer (see the module docstring): engine, ZO optimizer, scheduler on its
        param groups, then a resume."""
        if self._created_lr_scheduler:
            self.lr_scheduler = None
            self._created_lr_scheduler = False
        self._zo_max_steps = max_steps
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps)
        self._register_with_accelerator()
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model_wrapped, train_dataloader

    # ------------------------------------------------------------------ the step
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Any:
        self._zo_pending = []  # one optimizer step's micro-batches start here
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """Whether ``compute_loss`` already normalises over the whole accumulated batch (Trainer's rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Queue this micro-batch; on the optimizer step's last one, take the ZO step on all of them.

        Returns the step's loss (at theta, the mean of the SPSA pair, averaged over ranks) on the
        last micro-batch and 0 on the others, so the loop's sum is the step's loss.
        """
        self._zo_pending.append(self._prepare_inputs(inputs))
        if len(self._zo_pending) < self.current_gradient_accumulation_steps:
            return torch.zeros((), device=self.args.device)
        parts, self._zo_pending = self._zo_pending, []
        scaled = self._loss_is_scaled(num_items_in_batch)
        model.eval()  # the two forwards of a pair must see the same function: no dropout
        self._zo_closure_calls = 0

        def closure() -> torch.Tensor:
            self._zo_closure_calls += 1
            with torch.no_grad(), self.compute_loss_context_manager():
                losses = [self.compute_loss(model, part, num_items_in_batch=num_items_in_batch) for part in parts]
            total = losses[0] if len(losses) == 1 else torch.stack([l.reshape(()) for l in losses]).sum()
            return total if scaled or len(losses) == 1 else total / len(losses)

        self._zo_in_step = True
        started = time.perf_counter()
        try:
            loss = self.zo_optimizer.step(closure)
        finally:
            self._zo_in_step = False
        self._zo_step_s = time.perf_counter() - started
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        return None  # no gradients (max_grad_norm is ignored, with a warning at construction)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, plus the last ZO step's projected gradient (``zo_projected_grad``), its
        seconds (``zo_step_s``) and their split by phase (``zo_<phase>_s``: the optimizer's
        ``last_step_timing``, e.g. ``zo_forward_s``, ``zo_perturb_s``)."""
        opt = self.zo_optimizer
        if "loss" in logs and opt is not None and opt.last_step:
            logs = {**logs, "zo_projected_grad": opt.last_step["projected_grad"], "zo_step_s": self._zo_step_s,
                    **{f"zo_{phase}_s": seconds for phase, seconds in opt.last_step_timing.items()}}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation and saving
    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        if self._sharded:
            self._zo_setup()  # evaluate with the engine training uses, not a second one
            self._register_with_accelerator()
        if self.zo_optimizer is not None:
            self.zo_optimizer.flush()  # a two-pass step holds its last update
        return super().evaluation_loop(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A Hugging Face folder of the current weights (under ZeRO-3 and FSDP2 consolidated from the shards)."""
        if self.zo_optimizer is not None:
            self.zo_optimizer.flush()
        if not self._sharded:
            return super().save_model(output_dir, _internal_call)
        self._zo_setup()
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.zo_engine.save_pretrained(Path(output_dir), self.processing_class)
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """zoscale's checkpoint (shards, optimizer state, step log) in ``<output_dir>/zoscale/``, and
        the scheduler (collective: every rank writes its shards)."""
        from zoscale.train.checkpoint import save_checkpoint

        rank, world = self._rank_world
        save_checkpoint(Path(output_dir) / ZO_CHECKPOINT_DIR, self.state.global_step, self.zo_optimizer, rank, world,
                        keep=1)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore zoscale's checkpoint of ``checkpoint`` (weights of the trainable tensors, optimizer
        state and step log, on this layout) and the scheduler."""
        if checkpoint is None:
            return
        from zoscale.train.checkpoint import latest_checkpoint, load_checkpoint

        root = Path(checkpoint) / ZO_CHECKPOINT_DIR
        found = latest_checkpoint(root)
        if found is None:
            raise ValueError(f"{checkpoint} holds no zoscale checkpoint ({root}/step_*/ with 'done'): it was not "
                             "written by ZOTrainer, or with save_only_model=True; it cannot resume a ZO run")
        rank, world = self._rank_world
        step = load_checkpoint(found, self.zo_optimizer, rank, world)
        if step != self.state.global_step:
            raise ValueError(f"{found} is step {step} but {checkpoint}'s trainer state is at step "
                             f"{self.state.global_step}")
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))


def _check_fsdp_plugin(plugin: Any) -> None:
    """Refuse what zoscale's FSDP2 engine cannot honour; warn about what it does its own way.

    The engine shards each transformer block and then the root (``zoscale.engines.fsdp.apply_fsdp``):
    the plugin's wrap policy only changes how parameters are grouped into all-gathers, not the
    result, so it is not used. Blocks always reshard after forward: a block kept gathered between
    the two SPSA forwards would not see the perturbation applied to its shards in between.
    """
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("ZOTrainer shards with FSDP2 (fully_shard); the FSDP plugin is FSDP1: set "
                         "fsdp_config={'version': 2} (transformers' default)")
    if type(getattr(plugin, "cpu_offload", None)).__name__ == "CPUOffloadPolicy":
        raise ValueError("ZOTrainer: fsdp_config cpu_offload is not supported (the ZO update perturbs and "
                         "updates the shards on the device in place); remove it")
    if getattr(plugin, "reshard_after_forward", True) is False:
        warnings.warn("ZOTrainer ignores fsdp_config reshard_after_forward=False: a block kept gathered "
                      "between the two SPSA forwards would miss the perturbation of its shards", stacklevel=4)


def _hsdp_shape(pc: Any) -> tuple[int, int] | None:
    """``(replicas, shard size)`` for HSDP from accelerate's ``ParallelismConfig`` (``dp_replicate_size``
    x ``dp_shard_size``), None for FSDP over the world (no config, or one replica).

    Raises:
        ValueError: tensor, context or sequence parallelism (a ZO step perturbs whole-parameter
            shards, each owned by one rank of a data-parallel mesh; zoscale has no such layouts).
    """
    if pc is None:
        return None
    others = {k: getattr(pc, k, None) for k in ("tp_size", "cp_size", "sp_size")}
    used = {k: v for k, v in others.items() if v not in (None, 1)}
    if used:
        raise ValueError(f"ZOTrainer: parallelism_config {used} is not supported: zoscale shards over data-parallel "
                         "ranks only (FSDP2, or HSDP with dp_replicate_size x dp_shard_size)")
    replicas = pc.dp_replicate_size or 1
    return None if replicas == 1 else (replicas, pc.dp_shard_size or 1)


def _fsdp_param_dtype(plugin: Any) -> torch.dtype | None:
    """The compute dtype of the plugin's mixed-precision policy (``bf16=True`` sets bf16): forwards
    all-gather a cast copy, the shards stay in their dtype. None: compute in the shards' dtype."""
    return getattr(getattr(plugin, "mixed_precision_policy", None), "param_dtype", None)


def _take_optimizer_out_of_ds_config(args: Any, plugin: Any = None) -> None:
    """Remove the ``"optimizer"`` section from the configs transformers and accelerate built for
    DeepSpeed, with the mismatches transformers recorded against Adam's arguments (a ZO
    optimizer's ``eps`` is no ``adam_epsilon``).

    The configs: ``args.hf_deepspeed_config`` (``TrainingArguments(deepspeed=...)``) and those of
    the DeepSpeed plugin, ``args.deepspeed_plugin`` or the accelerator's ``plugin`` (under
    ``accelerate launch`` transformers builds its processed copy there, after the arguments). The
    user's own dict or file keeps its section (``zoscale.hf.config`` reads the optimizer from it
    before any of these exist).
    """
    plugins = [p for p in (getattr(args, "deepspeed_plugin", None), plugin) if p is not None]
    hf_configs = [getattr(args, "hf_deepspeed_config", None)] + [getattr(p, "hf_ds_config", None) for p in plugins]
    for hf_cfg in [h for h in hf_configs if h is not None]:
        hf_cfg.config.pop("optimizer", None)
        hf_cfg.mismatches = [m for m in getattr(hf_cfg, "mismatches", []) if not m.startswith("- ds optimizer.")]
    for p in plugins:
        if isinstance(getattr(p, "deepspeed_config", None), dict):
            p.deepspeed_config.pop("optimizer", None)
