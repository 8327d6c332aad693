"""Document sources of a data config, as random-access grain `MapDataset`s of `Document`s.

    documents(cfg, heldout=False)   training documents (offline sources: minus held-out ones)
    documents(cfg, heldout=True)    the held-out documents (offline sources), else the same set

TensorFlow is never needed: TFDS datasets are read through `as_data_source` (array_record).
"""

from __future__ import annotations

import pathlib

import grain
import ml_collections
import tensorflow_datasets as tfds

from longlora_jax.data import assets
from longlora_jax.data.assets import Document
from longlora_jax.data.local_tfds import local_text_source
from longlora_jax.data.paths import resolve_paths
from longlora_jax.errors import ConfigError, DataError


def _offline(cfg: ml_collections.ConfigDict, heldout: bool) -> list[Document]:
    parts = []
    if cfg.source in ("offline_essays", "offline_all"):
        parts.append((assets.essays(), "heldout_essays"))
    if cfg.source in ("offline_books", "offline_all"):
        parts.append((assets.books(), "heldout_books"))
    docs = []
    for collection, field in parts:
        if not 0 <= cfg[field] < len(collection):
            raise ConfigError(f"data.{field}={cfg[field]} must be in [0, {len(collection)}) "
                              f"(there are {len(collection)} documents)")
        train, held = assets.held_out_split(collection, cfg[field])
        docs.extend(held if heldout else train)
    if not docs:
        raise DataError(f"data.source={cfg.source!r} has no held-out documents (set "
                        "data.heldout_essays / data.heldout_books > 0)")
    return docs


def _decoded(source, name_of, text_field: str) -> grain.MapDataset:
    """MapDataset of Documents over a TFDS data source of byte-string records."""

    def to_document(index: int, record) -> Document:
        text = record[text_field]
        return Document(name_of(index, record),
                        text.decode("utf-8") if isinstance(text, bytes) else str(text))

    return grain.MapDataset.source(source).map_with_index(to_document)


def _local_files(cfg: ml_collections.ConfigDict) -> grain.MapDataset:
    files = resolve_paths(cfg.paths, source=cfg.source)
    data_dir = pathlib.Path(cfg.tfds_data_dir or assets.cache_dir() / "tfds").expanduser()
    kind = "text" if cfg.source == "text_files" else "jsonl"
    source = local_text_source(files, kind=kind, text_field=cfg.text_field, data_dir=data_dir)
    return _decoded(source, lambda i, r: r["name"].decode("utf-8"), "text")


def _tfds_catalog(cfg: ml_collections.ConfigDict) -> grain.MapDataset:
    name, split = cfg.tfds_name, cfg.tfds_split
    try:
        builder = tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"data.tfds_name={name!r} is not a TFDS catalog dataset") from None
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (prepare it where "
            f"TensorFlow is installed: `tfds build {name} --data_dir=DIR "
            "--file_format=array_record`, then set data.tfds_data_dir=DIR)")
    features = builder.info.features
    if cfg.text_field not in features:
        raise DataError(f"data.text_field={cfg.text_field!r} is not a feature of {name!r}; "
                        f"features: {sorted(features)}")
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:
        raise DataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format}; reading it without TensorFlow needs array_record "
            f"(re-prepare with --file_format=array_record)") from None
    except ValueError as err:
        raise DataError(f"data.tfds_split={split!r} for {name!r}: {err}") from None
    return _decoded(source, lambda i, r: f"{name}/{split}/{i}", cfg.text_field)


def documents(cfg: ml_collections.ConfigDict, *, heldout: bool = False) -> grain.MapDataset:
    """The documents of `cfg.source` as a random-access MapDataset of `Document`s.

    `heldout` selects the held-out part of the offline sources; the other sources have no
    split of their own (point an eval config at other files / another TFDS split).
    """
    if cfg.source.startswith("offline_"):
        return grain.MapDataset.source(_offline(cfg, heldout))
    if cfg.source in ("text_files", "jsonl"):
        return _local_files(cfg)
    if cfg.source == "tfds":
        return _tfds_catalog(cfg)
    raise DataError(f"data.source={cfg.source!r} has no text documents")
