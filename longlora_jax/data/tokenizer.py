"""The tokenizer interface the data pipeline needs, and a byte tokenizer for tests.

Any object with `encode(text)` and `eos_token_id` works (`bos_token_id` too when BOS is asked
for). HF `transformers` tokenizers are called with `add_special_tokens=False` and `tokenizers`
`Encoding` results are unwrapped, so no special token is ever added behind the pipeline's back.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import numpy as np

from longlora_jax.errors import ConfigError


class Tokenizer(Protocol):
    """What the data pipeline calls: text -> ids (no special tokens), and the EOS id."""

    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 = pad, 1 = BOS, 2 = EOS, byte b -> b + 3 (vocab 259)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def _special_id(tokenizer: Tokenizer, attr: str) -> int:
    value = getattr(tokenizer, attr, None)
    if value is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no {attr}; the data "
                          f"pipeline needs it (set it on the tokenizer)")
    return int(value)


def eos_id(tokenizer: Tokenizer) -> int:
    return _special_id(tokenizer, "eos_token_id")


def bos_id(tokenizer: Tokenizer) -> int:
    return _special_id(tokenizer, "bos_token_id")


def encoder(tokenizer: Tokenizer) -> Callable[[str], np.ndarray]:
    """`text -> int32 ids` without special tokens, for any tokenizer of the interface."""
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    kwargs = {"add_special_tokens": False} if "add_special_tokens" in params else {}

    def encode(text: str) -> np.ndarray:
        out = tokenizer.encode(text, **kwargs)
        return np.asarray(getattr(out, "ids", out), dtype=np.int32).reshape(-1)

    return encode


def decoder(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """`ids -> text` without special tokens, for HF tokenizers and the byte tokenizer.

    A tokenizer without `skip_special_tokens` (the byte tokenizer) is given only the ids
    below its `vocab_size`: a random-init model's vocabulary may be larger.
    """
    try:
        params = inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        params = {}
    if "skip_special_tokens" in params:
        return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
    size = getattr(tokenizer, "vocab_size", None)
    return lambda ids: tokenizer.decode([int(i) for i in ids if size is None or int(i) < size])
