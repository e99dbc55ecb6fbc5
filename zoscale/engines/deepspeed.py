"""DeepSpeed: the ZeRO shard provider and the engine builder.

ZeRO-3 keeps each parameter as a flat, padded partition ``p.ds_tensor`` of ``ps =
ceil(ds_numel / ws)`` elements per rank of the parameter's partition group; rank ``r`` owns
global flat elements ``[r*ps, r*ps + valid)`` (padding sits at the tail of the last ranks). A
forward gathers the partitions, so in-place edits of ``ds_tensor[:valid]`` are what the next
forward sees. :class:`DeepSpeedShards` hands exactly that range to the optimizer.

The exception is a parameter kept whole by ``stage3_param_persistence_threshold``
(``p.ds_persist``): after DeepSpeed's first, trace-recording forward it stays gathered and
forwards read ``p.data``, never ``ds_tensor``; DeepSpeed may still release it (trace reset,
``GatheredParameters`` exit, checkpointing) and re-gather it from ``ds_tensor``. Such a tensor
is handled as a replica of a full buffer that the provider owns (the gathered ``p.data`` when
there is one), and the view's ``after_write`` hook copies this rank's range into ``ds_tensor``
and, if DeepSpeed swapped in a freshly gathered ``p.data``, the whole buffer into it. So both
copies hold the same values after every pass, whatever DeepSpeed did in between. The buffer is
obtained once, by one all-gather, in :meth:`DeepSpeedShards.prepare` (called by
:func:`zero3_engine`), never inside a step.

ZeRO stages 0-2 keep whole parameters on every rank: replica views, as
:class:`~zoscale.shards.LocalShards`.

:func:`zero3_engine` builds the engine without handing DeepSpeed an optimizer (DeepSpeed would
wrap it in its ZeRO optimizer, allocating fp32 master and gradient partitions, and its ``step``
needs gradients) and builds the zoscale optimizer named in the JSON's ``"optimizer"`` section.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from zoscale.engines.saving import save_pretrained
from zoscale.shards import LocalShards, ShardCapabilities, ShardView

__all__ = ["DeepSpeedShards", "DeepSpeedEngine", "DeepSpeedBuilder", "zero3_engine", "prepare_ds_config",
           "disable_shm_comm_build"]


# Attribute holding the full value of a persistent ZeRO-3 parameter (see the module docstring).
_FULL_ATTR = "zoscale_full"


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def _partition(param: torch.Tensor) -> tuple[int, int, int]:
    """``(rank, ps, valid)`` of this rank's partition of a ZeRO-3 parameter.

    DeepSpeed places partition ``dist.get_rank(group=param.ds_process_group)``
    (``Init._partition_rank`` in ``runtime/zero/partition_parameters.py``), which differs from
    the global rank under hierarchical / MiCS partitioning.
    """
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    world = dist.get_world_size(group=group) if dist.is_initialized() else 1
    ps = param.ds_tensor.numel()
    if ps * world < param.ds_numel:
        raise RuntimeError(
            f"ZeRO-3 partition of {ps} elements x {world} ranks cannot hold a parameter of "
            f"{param.ds_numel} elements: unexpected DeepSpeed layout"
        )
    return rank, ps, max(0, min(ps, param.ds_numel - rank * ps))


class DeepSpeedShards:
    """Shard provider for parameters managed by DeepSpeed (ZeRO-3 partitions or replicas).

    Args:
        loss_group: the data-parallel process group over which the loss pair is averaged
            (None: the default group).
        zero_stage: the ZeRO stage the engine runs: 3 partitions parameters (``capabilities``:
            not whole), 0-2 keep whole replicas. Gradients are never reduced by DeepSpeed here
            (zoscale gives it no optimizer, so its stage-3 reduction hooks are not installed, and
            a plain ``loss.backward()`` bypasses ``engine.backward``'s all-reduce below stage 3).

    Raises (from :meth:`view`):
        NotImplementedError: ZeRO++ hierarchical partitioning (a secondary partition that
            forwards read and this provider would not update), quantized or NVMe-offloaded
            partitions.
    """

    def __init__(self, loss_group: object | None = None, zero_stage: int = 3) -> None:
        self.loss_group = loss_group
        self.capabilities = ShardCapabilities(whole_parameters=zero_stage < 3, reduces_gradients=False,
                                              engine="deepspeed")
        self._replicas = LocalShards(loss_group)

    # ------------------------------------------------------------------ persistent parameters
    @staticmethod
    def _gathered(param: torch.Tensor) -> bool:
        return param.data.numel() == param.ds_numel

    @staticmethod
    def _set_full(param: torch.Tensor, full: torch.Tensor) -> None:
        # Kept on the parameter (as DeepSpeed keeps its ds_* attributes) so that it lives
        # exactly as long as the parameter; a weak-key dict cannot hold tensors (their == is
        # element-wise).
        setattr(param, _FULL_ATTR, full)

    def prepare(self, params: Iterable[torch.Tensor]) -> None:
        """Obtain the full value of every persistent ZeRO-3 parameter not yet held.

        Collective over the parameters' partition group: every rank must call it with the same
        parameters in the same order. One all-gather of the persistent parameters that are
        currently released; nothing if all are gathered or already cached.
        """
        missing = []
        for p in params:
            if not (_is_zero3(p) and getattr(p, "ds_persist", False)):
                continue
            if self._gathered(p):
                self._set_full(p, p.data.view(-1))
            elif not hasattr(p, _FULL_ATTR):
                missing.append(p)
        if not missing:
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
            for p in missing:
                self._set_full(p, p.data.detach().reshape(-1).clone())

    def _persistent_view(self, param: torch.Tensor) -> ShardView:
        if self._gathered(param):
            # DeepSpeed's gathered copy equals our buffer (it was gathered from partitions that
            # every pass kept in sync); adopt it so that only one full copy exists.
            self._set_full(param, param.data.view(-1))
        elif not hasattr(param, _FULL_ATTR):
            self.prepare([param])
        full: torch.Tensor = getattr(param, _FULL_ATTR)
        rank, ps, valid = _partition(param)
        start = rank * ps

        def sync() -> None:
            if valid:
                param.ds_tensor[:valid].copy_(full[start:start + valid])
            data = param.data
            if self._gathered(param) and data.data_ptr() != full.data_ptr():
                data.view(-1).copy_(full)

        return ShardView(local=full, offset=0, numel=param.ds_numel, global_shape=param.ds_shape,
                         replicated=True, after_write=sync)

    # ------------------------------------------------------------------ provider protocol
    def view(self, param: torch.Tensor) -> ShardView:
        """This rank's view of ``param``: its ZeRO-3 partition, or a replica."""
        if not _is_zero3(param):
            return self._replicas.view(param)
        if getattr(param, "ds_secondary_tensor", None) is not None:
            raise NotImplementedError(
                "ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1) keeps a secondary "
                "partition that forwards read; zoscale does not update it yet"
            )
        if hasattr(param.ds_tensor, "ds_quant_scale") or getattr(param.ds_tensor, "final_location", None) == "nvme":
            raise NotImplementedError("quantized or NVMe-offloaded ZeRO-3 partitions are not supported")
        if getattr(param, "ds_persist", False):
            return self._persistent_view(param)
        rank, ps, valid = _partition(param)
        return ShardView(local=param.ds_tensor.data[:valid], offset=rank * ps, numel=param.ds_numel,
                         global_shape=param.ds_shape, replicated=False)


# ---------------------------------------------------------------------- the engine builder
def prepare_ds_config(ds_config: dict[str, Any]) -> tuple[dict[str, Any], torch.dtype | None]:
    """The config DeepSpeed gets: no optimizer, and stages 1-2 mapped to stage 0.

    DeepSpeed refuses ZeRO stages 1-2 without an optimizer (``runtime/engine.py``,
    ``_configure_zero_optimizer``: "zero stage N requires an optimizer"), and stage 0 with
    ``bf16``/``fp16`` wraps a dummy optimizer in its BF16/FP16 optimizer, which allocates fp32
    copies. Stages 1-2 only partition gradients and optimizer states, which a ZO optimizer does
    not have, so below stage 3 DeepSpeed gets stage 0 without precision sections and the caller
    casts the model itself.

    Returns:
        ``(config for deepspeed.initialize, dtype to cast the model to or None)``.
    """
    cfg = copy.deepcopy(ds_config)
    cfg.pop("optimizer", None)
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage >= 3:
        return cfg, None
    dtype = None
    if (cfg.get("bf16") or {}).get("enabled"):
        dtype = torch.bfloat16
    elif (cfg.get("fp16") or {}).get("enabled"):
        dtype = torch.float16
    cfg.pop("bf16", None)
    cfg.pop("fp16", None)
    if "zero_optimization" in cfg:
        cfg["zero_optimization"] = {**zero, "stage": 0}
    return cfg, dtype


def disable_shm_comm_build() -> None:
    """Skip DeepSpeed's shared-memory comm op on CPU (a ~70 s JIT build that gloo does not use)."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """The trainer's view of a DeepSpeed engine (see :class:`zoscale.engines.base.Engine`).

    DeepSpeed gets the config without its ``"optimizer"`` section (see :func:`prepare_ds_config`);
    the zoscale optimizer is built by the caller on ``module.named_parameters()`` with
    ``shards``. Persistent ZeRO-3 parameters that are trainable are gathered once here.
    """

    def __init__(self, model: torch.nn.Module, ds_config: dict[str, Any], loss_group: object | None = None) -> None:
        import deepspeed

        disable_shm_comm_build()
        cfg, dtype = prepare_ds_config(ds_config)
        if dtype is not None:
            model = model.to(dtype)
        self.engine, *_ = deepspeed.initialize(model=model, config=cfg)
        self.module: torch.nn.Module = self.engine.module
        self.zero_stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
        self.shards = DeepSpeedShards(loss_group, zero_stage=self.zero_stage)
        self.shards.prepare(p for p in self.module.parameters() if p.requires_grad)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3 the partitions consolidated on rank 0 (collective); below it None (whole)."""
        return self.engine._zero3_consolidated_16bit_state_dict() if self.zero_stage >= 3 else None

    def save_pretrained(self, path: Path, tokenizer: Any) -> None:
        """Consolidate the partitions (collective) and write a Hugging Face folder on rank 0.

        A peft model is written as an adapter folder, gathering only the adapters (see
        :func:`zoscale.engines.saving.save_pretrained`).
        """
        save_pretrained(self, path, tokenizer, self.full_state_dict)


class DeepSpeedBuilder:
    """Builds a :class:`DeepSpeedEngine`; under ZeRO-3 the model is partitioned while it loads.

    Args:
        ds_config: the DeepSpeed config (checked with ``zoscale.train.ds_config.load_ds_config``).
    """

    name = "deepspeed"
    load_dtype = None

    def __init__(self, ds_config: dict[str, Any]) -> None:
        self.ds_config = ds_config
        self._hf_ds_config: Any = None

    def loading(self) -> contextlib.AbstractContextManager[None]:
        stage = int((self.ds_config.get("zero_optimization") or {}).get("stage", 0))
        if stage < 3:
            return contextlib.nullcontext()
        disable_shm_comm_build()
        from transformers.integrations import HfDeepSpeedConfig

        # transformers partitions at from_pretrained/from_config while this object is alive
        # (kept on the builder for the engine's lifetime, as transformers requires).
        cfg, _ = prepare_ds_config(self.ds_config)
        self._hf_ds_config = HfDeepSpeedConfig(cfg)
        return contextlib.nullcontext()

    #: Under ZeRO-3, build models that have safetensors files partitioned and fill each rank's
    #: partitions from the files (``zoscale.engines.meta_init.partitioned_causal_lm``).
    stream_weights = True

    def model_from_files(self, folder: Path, dtype: torch.dtype) -> torch.nn.Module | None:
        """Under ZeRO-3 the model of ``folder``, partitioned, each rank's part read from the files;
        below stage 3 None (loaded whole, as replicas need)."""
        if int((self.ds_config.get("zero_optimization") or {}).get("stage", 0)) < 3:
            return None
        from zoscale.engines.meta_init import partitioned_causal_lm

        with self.loading():
            return partitioned_causal_lm(folder, dtype)

    def build(self, model: torch.nn.Module) -> DeepSpeedEngine:
        return DeepSpeedEngine(model, self.ds_config)


def zero3_engine(model: torch.nn.Module, ds_config: dict[str, Any], loss_group: object | None = None,
                 optimizer: Any = None) -> tuple[Any, Any]:
    """Wrap ``model`` in a DeepSpeed engine with a zoscale optimizer on its shards.

    The optimizer comes from one of two places, as a DeepSpeed user would expect:
        * the JSON's ``"optimizer": {"type": "MeZO", "params": {...}}`` section, validated before
          the model is partitioned and resolved through :func:`zoscale.optim.build_optimizer` on
          ``engine.module.named_parameters()`` (names, hence noise ids, equal the unwrapped
          model's);
        * ``optimizer=``: a zoscale optimizer built on ``model``'s parameters (DeepSpeed
          partitions those same ``Parameter`` objects in place, so the instance stays valid and
          gets this engine's shard provider), or a callable ``f(named_parameters) -> optimizer``,
          like DeepSpeed's client optimizer callables. The JSON must then have no optimizer
          section (one source of truth).
    Either way DeepSpeed itself never sees the optimizer (its ZeRO optimizer would allocate
    fp32 master and gradient partitions, and its ``step`` needs gradients).

    Args:
        model: the model (plain, or built under ``deepspeed.zero.Init``/``HfDeepSpeedConfig``).
        ds_config: DeepSpeed config dict; not modified.
        loss_group: data-parallel group for the loss pair (None: the default group).
        optimizer: a zoscale optimizer instance or factory, or None to use the JSON's section.

    Returns:
        ``(engine, optimizer)``: the DeepSpeed engine and the zoscale optimizer. Call
        ``optimizer.step(closure)`` with a closure that runs the model under ``torch.no_grad()``
        and returns the mean loss; never ``engine.backward`` / ``engine.step``.

    Raises:
        ValueError: no optimizer from either place, both, an invalid ``"optimizer"`` section
            (see ``zoscale.train.ds_config.check_optimizer_section``), or an optimizer that is
            not a zoscale one.
    """
    from zoscale.optim import ZOOptimizer, build_optimizer
    from zoscale.train.ds_config import check_optimizer_section

    in_json = "optimizer" in ds_config
    if optimizer is not None and in_json:
        raise ValueError("an optimizer was passed and ds_config has an 'optimizer' section: use one of the two")
    if optimizer is None and not in_json:
        raise ValueError("ds_config has no 'optimizer' section naming the zoscale optimizer, and none was passed")
    if optimizer is not None and not (isinstance(optimizer, ZOOptimizer) or callable(optimizer)):
        raise ValueError(f"optimizer must be a zoscale optimizer or a callable building one, got {type(optimizer).__name__}")
    if in_json:
        name, options = check_optimizer_section(ds_config["optimizer"])
    wrapped = DeepSpeedEngine(model, ds_config, loss_group)
    params = list(wrapped.module.named_parameters())
    if isinstance(optimizer, ZOOptimizer):
        opt = optimizer
        opt.shards = wrapped.shards
    elif optimizer is not None:
        opt = optimizer(params)
        if not isinstance(opt, ZOOptimizer):
            raise ValueError(f"the optimizer factory returned {type(opt).__name__}, not a zoscale optimizer")
        opt.shards = wrapped.shards
    else:
        opt = build_optimizer(name, params, options, shards=wrapped.shards, module=wrapped.module)
    return wrapped.engine, opt
