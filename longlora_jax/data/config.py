"""The data section of a config: `default_data_config()` documents every field."""

from __future__ import annotations

import ml_collections

from longlora_jax.data.long_range import check_tasks
from longlora_jax.errors import ConfigError

TRAIN_SOURCES = ("offline_essays", "offline_books", "offline_all", "text_files", "jsonl",
                 "tfds", "sft_json")
EVAL_SOURCES = ("offline_essays", "offline_books", "offline_all", "text_files", "jsonl",
                "tfds", "token_file")
PACKINGS = ("auto", "concat", "pad")
TOKEN_DTYPES = ("uint16", "uint32")


def default_data_config() -> ml_collections.ConfigDict:
    """The data fields, with their defaults:

    source           where documents come from:
                       "offline_essays" | "offline_books" | "offline_all": the offline assets
                         (49 essays / 6 novels / both), minus the held-out documents below;
                       "text_files": `paths` are text files (one document per file), directories
                         (every file below, sorted) or glob patterns;
                       "jsonl": `paths` are JSON-lines files, one document per line in
                         `text_field` (both go through a local TFDS builder, array_record;
                         both are read as UTF-8: a file with bytes that are not is named in a
                         warning, one with more than a quarter of them refused);
                       "tfds": the TFDS catalog dataset `tfds_name`/`tfds_split` prepared in
                         `tfds_data_dir` (e.g. pg19 on a TPU VM), read without TensorFlow;
                       "sft_json": `paths` are LongAlpaca-format JSON files (SFT);
                       "token_file": (evaluation only) uint16/uint32 token .bin files.
    paths            tuple of files / directories / globs for the file-based sources.
    text_field       key of the document text in jsonl records and TFDS features (pg19:
                     "book_text").
    tfds_name        TFDS catalog name, optionally with config/version ("pg19", "pg19:0.1.1").
    tfds_split       TFDS split, slicing allowed ("train", "test", "train[:1%]").
    tfds_data_dir    TFDS data dir; "" = TFDS's default for "tfds" and `<asset cache>/tfds`
                     for the local text/jsonl builder.
    packing          "concat": documents + EOS concatenated and cut into windows of seq_len + 1
                     tokens with stride seq_len (the official pretraining recipe); "pad": one
                     document per row, truncated to seq_len + 1 tokens and padded; "auto": "pad"
                     for sft_json, "concat" otherwise.
    add_bos          prepend the tokenizer's BOS to every document / SFT example.
    reset_positions  positions restart at 0 at each document start inside a row (default:
                     0..seq_len-1 for every row, as the official code).
    heldout_essays   number of essays held out of training for evaluation (offline sources).
    heldout_books    number of novels held out (offline sources).
    sft_template     "longlora" (the official SFT script) | "llama2_sys" | "alpaca"; see
                     `longlora_jax.data.sft`.
    shuffle          shuffle documents (a new order every epoch, from the seed).
    tasks            long-range tasks planted in the text rows (`data.long_range`: niah_single,
                     niah_multikey, repeat, vt); () = plain text. With tasks, every row is
                     seq_len + 1 tokens of one random text slice (one row per example).
    task_fraction    share of the rows that carry tasks (the others are plain text).
    tasks_per_row    how many tasks such a row carries (as many as fit, up to this).
    task_min_distance / task_max_distance  how far back (tokens) a task's answer is read,
                     uniform in [min, max]; max 0 = seq_len.
    task_answer_weight  loss weight of a task's answer tokens (the rest of the row: 1).
    token_dtype      "uint16" | "uint32": element type of token_file .bin files.
    cache_docs       tokenized documents kept in memory per process (LRU).
    prefetch         batches prepared ahead in a background thread (0 = none).
    """
    cfg = ml_collections.ConfigDict()
    cfg.source = "offline_essays"
    cfg.paths = ()
    cfg.text_field = "text"
    cfg.tfds_name = "pg19"
    cfg.tfds_split = "train"
    cfg.tfds_data_dir = ""
    cfg.packing = "auto"
    cfg.add_bos = False
    cfg.reset_positions = False
    cfg.heldout_essays = 5
    cfg.heldout_books = 1
    cfg.sft_template = "longlora"
    cfg.shuffle = True
    cfg.tasks = ()
    cfg.task_fraction = 0.5
    cfg.tasks_per_row = 1
    cfg.task_min_distance = 16
    cfg.task_max_distance = 0
    cfg.task_answer_weight = 1.0
    cfg.token_dtype = "uint16"
    cfg.cache_docs = 64
    cfg.prefetch = 2
    return cfg


def _choice(cfg: ml_collections.ConfigDict, field: str, valid: tuple[str, ...]) -> None:
    if cfg[field] not in valid:
        raise ConfigError(f"data.{field}={cfg[field]!r}; valid: {', '.join(valid)}")


def check_data_config(cfg: ml_collections.ConfigDict, *, for_eval: bool = False) -> None:
    """Raises ConfigError (one line) for an unknown or missing field or a bad value."""
    unknown = sorted(set(cfg.keys()) - set(default_data_config().keys()))
    if unknown:
        raise ConfigError(f"unknown data config field(s) {unknown}; valid: "
                          f"{sorted(default_data_config().keys())}")
    missing = sorted(set(default_data_config().keys()) - set(cfg.keys()))
    if missing:
        raise ConfigError(f"data config lacks field(s) {missing}; start from "
                          "longlora_jax.data.default_data_config()")
    _choice(cfg, "source", EVAL_SOURCES if for_eval else TRAIN_SOURCES)
    _choice(cfg, "packing", PACKINGS)
    _choice(cfg, "token_dtype", TOKEN_DTYPES)
    if cfg.source in ("text_files", "jsonl", "sft_json", "token_file") and not cfg.paths:
        raise ConfigError(f"data.source={cfg.source!r} needs data.paths (files, directories or "
                          "globs)")
    for field in ("heldout_essays", "heldout_books", "prefetch"):
        if int(cfg[field]) < 0:
            raise ConfigError(f"data.{field}={cfg[field]} must be >= 0")
    check_tasks(cfg.tasks)
    if cfg.tasks and cfg.source == "sft_json":
        raise ConfigError("data.tasks plant tasks in text documents; data.source "
                          "'sft_json' has examples, not text")
    if not 0.0 <= cfg.task_fraction <= 1.0:
        raise ConfigError(f"data.task_fraction={cfg.task_fraction} must be in [0, 1]")
    if cfg.tasks_per_row < 1:
        raise ConfigError(f"data.tasks_per_row={cfg.tasks_per_row} must be >= 1")
    if cfg.task_answer_weight <= 0:
        raise ConfigError(f"data.task_answer_weight={cfg.task_answer_weight} must be > 0")
    if cfg.task_min_distance < 1 or cfg.task_max_distance < 0:
        raise ConfigError(f"data.task_min_distance={cfg.task_min_distance} must be >= 1 "
                          f"and data.task_max_distance={cfg.task_max_distance} >= 0")
    if cfg.cache_docs < 1:
        raise ConfigError(f"data.cache_docs={cfg.cache_docs} must be >= 1")


def resolved_packing(cfg: ml_collections.ConfigDict) -> str:
    """"concat" or "pad" ("auto": pad for SFT, concat for pretraining)."""
    if cfg.packing == "auto":
        return "pad" if cfg.source == "sft_json" or cfg.tasks else "concat"
    return cfg.packing
