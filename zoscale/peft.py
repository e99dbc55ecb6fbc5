"""Parameter-efficient fine-tuning (LoRA, prefix tuning, prompt tuning) through Hugging Face ``peft``.

A run's ``model.peft`` section (``zoscale.train.config.ModelConfig``) names the method and its
options; :func:`apply_peft` wraps the loaded model with ``peft.get_peft_model`` *before* an engine
wraps it. peft freezes every base weight (``requires_grad=False``) and creates the adapter
parameters trainable, so the ZO optimizer, built on the trainable parameters only, perturbs,
updates and checkpoints nothing else. :func:`save_adapter` writes the final result as a peft
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), consolidated from the
shards, that ``peft.PeftModel.from_pretrained(base, folder)`` loads.

Engines:
    * One process / replicas: nothing special.
    * DeepSpeed ZeRO-3: the base model may already be partitioned when the adapters are created
      (``HfDeepSpeedConfig`` at load). The adapters are then ordinary parameters, and
      ``deepspeed.initialize`` converts them (``DeepSpeedZeRoOffload._convert_to_zero_parameters``
      in ``runtime/zero/parameter_offload.py`` -> ``Init._zero_init_param`` in
      ``partition_parameters.py``: broadcast from rank 0, then partitioned like any other
      parameter). Adapters are small, so under the default ``stage3_param_persistence_threshold``
      (1e5 elements) they are usually kept whole; ``DeepSpeedShards`` handles both cases.
    * FSDP2: ``apply_fsdp`` shards each transformer block of the wrapped model (the largest
      ``nn.ModuleList``, LoRA layers included) and the root ``PeftModel`` (prompt/prefix
      embeddings, the base model's embeddings and head). Every rank must create identical
      adapters, which :func:`apply_peft` guarantees by seeding their initialisation.

Noise ids: a parameter's stable id strips peft's ``base_model.model.`` (``zoscale.shards.canonical_name``),
so ``model.layers.0.self_attn.q_proj.lora_A.default.weight`` or ``prompt_encoder.default.embedding.weight``
is the same on every engine.

Forwards: ``zoscale.data.tasks.label_logits`` passes the base model's keyword arguments
(``position_ids``, ``logits_to_keep``, ``use_cache``) through the ``PeftModel``; see its docstring
for how virtual tokens get their positions.

Recommended ZO settings (MeZO, Malladi et al. 2023, OPT-13B; see :data:`RECOMMENDED`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["PEFT_TYPES", "RECOMMENDED", "peft_config", "check_peft", "apply_peft", "initialise_adapters",
           "is_peft_model", "adapter_parameters", "adapter_state_dict", "save_adapter"]

#: zoscale name -> (peft config class name, zoscale's defaults for its options).
#: LoRA: MeZO's r=8, alpha=16 on the attention query and value projections (peft's default
#: targets for OPT and Llama). Prefix: MeZO's 5 virtual tokens, no reparametrisation, initialised
#: from real activations (``init_by_real_act``, see :func:`initialise_adapters`). Prompt:
#: ZO-Bench's 10 virtual tokens initialised from the embeddings of random vocabulary tokens.
PEFT_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}),
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": 5}),
    "prompt": ("PromptTuningConfig", {"num_virtual_tokens": 10, "prompt_tuning_init": "SAMPLE_VOCAB"}),
}

#: MeZO's recommended ``(eps, lr)`` pairs with ZO-SGD (``lr`` the larger of the two it used; the
#: smaller is 1/2 for LoRA, 1/10 otherwise). ``prompt``: not in MeZO; zoscale's choice, the
#: largest eps/lr of ZO-Bench's ZO-SGD prompt-tuning grid (eps 1e-2..1e-4, lr 1e-3..1e-6): the
#: virtual tokens live on the word-embedding scale, like prefix activations.
RECOMMENDED: dict[str, tuple[float, float]] = {
    "full": (1e-3, 1e-6),
    "lora": (1e-2, 1e-4),
    "prefix": (1e-1, 1e-2),
    "prompt": (1e-2, 1e-3),
}

# Options zoscale sets itself, or peft derives from the model.
_OWNED = ("task_type", "peft_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
          "peft_version", "num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules")
# zoscale's own options (not peft's): name -> (the types that accept it, default).
_OWN_OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {"init_by_real_act": (("prefix",), True)}


def _where(key: str) -> str:
    return f"'model.peft.{key}'"


def peft_config(spec: dict[str, Any]) -> Any:
    """The ``peft`` config object for a ``model.peft`` section.

    Args:
        spec: ``{"type": "lora" | "prefix" | "prompt", **options}``; options are the fields of
            ``peft.LoraConfig`` / ``PrefixTuningConfig`` / ``PromptTuningConfig``, with zoscale's
            defaults (:data:`PEFT_TYPES`) for those not given, plus ``init_by_real_act`` (prefix
            only, default true; see :func:`initialise_adapters`), which is not passed to peft.

    Raises:
        ValueError: naming the key: not a dict, no or an unknown ``type``, an option the peft
            class does not have or that zoscale sets itself, an invalid value, or a setting a
            ZO run cannot honour (dropout, trainable copies of base modules, bias training,
            prefix reparametrisation).
    """
    import peft

    if not isinstance(spec, dict):
        raise ValueError(f"config key 'model.peft' must be an object or null, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in PEFT_TYPES:
        raise ValueError(f"config key {_where('type')} must be one of {sorted(PEFT_TYPES)}, got {kind!r}")
    class_name, defaults = PEFT_TYPES[kind]
    cls = getattr(peft, class_name)
    for key, (types, _) in _OWN_OPTIONS.items():
        if key in spec and kind not in types:
            raise ValueError(f"config key {_where(key)} applies to type {' or '.join(types)}, not {kind!r}")
        if key in spec and not isinstance(spec[key], bool):
            raise ValueError(f"config key {_where(key)} must be true or false, got {spec[key]!r}")
    options = {**defaults, **{k: v for k, v in spec.items() if k != "type" and k not in _OWN_OPTIONS}}
    known = {f.name for f in dataclasses.fields(cls)} - set(_OWNED)
    for key in options:
        if key in _OWNED:
            raise ValueError(f"config key {_where(key)} is set by zoscale (or derived from the model); remove it")
        if key not in known:
            raise ValueError(f"unknown config key {_where(key)} for type {kind!r} (peft.{class_name}); "
                             f"known: {sorted(known)}")
    for key in ("r", "num_virtual_tokens"):
        if key in options and (not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < 1):
            raise ValueError(f"config key {_where(key)} must be a positive integer, got {options[key]!r}")
    if options.get("lora_dropout", 0.0) != 0.0:
        raise ValueError(f"config key {_where('lora_dropout')} must be 0: ZO forwards run in eval mode (both SPSA "
                         f"forwards must compute the same function), so dropout would silently do nothing")
    if options.get("modules_to_save") or options.get("trainable_token_indices"):
        key = "modules_to_save" if options.get("modules_to_save") else "trainable_token_indices"
        raise ValueError(f"config key {_where(key)} is not supported: it trains copies of base modules, "
                         "and only adapter parameters are trained here")
    if options.get("bias", "none") != "none":
        raise ValueError(f"config key {_where('bias')} must be 'none': other values train the base model's biases")
    if options.get("prefix_projection"):
        raise ValueError(f"config key {_where('prefix_projection')} must be false: zoscale tunes the prefix "
                         "directly (MeZO's no-reparametrisation setting), and saves it as peft's prompt_embeddings")
    try:
        return cls(task_type=peft.TaskType.CAUSAL_LM, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key 'model.peft' ({kind}): {e}") from None


def check_peft(spec: dict[str, Any] | None) -> None:
    """Validate a ``model.peft`` section (None: full fine-tuning) without a model; see :func:`peft_config`."""
    if spec is not None:
        peft_config(spec)


def _peft_model(model: Any) -> Any:
    """``model`` if it is a ``peft.PeftModel``, the module a DeepSpeed engine wraps if that is one, else None."""
    from peft import PeftModel

    for candidate in (model, getattr(model, "module", None)):
        if isinstance(candidate, PeftModel):
            return candidate
    return None


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` (or the module a DeepSpeed engine wraps) is a ``peft.PeftModel``."""
    return _peft_model(model) is not None


def apply_peft(model: torch.nn.Module, spec: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with the adapters ``spec`` describes; the base weights are frozen.

    Call it on the loaded model (possibly partitioned by ZeRO-3 at load) before an engine wraps
    it. The adapters' random initialisation (LoRA's ``A``, the virtual-token embeddings, the
    vocabulary sample of prompt tuning) is drawn from torch's generator seeded with ``seed``
    inside ``torch.random.fork_rng``, so every rank creates the same adapters (FSDP2 needs that)
    and the global RNG is left as it was. The result is put in eval mode (new modules start in
    training mode; ZO forwards must be deterministic).

    Args:
        model: a Hugging Face causal LM.
        spec: the ``model.peft`` section (see :func:`peft_config`).
        seed: seed of the adapters' initialisation.

    Returns:
        The ``peft.PeftModel``; only adapter parameters have ``requires_grad=True``.

    Raises:
        ValueError: an invalid ``spec`` (named), or no trainable adapter parameter was created.
    """
    from peft import get_peft_model

    config = peft_config(spec)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as e:  # e.g. LoRA target modules not found in the model
            raise ValueError(f"config key 'model.peft' ({spec['type']}): {e}") from None
    wrapped.eval()
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ValueError(f"config key 'model.peft' ({spec['type']}) created no trainable parameter")
    return wrapped


def _own_option(spec: dict[str, Any], key: str) -> Any:
    types, default = _OWN_OPTIONS[key]
    return spec.get(key, default) if spec.get("type") in types else None


@torch.no_grad()
def initialise_adapters(model: Any, shards: Any, spec: dict[str, Any] | None, seed: int = 0) -> torch.Tensor | None:
    """Initialisation that needs the wrapped model's forward: MeZO's prefix from real activations.

    With ``{"type": "prefix", "init_by_real_act": true}`` (the default for prefix tuning), the
    prefix becomes the keys and values the base model computes for ``num_virtual_tokens``
    random vocabulary tokens (MeZO's ``--prefix_init_by_real_act``; peft's own init is N(0, 1)).
    The model then starts out scoring every input as if those tokens preceded it. peft's default
    N(0, 1) prefix instead perturbs the model: on SmolLM2-135M, the prompt loss on 32 training
    sentences was 1.21 without a prefix, 1.14 with this init, 1.64 with peft's (measured here).

    Called on the engine's module after wrapping and before the optimizer is built (optimizers
    may derive state from the initial values): the forward runs on every rank (collective under
    ZeRO-3 / FSDP2) on the same tokens, drawn from a generator seeded by ``seed``, and each rank
    writes its own range of the prefix tensor through its shard view. A no-op for other settings.

    Args:
        model: the peft model, or the engine module wrapping it.
        shards: the engine's shard provider (``engine.shards``).
        spec: the ``model.peft`` section (None: nothing to do).
        seed: seed of the token draw.

    Returns:
        The ``[1, num_virtual_tokens]`` token ids whose activations became the prefix, or None.
    """
    if spec is None or not _own_option(spec, "init_by_real_act"):
        return None
    from zoscale.shards import canonical_name

    inner = _peft_model(model)
    adapter = inner.active_adapter
    config = inner.peft_config[adapter]
    embedding = inner.prompt_encoder[adapter].embedding
    vocab = inner.get_base_model().config.vocab_size
    tokens = torch.randint(0, vocab, (1, config.num_virtual_tokens), generator=torch.Generator().manual_seed(seed))
    with inner.disable_adapter():
        out = inner(input_ids=tokens.to(embedding.weight.device), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    layers = cache.layers
    if len(layers) != config.num_layers:
        raise RuntimeError(f"the base model's cache has {len(layers)} layers, the prefix {config.num_layers}")
    # peft reads a prefix row as [num_layers, 2 (key, value), kv_heads, head_dim] (PeftModel.get_prompt).
    kv = torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in layers])  # [L, 2, H, n, D]
    full = kv.permute(3, 0, 1, 2, 4).reshape(config.num_virtual_tokens, -1)
    if full.shape[1] != config.num_layers * 2 * config.token_dim:
        raise RuntimeError(f"real activations of width {full.shape[1]} do not fit the prefix "
                           f"({config.num_layers} layers x 2 x {config.token_dim})")
    flat = full.reshape(-1)
    target = canonical_name(f"prompt_encoder.{adapter}.embedding.weight")
    (param,) = [p for n, p in adapter_parameters(model) if canonical_name(n) == target]
    view = shards.view(param)
    view.local.copy_(flat[view.offset:view.offset + view.local.numel()].to(view.local.dtype))
    if view.after_write is not None:
        view.after_write()
    return tokens


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable (adapter) parameters of a peft model, by name, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the adapter parameters, keyed like ``model.named_parameters()``.

    Collective when the parameters are sharded: every rank must call it. ZeRO-3 parameters are
    gathered together by one ``GatheredParameters`` (adapters only, never the base model);
    FSDP2 ``DTensor`` parameters by ``full_tensor()``; whole parameters are copied.
    """
    from torch.distributed.tensor import DTensor

    named = adapter_parameters(_peft_model(model) or model)
    zero3 = [p for _, p in named if hasattr(p, "ds_tensor")]
    gather: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    out = {}
    with torch.no_grad(), gather:
        for name, p in named:
            full = p.full_tensor() if isinstance(p, DTensor) else p.data
            out[name] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(model: torch.nn.Module, path: str | Path, tokenizer: Any = None) -> None:
    """Write the trained adapters as a peft adapter folder; collective, rank 0 writes.

    The folder holds ``adapter_config.json`` (``inference_mode`` true, as ``PeftModel.save_pretrained``
    writes it) and ``adapter_model.safetensors`` in peft's key format (adapter name removed;
    ``prompt_embeddings`` for prefix and prompt tuning), plus the tokenizer if given. It is
    built from :func:`adapter_state_dict` rather than by ``PeftModel.save_pretrained``, which
    would read the (sharded) parameters itself on rank 0, and for prompt learning run the
    prompt encoder's forward there.

    Load it with ``peft.PeftModel.from_pretrained(base_model, path)``.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    inner = _peft_model(model)
    if inner is None:
        raise ValueError(f"save_adapter needs a peft model, got {type(model).__name__}")
    full = adapter_state_dict(inner)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        adapter = inner.active_adapter
        config = copy.deepcopy(inner.peft_config[adapter])
        config.inference_mode = True
        if config.is_prompt_learning:
            key = f"prompt_encoder.{adapter}.embedding.weight"
            weights = {"prompt_embeddings": full[key]}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                weights = get_peft_model_state_dict(inner, state_dict=full, adapter_name=adapter,
                                                    save_embedding_layers=False)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / SAFETENSORS_WEIGHTS_NAME),
                  metadata={"format": "pt"})
        config.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
