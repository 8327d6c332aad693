"""GGUF (llama.cpp) LLaMA and Qwen2 files -> (LlamaConfig, params), and their tokenizer.

The `gguf` package reads the file and dequantizes each tensor (Q4_1, Q8_0, ... -> fp32) when
it is needed; `gguf`'s own name map turns HF names into GGUF ones, and the HF name table of
`longlora_jax.io.hf` places them in the params pytree, so there is no second table here.

llama.cpp's converter permutes the rows of q_proj / k_proj from HF's rotate-half RoPE layout
(per head: first half, second half) to interleaved pairs; `_unpermute_rows` restores HF's
(`permute_rows` is the converter's direction, for `io.gguf_export`). Qwen2 files keep HF's
order (llama.cpp runs them with rotate-half RoPE).
"""

from __future__ import annotations

import functools
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf.quants import dequantize

from longlora_jax.errors import CheckpointError, ConfigError
from longlora_jax.io.hf import assemble_params, tensor_names
from longlora_jax.modeling.config import LlamaConfig

SUPPORTED_ARCHS = ("llama", "qwen2")


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _hf_config(reader: gguf.GGUFReader, has_output: bool) -> dict[str, Any]:
    """An HF config.json dict from the GGUF metadata (`{arch}.*` and `tokenizer.ggml.*`)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"GGUF architecture {arch!r} is not supported; valid: {', '.join(SUPPORTED_ARCHS)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else key("vocab_size")
    heads = key("attention.head_count")
    scaling = key("rope.scaling.type", "none")
    if scaling == "none":
        rope: dict[str, Any] = {"rope_type": "default"}
    elif scaling == "linear":
        rope = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    elif scaling == "yarn":
        rope = {"rope_type": "yarn", "factor": key("rope.scaling.factor"),
                "original_max_position_embeddings": key("rope.scaling.original_context_length")}
    else:
        raise ConfigError(f"GGUF rope scaling type {scaling!r} is not supported; valid: "
                          "none, linear, yarn")
    return {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_parameters": {**rope, "rope_theta": key("rope.freq_base", 10000.0)},
        "max_position_embeddings": key("context_length", 2048),
        "tie_word_embeddings": not has_output,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def permute_rows(w_oi: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: per head, rows (half, half) -> interleaved pairs.

    w_oi [heads * D, in] (or a bias [heads * D]) in HF's rotate-half order.
    """
    rows = w_oi.shape[0]
    return (w_oi.reshape(heads, 2, rows // heads // 2, *w_oi.shape[1:])
            .swapaxes(1, 2).reshape(w_oi.shape))


def _unpermute_rows(w_oi: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: per head, rows (pairs interleaved) -> (half, half).

    w_oi [heads * D, in]: llama.cpp wrote rows of head h as (D/2, 2) pairs; HF wants (2, D/2).
    """
    rows = w_oi.shape[0]
    return (w_oi.reshape(heads, rows // heads // 2, 2, *w_oi.shape[1:])
            .swapaxes(1, 2).reshape(w_oi.shape))


def _open(path: str | os.PathLike) -> tuple[pathlib.Path, gguf.GGUFReader, dict[str, Any]]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    reader = _reader(path)
    return path, reader, {t.name: t for t in reader.tensors}


# What the `gguf` package raises for a damaged file while it parses the header, the metadata
# and the tensor table (bad magic or version, counts and lengths beyond the file, unknown
# type codes, undecodable strings).
_MALFORMED = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error,
              UnicodeDecodeError, RecursionError)


def _reader(path: pathlib.Path) -> gguf.GGUFReader:
    """The memory-mapped reader of `path` (tensors are read when dequantized), every tensor's
    bytes checked to lie inside the file; CheckpointError (one line) for a damaged file."""
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(f"{path}: tensor {t.name!r:.80} claims bytes "
                                      f"{t.data_offset}..{end}, past the file's end ({size})")
    except CheckpointError:
        raise
    except _MALFORMED as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    return reader


def _config(reader, tensors, dtype: Any, overrides: Mapping[str, Any] | None) -> LlamaConfig:
    overrides = dict(overrides or {})
    dtype = jnp.dtype(dtype or overrides.get("param_dtype") or "float32")
    hf_config = _hf_config(reader, has_output="output.weight" in tensors)
    return LlamaConfig.from_hf(hf_config, **{**overrides, "param_dtype": dtype.name})


def read_gguf_config(
    path: str | os.PathLike, *, config_overrides: Mapping[str, Any] | None = None
) -> LlamaConfig:
    """The LlamaConfig of a GGUF file (metadata only; no tensor is dequantized)."""
    _, reader, tensors = _open(path)
    return _config(reader, tensors, None, config_overrides)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    shardings: Any = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> tuple[LlamaConfig, dict]:
    """A LLaMA or Qwen2 GGUF file -> (config, params), dequantized to `dtype` (default float32).

    shardings: as for `longlora_jax.io.hf.load_pretrained`.
    config_overrides: LlamaConfig fields to set (scan_layers, dtype, LoRA, ...).
    Raises `ConfigError` for another architecture, `CheckpointError` for missing/unknown tensors.
    """
    path, reader, tensors = _open(path)
    cfg = _config(reader, tensors, dtype, config_overrides)

    llama = cfg.model_type == "llama"
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[cfg.model_type.upper()],
                                        cfg.num_hidden_layers)
    to_gguf = {n.hf: name_map.get_name(n.hf, try_suffixes=(".weight", ".bias"))
               for n in tensor_names(cfg)}
    unknown = sorted(set(tensors) - set(to_gguf.values()))
    if unknown:
        raise CheckpointError(f"{path.name}: tensors {unknown[:4]} are not part of a plain "
                              f"{cfg.model_type} decoder (e.g. rope_freqs: llama3 rope "
                              "scaling is not supported)")
    shapes = {hf: tuple(reversed(tensors[g].shape.tolist()))
              for hf, g in to_gguf.items() if g in tensors}
    heads = {"self_attn.q_proj.weight": cfg.num_attention_heads,
             "self_attn.k_proj.weight": cfg.num_key_value_heads}

    @functools.lru_cache(maxsize=1)
    def hf_tensor(name: str) -> np.ndarray:
        tensor = tensors[to_gguf[name]]
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shapes[name])
        for suffix, n_heads in heads.items():
            if llama and name.endswith(suffix):
                array = _unpermute_rows(array, n_heads)
        return array

    params = assemble_params(cfg, shapes, lambda name, index: hf_tensor(name)[index],
                             dtype=cfg.param_dtype, shardings=shardings, source=path.name)
    return cfg, params


def load_gguf_tokenizer(path: str | os.PathLike):
    """The HF fast tokenizer built from the GGUF metadata (offline; no hub access).

    The same tokenizer as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (transformers'
    own vocabulary/merges/special-token conversion), but the metadata is read with `gguf`:
    transformers' GGUF reader imports torch, which the runtime does not install.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = _reader(pathlib.Path(path))
    grouped = {
        group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                if reader.get_field(f"tokenizer.{key}") is not None}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in vocabulary:
        raise CheckpointError(f"{path}: the GGUF metadata has no tokenizer.ggml.tokens")
    for name, key in _SPECIAL_TOKENS.items():
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        tokenizer_config[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, _ = convert_gguf_tokenizer(_field(reader, "general.architecture"), vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
