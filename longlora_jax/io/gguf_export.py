"""(LlamaConfig, params) -> a GGUF file that llama.cpp runs, written with the `gguf` package.

    write_gguf(cfg, params, path, gguf_type="f16", tokenizer=tok, source_gguf=None)

What llama.cpp's own converter (convert_hf_to_gguf.py) writes for the same HF checkpoint:
- architecture `llama` for LLaMA and Mistral (llama.cpp runs Mistral as LLaMA; a sliding
  window shorter than the context is not representable there, one warning line), `qwen2` for
  Qwen2 (q/k/v biases). GPT-NeoX is refused (ConfigError).
- `{arch}.*` hyper-parameters, `{arch}.rope.scaling.{type,factor,original_context_length}`
  for linear and YaRN scaling (llama.cpp has no dynamic NTK; LLaMA-3 scaling needs a
  rope_freqs tensor, not written: both are refused), and `{arch}.context_length` = the
  (trained) max_position_embeddings.
- tensors under `gguf`'s own name map; LLaMA's q/k rows permuted to llama.cpp's interleaved
  RoPE pairs (the inverse of `io.gguf`'s unpermute); no `output.weight` when the embeddings
  are tied. Types: f32 (everything fp32), f16 or q8_0 (2-D weights; norms and biases stay
  fp32, and a matrix whose rows are not a multiple of 32 falls back to f16 under q8_0, as
  llama.cpp does).
- the tokenizer as `tokenizer.ggml.*`: copied key by key from `source_gguf` when the model
  came from a GGUF file (SmolLM2's); else built from the HF tokenizer with `gguf.vocab` (GPT-2
  byte-level BPE, LLaMA HF BPE or SentencePiece), special ids and chat template included;
  the byte tokenizer of the presets has no llama.cpp form (`tokenizer.ggml.model = none`:
  the file runs on token ids).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

from longlora_jax.data.tokenizer import ByteTokenizer
from longlora_jax.errors import ConfigError
from longlora_jax.io.gguf import permute_rows
from longlora_jax.io.hf import hf_tensors
from longlora_jax.io.run import warn
from longlora_jax.modeling.config import LlamaConfig

GGUF_TYPES = ("f32", "f16", "q8_0")
# HF model_type -> llama.cpp architecture.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_Q8_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]


def check_exportable(cfg: LlamaConfig, gguf_type: str) -> str:
    """The llama.cpp architecture for `cfg`; ConfigError for a type, family or RoPE scaling
    GGUF cannot carry."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"gguf.type={gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
    if cfg.model_type not in GGUF_ARCHS:
        raise ConfigError(f"GGUF export of model_type {cfg.model_type!r} is not supported; "
                          f"valid: {', '.join(GGUF_ARCHS)} (use --format merged)")
    kind = cfg.rope_scaling.rope_type
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError(f"rope scaling {kind!r} has no GGUF form llama.cpp reads; valid: "
                          "default, linear, yarn (use --format merged)")
    return GGUF_ARCHS[cfg.model_type]


def _hyper_parameters(writer: gguf.GGUFWriter, cfg: LlamaConfig, gguf_type: str) -> None:
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_FILE_TYPES[gguf_type])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    scaling = cfg.rope_scaling
    if scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    elif scaling.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling.factor)
        writer.add_rope_scaling_orig_ctx_len(scaling.original_max_position_embeddings)


def copy_tokenizer_fields(writer: gguf.GGUFWriter, source: str | os.PathLike) -> None:
    """Every `tokenizer.*` key of the GGUF file `source`, with its value type, into `writer`."""
    reader = gguf.GGUFReader(source)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def _hf_vocab(path: pathlib.Path) -> gguf.vocab.Vocab:
    """The first of gguf's vocabulary readers that understands the saved tokenizer at `path`."""
    for vocab_class in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab,
                        gguf.vocab.SentencePieceVocab):
        try:
            return vocab_class(path)
        except (FileNotFoundError, TypeError):
            continue
    raise ConfigError("the run's tokenizer is neither GPT-2 byte-level BPE, LLaMA BPE nor "
                      "SentencePiece: it has no GGUF form")


def _write_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.* from an HF tokenizer (as llama.cpp's converter does), padded with
    unused tokens to the model's `vocab_size`."""
    with tempfile.TemporaryDirectory() as scratch:
        path = pathlib.Path(scratch)
        tokenizer.save_pretrained(path)
        vocab = _hf_vocab(path)
        texts, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            texts.append(text)
            scores.append(score)
            types.append(kind)
        if len(texts) > vocab_size:
            raise ConfigError(f"the tokenizer has {len(texts)} tokens but the model's "
                              f"embedding {vocab_size} rows")
        for i in range(len(texts), vocab_size):
            texts.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre("default")
        writer.add_token_list(texts)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(path, load_merges=vocab.tokenizer_model == "gpt2",
                                    n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)


def _write_tokenizer(writer: gguf.GGUFWriter, cfg: LlamaConfig, tokenizer: Any,
                     source_gguf: str | os.PathLike | None) -> None:
    if source_gguf is not None:
        copy_tokenizer_fields(writer, source_gguf)
    elif isinstance(tokenizer, ByteTokenizer) or tokenizer is None:
        writer.add_tokenizer_model("none")
        for special in ("bos", "eos", "pad"):
            token_id = getattr(cfg, f"{special}_token_id", None)
            if token_id is None and tokenizer is not None:
                token_id = getattr(tokenizer, f"{special}_token_id")
            if isinstance(token_id, int):
                getattr(writer, f"add_{special}_token_id")(token_id)
    else:
        _write_hf_tokenizer(writer, tokenizer, cfg.vocab_size)


def _tensor(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw dtype or None) of one tensor as `gguf_type` stores it."""
    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "q8_0" and array.shape[-1] % _Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), q8), q8
    return array.astype(np.float16), None


def write_gguf(cfg: LlamaConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
               gguf_type: str = "f16", tokenizer: Any = None,
               source_gguf: str | os.PathLike | None = None, name: str = "") -> pathlib.Path:
    """Writes `params` (plain model params, adapters already merged) as the GGUF file `path`.

    See the module docstring for what is written. tokenizer: the model's tokenizer (HF, or
    the byte tokenizer); source_gguf: the GGUF file the model came from, whose tokenizer keys
    are copied instead. ConfigError (before anything is written) for what GGUF cannot carry.
    """
    arch = check_exportable(cfg, gguf_type)
    if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        warn(f"sliding_window={cfg.sliding_window} is not written: llama.cpp runs "
             f"{cfg.model_type} as llama, with full attention over the context")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or cfg.model_type)
    _hyper_parameters(writer, cfg, gguf_type)
    _write_tokenizer(writer, cfg, tokenizer, source_gguf)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    heads = {"self_attn.q_proj.weight": cfg.num_attention_heads,
             "self_attn.k_proj.weight": cfg.num_key_value_heads}
    for hf_name, array in hf_tensors(cfg, params, np.float32):
        if arch == "llama":
            for suffix, n_heads in heads.items():
                if hf_name.endswith(suffix):
                    array = permute_rows(array, n_heads)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data, raw_dtype = _tensor(array, gguf_type)
        if raw_dtype is None:
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)
