"""Evaluation data: token arrays of held-out documents, token .bin files, perplexity windows.

    docs = eval_documents(data_cfg, tokenizer)        # list[TokenDocument(name, tokens_t)]
    for inputs_bn, targets_bn, mask_bn in perplexity_windows(doc.tokens, seq_len=4096):
        ...                                           # NLL sum over mask / mask sum -> ppl

Token files are flat arrays of uint16 (vocab <= 65536, what the official LongLoRA eval reads
with `np.memmap(path, dtype=np.uint16)`) or uint32 tokens, memory-mapped.

Perplexity protocols (official `eval.py`, `get_as_batch` + `evaluate`):
  "official"    windows of seq_len tokens starting every `stride` (256) tokens at
                range(0, T - seq_len, stride), the last start dropped; the official loss is
                HF's `model(input_ids=x, labels=x)`, i.e. seq_len - 1 scored tokens per
                window, so the mask is 0 on each window's last position.
  "nonoverlap"  stride = seq_len, every window with seq_len + 1 tokens available, all seq_len
                positions scored: each token predicted once.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import ml_collections
import numpy as np

from longlora_jax.data import sources
from longlora_jax.data.config import check_data_config
from longlora_jax.data.paths import resolve_paths
from longlora_jax.data.tokenizer import Tokenizer, bos_id, encoder
from longlora_jax.errors import ConfigError, DataError

PROTOCOLS = ("official", "nonoverlap")


@dataclasses.dataclass(frozen=True)
class TokenDocument:
    """A named 1-D token array (int32, or a read-only uint16/uint32 memmap)."""

    name: str
    tokens: np.ndarray


def _token_dtype(dtype: str) -> np.dtype:
    if dtype not in ("uint16", "uint32"):
        raise ConfigError(f"token dtype {dtype!r}; valid: uint16, uint32")
    return np.dtype(dtype)


def read_token_file(path: str | pathlib.Path, dtype: str = "uint16") -> np.ndarray:
    """A flat token .bin file as a read-only memmap of `dtype` (uint16 | uint32)."""
    path, np_dtype = pathlib.Path(path), _token_dtype(dtype)
    if not path.is_file():
        raise DataError(f"token file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0 or size % np_dtype.itemsize:
        raise DataError(f"token file {str(path)!r} has {size} bytes, not a positive multiple of "
                        f"{np_dtype.itemsize} ({dtype})")
    return np.memmap(path, dtype=np_dtype, mode="r")


def write_token_file(path: str | pathlib.Path, tokens: np.ndarray, dtype: str = "uint16"
                     ) -> pathlib.Path:
    """Writes tokens as a flat `dtype` array (the official eval's .bin layout)."""
    np_dtype, tokens = _token_dtype(dtype), np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np_dtype).max):
        raise DataError(f"token ids in [{tokens.min()}, {tokens.max()}] do not fit {dtype}")
    path = pathlib.Path(path)
    tokens.astype(np_dtype).tofile(path)
    return path


def eval_documents(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
                   *, max_docs: int = 0) -> list[TokenDocument]:
    """Token arrays of the evaluation documents of `data_cfg`.

    offline_*: the held-out documents; text_files / jsonl / tfds (e.g. pg19 with tfds_split
    "test", text_field "book_text"): every document; token_file: each .bin file of `paths` as one
    document (no tokenizer needed). Text is encoded without special tokens, BOS prepended when
    `data_cfg.add_bos`. `max_docs` > 0 keeps the first max_docs documents.
    """
    check_data_config(data_cfg, for_eval=True)
    if data_cfg.source == "token_file":
        docs = [TokenDocument(str(p), read_token_file(p, data_cfg.token_dtype))
                for p in resolve_paths(data_cfg.paths, source=data_cfg.source)]
        return docs[:max_docs] if max_docs > 0 else docs
    if tokenizer is None:
        raise ConfigError(f"eval source {data_cfg.source!r} needs a tokenizer")
    encode = encoder(tokenizer)
    head = np.asarray([bos_id(tokenizer)] if data_cfg.add_bos else [], np.int32)
    docs = sources.documents(data_cfg, heldout=True)
    count = min(len(docs), max_docs) if max_docs > 0 else len(docs)
    out = [TokenDocument(doc.name, np.concatenate([head, encode(doc.text)]))
           for doc in (docs[i] for i in range(count))]
    if not out:
        raise DataError(f"eval source {data_cfg.source!r} has no documents")
    return out


def window_starts(num_tokens: int, seq_len: int, *, protocol: str = "official",
                  stride: int = 256) -> np.ndarray:
    """Start offsets of the perplexity windows of a T-token document (see module docstring)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be >= 2")
    if protocol == "official":
        if stride < 1:
            raise ConfigError(f"stride={stride} must be >= 1")
        return np.arange(0, num_tokens - seq_len, stride, dtype=np.int64)[:-1]
    return np.arange(0, num_tokens - seq_len, seq_len, dtype=np.int64)


def perplexity_windows(
    tokens: np.ndarray,
    seq_len: int,
    *,
    protocol: str = "official",
    stride: int = 256,
    batch_size: int = 1,
    pad_batches: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches (inputs_bn int32, targets_bn int32, mask_bn float32) of perplexity windows.

    `targets[:, t]` is the token after `inputs[:, t]`; `mask` marks the scored positions. The
    last batch has fewer rows unless `pad_batches` (then zero rows with mask 0 fill it).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    starts = window_starts(len(tokens), seq_len, protocol=protocol, stride=stride)
    if len(starts) == 0:
        raise DataError(f"a document of {len(tokens)} tokens is too short for one {protocol} "
                        f"window of seq_len={seq_len}")
    offsets = np.arange(seq_len + 1)
    scored = np.ones(seq_len, np.float32)
    if protocol == "official":
        scored[-1] = 0.0
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        windows = np.asarray(tokens[chunk[:, None] + offsets], dtype=np.int32)
        mask = np.broadcast_to(scored, (len(chunk), seq_len)).copy()
        if pad_batches and len(chunk) < batch_size:
            fill = batch_size - len(chunk)
            windows = np.concatenate([windows, np.zeros((fill, seq_len + 1), np.int32)])
            mask = np.concatenate([mask, np.zeros((fill, seq_len), np.float32)])
        yield windows[:, :-1], windows[:, 1:], mask
