"""Building a model without loading it whole: each rank reads only its part of each weight.

FSDP2 from the meta device, and DeepSpeed ZeRO-3 from its partitions.

Loading the whole model on every rank before ``fully_shard`` costs each rank the whole model in
host memory (OPT-66B in bf16: ~130 GB, times the ranks of a node). Instead the model is built on
the meta device (:func:`meta_causal_lm`), ``fully_shard`` is applied to it (no memory), the shards
are allocated (``to_empty``) and :func:`fill_from_safetensors` copies into each one its rows of the
weight, read with safetensors' slice API one tensor at a time: a rank's host peak is about its
shard plus one tensor's rows, not the model. Tied weights stay tied (``fully_shard`` keeps one
parameter for both names; the file holds it once). Buffers are not in the file when they are
non-persistent (the rotary embeddings' ``inv_freq``): their module is built again from the model's
config on the device and its buffers copied; a persistent buffer is read whole from the file.

Under ZeRO-3 (:func:`partitioned_causal_lm`) the model is built from its config inside
``zero.Init``, which partitions each parameter as it is created, without any weight init (not
even transformers' ZeRO-3 re-initialisation, which gathers weights whole), then
:func:`fill_zero3_partitions` copies into each partition its flat range of the weight, read as
the rows that cover it. ``from_pretrained`` instead has every rank
load the state dict and gather each parameter to copy it in.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path
from typing import Any, Iterator
import torch

__all__ = ["meta_causal_lm", "fill_from_safetensors", "weight_files", "streams_from", "partitioned_causal_lm",
           "fill_zero3_partitions"]


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors`` or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def streams_from(model: torch.nn.Module) -> Path | None:
    """The folder a meta-built model's weights stream from (None: not built on the meta device)."""
    if not any(p.is_meta for p in model.parameters()):
        return None
    return Path(getattr(model, "_zoscale_weights", ""))


def meta_causal_lm(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model of the Hugging Face folder ``folder`` on the meta device, in ``dtype``, in eval
    mode; :func:`fill_from_safetensors` later reads its weights from ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model._zoscale_weights = str(folder)
    return model.eval()


def _rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's local tensor of ``param`` and the global rows ``[first, last)`` it holds."""
    from zoscale.engines.fsdp import FSDPShards

    view = FSDPShards().view(param)
    shape = view.global_shape
    row = view.numel // shape[0] if len(shape) else 1
    first = view.offset // row if row else 0
    local = view.local.view(-1, *shape[1:]) if len(shape) else view.local
    return local, first, first + (local.shape[0] if len(shape) else 1)


def _read(files: dict[str, Path], folder: Path, name: str, shape: tuple[int, ...], part: Any) -> torch.Tensor:
    """``part(slice, shape)`` of tensor ``name`` in the files, after checking that it is there with
    the model's ``shape``."""
    from safetensors import safe_open

    if name not in files:
        raise KeyError(f"{folder}: no tensor {name!r} in its safetensors files (a model of another config?)")
    with safe_open(str(files[name]), framework="pt") as f:
        piece = f.get_slice(name)
        saved = tuple(piece.get_shape())
        if saved != tuple(shape):
            raise ValueError(f"{files[name]}: {name} is {saved}, the model's parameter is {tuple(shape)}")
        return part(piece, saved)


def _fill_parameters(module: torch.nn.Module, folder: Path, files: dict[str, Path]) -> None:
    for name, param in module.named_parameters():
        local, first, last = _rows(param)
        rows = _read(files, folder, name, param.shape, lambda piece, shape: piece[first:last] if shape else piece[:])
        with torch.no_grad():
            local.copy_(rows.to(local.dtype))


def _fill_buffers(module: torch.nn.Module, folder: Path, files: dict[str, Path], device: torch.device) -> None:
    from safetensors import safe_open

    for owner_name, owner in module.named_modules():
        names = list(owner._buffers)
        if not names:
            continue
        fresh = None
        for b in names:
            full = f"{owner_name}.{b}" if owner_name else b
            if full in files:
                with safe_open(str(files[full]), framework="pt") as f:
                    owner._buffers[b] = f.get_tensor(full).to(device)
                continue
            if fresh is None:
                config = getattr(owner, "config", None)
                if config is None:
                    raise ValueError(f"buffer {full!r} is neither in {folder} nor rebuildable (its module "
                                     f"{type(owner).__name__} has no config)")
                fresh = type(owner)(config)
            owner._buffers[b] = fresh._buffers[b].to(device)


def fill_from_safetensors(module: torch.nn.Module, folder: Path, device: torch.device) -> None:
    """Allocate the shards of a ``fully_shard``-ed meta model on ``device`` and fill them (and the
    buffers) from the safetensors files in ``folder``, reading only this rank's rows.

    Raises:
        KeyError / ValueError: a parameter missing from the files or of another shape (named).
    """
    module.to_empty(device=device)
    files = weight_files(folder)  # the index (or the file's header) read once
    _fill_parameters(module, folder, files)
    _fill_buffers(module, folder, files, device)


def partitioned_causal_lm(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``folder`` built partitioned by ZeRO-3 and filled from its safetensors files.

    Call while a ``transformers.integrations.HfDeepSpeedConfig`` of a stage-3 config is alive
    (``DeepSpeedBuilder.loading()``). The model is constructed as transformers' ``from_config``
    does under ZeRO-3 (``no_init_weights``, ``zero.Init``) but without its
    ``initialize_weights_zero3``, which gathers each module's parameters whole, runs their random
    init on rank 0 and re-partitions them (for SmolLM2 the 113 MB embedding and the untied
    ``lm_head`` at once, on every rank, ~250 MiB above the shard): here every weight comes from the
    files. See :func:`_zero3_construct`.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = _zero3_construct(config, dtype)
    fill_zero3_partitions(model, folder)
    return model.eval()


def _zero3_construct(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` partitioned by ``zero.Init``, weights left
    uninitialised (their values are whatever ``torch.empty`` gave, to be overwritten).

    Each parameter is still created whole (``torch.empty``, never written by an init) and
    broadcast from rank 0 by ``zero.Init`` before it is partitioned: one whole tensor at a time.
    The tied ``lm_head`` is created and partitioned like any weight, then replaced by the
    embedding in ``tie_weights``; its old partition is only reachable through reference cycles
    (DeepSpeed's per-parameter closures), so it is collected here rather than at some later
    ``gc`` run.
    """
    import gc

    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    if deepspeed_config() is None:
        raise RuntimeError("partitioned_causal_lm needs a live HfDeepSpeedConfig of a ZeRO-3 config "
                           "(DeepSpeedBuilder.loading())")
    # The contexts transformers' from_config enters under ZeRO-3 (modeling_utils._from_config),
    # in its order; set_zero3_state makes from_config itself enter none of them and skip
    # initialize_weights_zero3.
    # fork_rng: no init draws from the global RNG now, but a model whose __init__ does must not
    # shift the run's random stream.
    with torch.random.fork_rng(devices=[]), no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state(), _heap_trimmed():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_weights (a no-op under no_init_weights) would have tied them
    gc.collect()
    return model


@contextlib.contextmanager
def _heap_trimmed() -> Iterator[None]:
    """Hand freed heap pages back to the OS each time a module registers a parameter.

    Under ``zero.Init`` every rank but the first receives each whole parameter by broadcast (so
    writes it) before keeping its partition. Once glibc has freed one mmapped tensor it raises its
    mmap threshold (up to 32 MiB), so the whole tensors of the layers are then carved from a heap
    and, freed with partitions allocated above them, can leave written holes that are never
    returned. How much varies from run to run and rank to rank (timing; not traced further):
    building SmolLM2 on 4 ranks, the receiving ranks peaked at 283, 355 and 475 MiB in
    one run, 274 MiB each with this trim (their partitions, 128 MiB, plus the whole ``lm_head``
    and its partition). ``malloc_trim`` releases the holes (their free
    pages are ``MADV_DONTNEED``-ed). The hook runs at the next module's first parameter, after the
    previous module was partitioned. Outside glibc nothing is done.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        yield
        return
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def hook(module: torch.nn.Module, name: str, param: Any) -> None:
        trim(0)  # returns None: a hook's non-None result would replace the parameter

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _flat_range(piece: Any, shape: tuple[int, ...], offset: int, length: int) -> torch.Tensor:
    """Flat elements ``[offset, offset + length)`` of a safetensors slice, reading only the rows
    that cover them."""
    if len(shape) <= 1:
        return piece[offset:offset + length] if shape else piece[:]
    from zoscale.optim.lowrank import row_range

    cols = int(torch.Size(shape[1:]).numel())
    first, last = row_range(offset, length, cols)
    rows = piece[first:last].reshape(-1)
    return rows[offset - first * cols:offset - first * cols + length]


def fill_zero3_partitions(model: torch.nn.Module, folder: Path) -> None:
    """Copy into every ZeRO-3 partition of ``model`` its range of the weight in ``folder``.

    Raises:
        KeyError / ValueError: a parameter missing from the files or of another shape (named).
    """
    from zoscale.engines.deepspeed import _partition

    files = weight_files(folder)
    for name, param in model.named_parameters():
        rank, ps, valid = _partition(param)
        part = _read(files, folder, name, param.ds_shape,
                     lambda piece, shape: _flat_range(piece, shape, rank * ps, valid))
        if valid:
            with torch.no_grad():
                param.ds_tensor.data[:valid].copy_(part.to(param.ds_tensor.dtype))
