"""The training input pipeline: shuffle, tokenize, pack, batch, shard per process (grain).

    it = make_train_iterator(data_cfg, tokenizer, seq_len=N, global_batch=B,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(), seed=0)
    batch = next(it)       # dict of numpy arrays, each [B // process_count, N]:
                           #   inputs int32, targets int32, loss_mask float32,
                           #   segment_ids int32, positions int32 (see `packing`)
    state = it.get_state() # JSON-serializable; it.set_state(state) resumes exactly

Row r of every global batch comes from its own *lane*: lane r reads the examples at positions
r, r + B, r + 2B, ... of the shuffled, endlessly repeated example order (a new permutation
every epoch, from the seed) and packs them. So the global batch does not depend on how many
processes share it, process p computes only its lanes [p*B/P, (p+1)*B/P) and tokenizes only
their documents, and the iterator state is one (example, token offset) pair per lane.
Documents are tokenized on first use and kept in an LRU cache; a background thread prepares
the next batches (`data.prefetch`, see `prefetch.py`). The lane states of all processes
together (`combine_states`) resume on any number of processes, and on another global batch
at a recomputed position (`_repositioned`). The iterator is a
`grain.DatasetIterator`, so grain's orbax checkpoint handlers
(`grain.checkpoint.CheckpointSave/Restore`) can save it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from longlora_jax.data import long_range, sources
from longlora_jax.data.config import check_data_config, resolved_packing
from longlora_jax.data.packing import ROW_KEYS, Example, concat_row, pad_row
from longlora_jax.data.paths import resolve_paths
from longlora_jax.data.prefetch import PrefetchIterator
from longlora_jax.data.sft import check_template, load_sft_json, sft_tokens
from longlora_jax.data.tokenizer import Tokenizer, bos_id, encoder, eos_id
from longlora_jax.errors import ConfigError, DataError

BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
                "segment_ids": np.int32, "positions": np.int32}


def batch_spec(batch: int, seq_len: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """Shape and dtype of every batch entry (e.g. for ahead-of-time compilation)."""
    return {key: ((batch, seq_len), np.dtype(dtype)) for key, dtype in BATCH_DTYPES.items()}


class _Examples:
    """Example id -> (tokens, weights), built on first use and kept in an LRU cache."""

    def __init__(self, size: int, build: Callable[[int], Example], cache_docs: int):
        self.size = size
        self.get = functools.lru_cache(maxsize=cache_docs)(build)


class PackedBatchDataset(grain.IterDataset):
    """Batches of this process's lanes (rows `lanes` of every global batch)."""

    def __init__(self, order: grain.MapDataset, examples: _Examples, *, seq_len: int,
                 global_batch: int, lanes: range, packing: str, reset_positions: bool,
                 fingerprint: str):
        super().__init__(order)
        self.order, self.examples, self.fingerprint = order, examples, fingerprint
        self.seq_len, self.global_batch, self.lanes = seq_len, global_batch, lanes
        self.packing, self.reset_positions = packing, reset_positions

    def lane_example(self, lane: int, k: int) -> Example:
        """The k-th example of `lane`: position lane + k * B of the example order."""
        return self.examples.get(int(self.order[lane + k * self.global_batch]))

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(self)


class _PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: PackedBatchDataset):
        super().__init__()
        self._ds = ds
        self._positions = [(0, 0)] * len(ds.lanes)

    def _next_row(self, i: int, lane: int) -> dict[str, np.ndarray]:
        ds = self._ds
        k, offset = self._positions[i]
        if ds.packing == "pad":
            self._positions[i] = (k + 1, 0)
            return pad_row(ds.lane_example(lane, k), ds.seq_len,
                           reset_positions=ds.reset_positions)
        row, self._positions[i] = concat_row(
            functools.partial(ds.lane_example, lane), (k, offset), ds.seq_len,
            reset_positions=ds.reset_positions)
        return row

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row(i, lane) for i, lane in enumerate(self._ds.lanes)]
        return {key: np.stack([row[key] for row in rows]) for key in ROW_KEYS}

    def get_state(self) -> dict:
        ds = self._ds
        return {"lanes": [list(p) for p in self._positions], "first_lane": ds.lanes.start,
                "global_batch": ds.global_batch, "seq_len": ds.seq_len,
                "fingerprint": ds.fingerprint}

    def set_state(self, state: dict) -> None:
        """Resumes at `state`: this iterator's own (`get_state`), or the state of every lane
        of the global batch (`combine_states`), which any process count resumes from, and
        which a different global batch resumes from at a recomputed position (`_repositioned`;
        one warning line, process 0)."""
        ds = self._ds
        if state.get("fingerprint") != ds.fingerprint:
            raise DataError("data iterator state was saved with other data settings (source, "
                            "paths, packing, seed, ...): resume with the same data config")
        if state.get("seq_len") != ds.seq_len:
            raise DataError(f"data iterator state is for seq_len={state.get('seq_len')}, this "
                            f"pipeline has seq_len={ds.seq_len}: resume with the same seq_len")
        lanes = [(int(k), int(offset)) for k, offset in state["lanes"]]
        if state.get("first_lane") == 0 and len(lanes) == state.get("global_batch"):
            if len(lanes) != ds.global_batch:
                lanes = _repositioned(lanes, ds.global_batch, warn=ds.lanes.start == 0)
            self._positions = lanes[ds.lanes.start:ds.lanes.stop]
            return
        expected = {"first_lane": ds.lanes.start, "global_batch": ds.global_batch,
                    "num_lanes": len(ds.lanes)}
        got = {key: state.get(key) for key in expected} | {"num_lanes": len(lanes)}
        if got != expected:
            raise DataError(f"data iterator state is for {got}, this pipeline has {expected}")
        self._positions = lanes


def combine_states(states: Sequence[dict]) -> dict:
    """The state of every lane of the global batch from the states the processes of a run
    saved (`get_state`, one per process, in any order): what `set_state` takes to resume on
    any number of processes. DataError when they do not fit together."""
    ordered = sorted(states, key=lambda s: s["first_lane"])
    lanes = [lane for s in ordered for lane in s["lanes"]]
    starts = [s["first_lane"] for s in ordered]
    ends = [s["first_lane"] + len(s["lanes"]) for s in ordered]
    same = {(s["global_batch"], s["seq_len"], s["fingerprint"]) for s in ordered}
    if (len(same) != 1 or starts[:1] != [0] or starts[1:] != ends[:-1]
            or len(lanes) != ordered[0]["global_batch"]):
        raise DataError(f"the data iterator states of the {len(states)} processes do not cover "
                        "one global batch (lanes "
                        f"{[(a, b) for a, b in zip(starts, ends, strict=True)]})")
    return {**ordered[0], "first_lane": 0, "lanes": lanes}


def _repositioned(lanes: list[tuple[int, int]], global_batch: int, *,
                  warn: bool) -> list[tuple[int, int]]:
    """Lane positions for `global_batch` lanes that continue where `lanes` (of another global
    batch B) stopped: lane r had read positions r, r + B, ... of the example order up to its
    k_r-th (partly, when its offset is not 0), so every position before E = min(r + k_r B)
    was read; the new lanes start at E (lane r' at its first position >= E). Nothing is
    skipped; the examples at E or after that were already read, wholly or partly, are read
    again (their count is in the warning)."""
    old = len(lanes)
    start = min(r + k * old for r, (k, _) in enumerate(lanes))
    read = sum(k + (offset > 0) for k, offset in lanes)
    if warn:
        print(f"warning: the global batch is {global_batch} but was {old} when the data "
              f"position was saved: reading resumes at example {start} of the data order "
              f"(every example before it was read; {read - start} at or after it had been "
              "read, wholly or in part, and are read again)",
              file=sys.stderr, flush=True)
    return [(-(-(start - r) // global_batch) if start > r else 0, 0)
            for r in range(global_batch)]


def _check_sizes(seq_len: int, global_batch: int, process_index: int, process_count: int,
                 seed: int) -> None:
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be >= 2")
    if global_batch < 1:
        raise ConfigError(f"global_batch={global_batch} must be >= 1")
    if process_count < 1 or global_batch % process_count:
        raise ConfigError(f"global_batch={global_batch} must be a positive multiple of "
                          f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must be in [0, {process_count})")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} must be in [0, 2**32)")


def _fingerprint(cfg: ml_collections.ConfigDict, seed: int, num_examples: int) -> str:
    """What the saved lane positions depend on (not prefetch / cache sizes)."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("prefetch", "cache_docs")}
    fields |= {"packing": resolved_packing(cfg), "seed": seed, "num_examples": num_examples}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class _TokenizedDocuments(Sequence):
    """Documents as token arrays, tokenized on first use (LRU cache)."""

    def __init__(self, docs: grain.MapDataset, encode: Callable[[str], np.ndarray],
                 cache_docs: int):
        self.docs = docs
        self._get = functools.lru_cache(maxsize=cache_docs)(lambda i: encode(docs[i].text))

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._get(i)


# Rows of a task mixture are drawn, not read: this many distinct ones per epoch.
TASK_ROWS_PER_EPOCH = 1 << 20


def _task_examples(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, docs, *,
                   seq_len: int, seed: int) -> _Examples:
    """Rows of text with long-range tasks (`data.long_range`); example i is drawn from a
    generator seeded by (seed, i), so it is the same row on every process and resume."""
    encode = encoder(tokenizer)
    tokens = _TokenizedDocuments(docs, encode, cfg.cache_docs)
    max_distance = cfg.task_max_distance or seq_len

    def build(i: int) -> Example:
        row = long_range.training_row(
            np.random.default_rng([seed, i]), tokens, seq_len + 1, tuple(cfg.tasks),
            cfg.task_fraction, cfg.task_min_distance, max_distance, encode, cfg.tasks_per_row)
        weights = np.ones(seq_len + 1, np.float32)
        for span in row.spans:
            weights[span.start:span.end] = cfg.task_answer_weight
        return row.tokens, weights

    return _Examples(TASK_ROWS_PER_EPOCH, build, cfg.cache_docs)


def _train_examples(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seq_len: int,
                    seed: int) -> _Examples:
    encode, eos = encoder(tokenizer), eos_id(tokenizer)
    bos = bos_id(tokenizer) if cfg.add_bos else None
    if cfg.source == "sft_json":
        check_template(cfg.sft_template)
        records = [ex for path in resolve_paths(cfg.paths, source=cfg.source)
                   for ex in load_sft_json(path)]
        return _Examples(len(records), lambda i: sft_tokens(
            records[i], encode, eos_id=eos, bos_id=bos, template=cfg.sft_template),
            cfg.cache_docs)
    docs = sources.documents(cfg)
    if len(docs) == 0:
        raise DataError(f"data.source={cfg.source!r} has no documents")
    if cfg.tasks:
        return _task_examples(cfg, tokenizer, docs, seq_len=seq_len, seed=seed)
    head = np.asarray([] if bos is None else [bos], np.int32)
    tail = np.asarray([eos], np.int32)

    def build(i: int) -> Example:
        tokens = np.concatenate([head, encode(docs[i].text), tail])
        return tokens, np.ones(len(tokens), np.float32)

    return _Examples(len(docs), build, cfg.cache_docs)


def rows_per_epoch(data_cfg: ml_collections.ConfigDict) -> int:
    """Rows in one pass over the data when every row holds one example (pad packing): the
    number of SFT records or documents. ConfigError for concatenated packing."""
    check_data_config(data_cfg)
    if resolved_packing(data_cfg) != "pad" or data_cfg.tasks:
        raise ConfigError("counting epochs needs one example per row (data.packing 'pad') "
                          "read from a finite set (not data.tasks); set max_steps instead")
    if data_cfg.source == "sft_json":
        return sum(len(load_sft_json(path))
                   for path in resolve_paths(data_cfg.paths, source=data_cfg.source))
    return len(sources.documents(data_cfg))


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
) -> grain.DatasetIterator:
    """An endless, deterministic, checkpointable iterator of this process's training batches.

    Every batch is a dict of numpy arrays of shape [global_batch // process_count, seq_len]
    (`BATCH_DTYPES`); the processes' batches, concatenated in process order, form the global
    batch, identical for any process_count. Cheap to start: documents are tokenized lazily.
    """
    check_data_config(data_cfg)
    _check_sizes(seq_len, global_batch, process_index, process_count, seed)
    examples = _train_examples(data_cfg, tokenizer, seq_len=seq_len, seed=seed)
    order = grain.MapDataset.range(examples.size)
    if data_cfg.shuffle:
        order = order.shuffle(seed=seed)
    local = global_batch // process_count
    dataset = PackedBatchDataset(
        order.repeat(), examples, seq_len=seq_len, global_batch=global_batch,
        lanes=range(process_index * local, (process_index + 1) * local),
        packing=resolved_packing(data_cfg), reset_positions=data_cfg.reset_positions,
        fingerprint=_fingerprint(data_cfg, seed, examples.size))
    iterator = iter(dataset)
    return PrefetchIterator(iterator, data_cfg.prefetch) if data_cfg.prefetch else iterator
