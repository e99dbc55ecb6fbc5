"""Built-in large-model configs, written out from their public Hugging Face ``config.json`` values.

No download: the dry runs (``zoscale.dry_run``) build these on the meta device. Values are the
ones of ``facebook/opt-*`` and ``meta-llama/Llama-2-*-hf`` / ``Meta-Llama-3-*`` as published
(hidden size, layers, heads, key/value heads, MLP width, vocabulary, positions, norm epsilon,
rope base, embedding tying).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN_CONFIGS", "builtin_config"]

_OPT = {  # hidden, layers, heads, ffn
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-66b": (9216, 64, 72, 36864),
}
_LLAMA = {  # hidden, layers, heads, kv heads, intermediate, vocab, positions, rope theta
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama-2-13b": (5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
    "llama-2-70b": (8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
    "llama-3-70b": (8192, 80, 64, 8, 28672, 128256, 8192, 500000.0),
}

#: Every built-in name.
BUILTIN_CONFIGS = (*_OPT, *_LLAMA)


def _opt(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    return {"model_type": "opt", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "ffn_dim": ffn, "word_embed_proj_dim": hidden, "vocab_size": 50272, "max_position_embeddings": 2048,
            "do_layer_norm_before": True, "tie_word_embeddings": True, "torch_dtype": "float16"}


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, positions: int,
           theta: float) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
            "max_position_embeddings": positions, "rms_norm_eps": 1e-5, "rope_theta": theta,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16" if vocab > 32000 else "float16"}


def builtin_config(name: str) -> Any:
    """The ``transformers`` config of a built-in model (see :data:`BUILTIN_CONFIGS`).

    Raises:
        ValueError: an unknown name (the known ones listed).
    """
    from transformers import AutoConfig

    key = name.lower()
    if key in _OPT:
        values = _opt(*_OPT[key])
    elif key in _LLAMA:
        values = _llama(*_LLAMA[key])
    else:
        raise ValueError(f"unknown built-in model {name!r}; built in: {', '.join(BUILTIN_CONFIGS)}")
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)
