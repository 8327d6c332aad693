"""Data: the data section of a config (`config`), file lists (`paths`), document sources
(`sources`: offline assets in `assets`, read with `rdata`; local text/jsonl via TFDS in
`local_tfds`; the TFDS catalog; SFT JSON in `sft`), tokenizers (`tokenizer`), packing
(`packing`), long-range tasks planted in text (`long_range`), the grain training pipeline
(`pipeline`, with `prefetch`), and evaluation token sources and perplexity windows
(`eval_data`).
"""

from longlora_jax.data.config import check_data_config, default_data_config
from longlora_jax.data.eval_data import (
    TokenDocument,
    eval_documents,
    perplexity_windows,
    read_token_file,
    window_starts,
    write_token_file,
)
from longlora_jax.data.pipeline import BATCH_DTYPES, batch_spec, make_train_iterator
from longlora_jax.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "BATCH_DTYPES",
    "ByteTokenizer",
    "TokenDocument",
    "Tokenizer",
    "batch_spec",
    "check_data_config",
    "default_data_config",
    "eval_documents",
    "make_train_iterator",
    "perplexity_windows",
    "read_token_file",
    "window_starts",
    "write_token_file",
]
