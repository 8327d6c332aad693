"""Synthetic long-range tasks planted in real text: rows where context matters, and labels.

A row is L tokens of filler text (a random slice of the documents) with a task written over
part of it; the row says which of its tokens are scored and from how far back the answer
must be read (`distance`, in tokens). The task shapes follow RULER (arXiv 2404.06654):

    niah_single    a needle " ABCD=482913; " at some depth; at the answer position the same
                   " ABCD=" and the scored value "482913".
    niah_multikey  the same with three distractor needles (other keys, other values) placed
                   elsewhere in the row; one key is asked.
    repeat         a passage of `REPEAT_TOKENS` random letters written into the text and
                   copied `distance` tokens later; the copy (after its first `REPEAT_WARMUP`
                   tokens, which say which passage it is) is predictable only by attending
                   back (without it, about 27 choices per letter).
    vt             variable tracking: " $QWXYZ=48291; " then, spread through the text,
                   " $BCDFG=QWXYZ; " and " $HJKLM=BCDFG; "; at the answer position
                   " ?48291:" and the scored names "QWXYZ BCDFG HJKLM".

Distances count from the first token of what is read (the needle's value, the original
passage, the chain's first name) to the first scored token. Scored answers (niah, vt) are
correct when every scored token is the model's argmax given the true prefix: exactly what
greedy decoding would write there. The templates are terse on purpose: the separator before an
answer ("=", ":") appears nowhere else in a row with one needle, so a model that copies what
followed its earlier occurrence (an induction head) can solve niah_single, while distractors
(niah_multikey) and chains (vt) need the key itself. Rows are built from token ids of any
tokenizer (each piece encoded on its own), deterministically from an `np.random.Generator`.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence

import numpy as np

from longlora_jax.errors import ConfigError

TASKS = ("niah_single", "niah_multikey", "repeat", "vt")
ANSWER_TASKS = ("niah_single", "niah_multikey", "vt")  # scored by exact match
REPEAT_TOKENS = 48
REPEAT_WARMUP = 8
DISTRACTORS = 3
VT_HOPS = 3
_CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"


@dataclasses.dataclass(frozen=True)
class Span:
    """Scored tokens [start, end) of a row (token indices), read from `distance` back."""

    task: str
    start: int
    end: int
    distance: int


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """L tokens and the spans that are scored (none for a plain text row)."""

    tokens: np.ndarray  # [L] int32
    spans: tuple[Span, ...]


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown long-range task(s) {unknown}; valid: {', '.join(TASKS)}")


def _key(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), 4))


def _name(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(_CONSONANTS), 5))


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(rng.integers(10 ** (n - 1), 10 ** n))


class _Row:
    """A filler row being written over; refuses overlapping writes."""

    def __init__(self, filler: np.ndarray):
        self.tokens = filler.astype(np.int32).copy()
        self.used = np.zeros(len(filler), bool)

    def free(self, start: int, size: int) -> bool:
        return start >= 0 and start + size <= len(self.tokens) and not self.used[
            start:start + size].any()

    def write(self, start: int, pieces: Sequence[np.ndarray]) -> None:
        """Writes the pieces one after the other from `start`."""
        tokens = np.concatenate(pieces)
        end = start + len(tokens)
        if not self.free(start, len(tokens)):
            raise ValueError(f"write [{start}, {end}) overlaps or leaves the row")
        self.tokens[start:end] = tokens
        self.used[start:end] = True


def _place_free(rng: np.random.Generator, row: _Row, size: int, lo: int, hi: int,
                tries: int = 64) -> int | None:
    """A random start in [lo, hi - size] where `size` tokens are free, or None."""
    if hi - size < lo:
        return None
    for _ in range(tries):
        start = int(rng.integers(lo, hi - size + 1))
        if row.free(start, size):
            return start
    return None


def _needle(encode, key: str, value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return encode(f" {key}="), encode(value), encode("; ")


def build_row(rng: np.random.Generator, filler: np.ndarray, task: str, distance: int,
              encode: Callable[[str], np.ndarray], *, answer_at_end: bool = False) -> TaskRow:
    """`task` written over `filler` ([L] tokens) with its answer read from `distance` back.

    `answer_at_end` puts the scored span at the row's end (RULER's question position); else
    anywhere that fits. ValueError when the task cannot fit in L tokens at that distance.
    """
    row = _Row(filler)
    span = _plant(rng, row, task, distance, encode, answer_at_end=answer_at_end)
    return TaskRow(row.tokens, (span,))


def _plant(rng: np.random.Generator, row: _Row, task: str, distance: int,
           encode: Callable[[str], np.ndarray], *, answer_at_end: bool = False) -> Span:
    """Writes `task` over the free tokens of `row`; its scored span. ValueError (the row
    unchanged) when it does not fit there at that distance."""
    check_tasks([task])
    n = len(row.tokens)
    if task == "repeat":
        size = REPEAT_TOKENS
        if distance < size:
            raise ValueError(f"repeat distance {distance} < passage length {size}")
        last = n - size if answer_at_end else int(rng.integers(distance, n - size + 1))
        src = last - distance
        if src < 0 or not (row.free(src, size) and row.free(last, size)):
            raise ValueError(f"repeat distance {distance} does not fit in {n} tokens")
        letters = "".join(rng.choice(list(string.ascii_lowercase + " "), 2 * size))
        passage = encode(letters)[:size]
        row.write(src, [passage])
        row.write(last, [passage])
        return Span(task, last + REPEAT_WARMUP, last + size, distance)

    if task == "vt":
        value, names = _digits(rng, 5), [_name(rng) for _ in range(VT_HOPS)]
        links = [[encode(f" ${names[0]}="), encode(f"{value}; ")]]
        links += [[encode(f" ${names[i]}={names[i - 1]}; ")] for i in range(1, VT_HOPS)]
        question, answer = encode(f" ?{value}:"), encode(" ".join(names))
        tail = [question, answer, encode("; ")]
    else:
        key, value = _key(rng), _digits(rng, 6)
        prefix, answer, stop = _needle(encode, key, value)
        links = [[prefix, answer, stop]]
        question, tail = prefix, [prefix, answer, stop]
    tail_size = sum(len(p) for p in tail)
    # the answer's first token sits `distance` after the first read token of links[0]
    read_offset = len(links[0][0]) if task != "vt" else len(encode(" $"))
    if answer_at_end:
        q_start = n - tail_size
    else:
        lo = distance - len(question) + read_offset
        q_start = int(rng.integers(max(lo, 0), n - tail_size + 1)) if lo <= n - tail_size else -1
    a_start = q_start + len(question)
    l_start = a_start - distance - read_offset
    link_size = sum(len(p) for p in links[0])
    if (q_start < 0 or l_start < 0 or l_start + link_size > q_start
            or not (row.free(q_start, tail_size) and row.free(l_start, link_size))):
        raise ValueError(f"{task} at distance {distance} does not fit in {n} tokens")
    hops = []  # vt: later hops between the first link and the question, placed before writing
    used = row.used.copy()
    row.used[q_start:q_start + tail_size] = row.used[l_start:l_start + link_size] = True
    for link in links[1:]:
        size = sum(len(p) for p in link)
        start = _place_free(rng, row, size, l_start + link_size, q_start)
        if start is None:
            row.used = used
            raise ValueError(f"vt chain does not fit at distance {distance}")
        row.used[start:start + size] = True
        hops.append((start, link))
    row.used = used
    row.write(q_start, tail)
    row.write(l_start, links[0])
    for start, link in hops:
        row.write(start, link)
    if task == "niah_multikey":
        keys = {key}
        for _ in range(DISTRACTORS):
            other_key = _key(rng)
            while other_key in keys:
                other_key = _key(rng)
            keys.add(other_key)
            other = _needle(encode, other_key, _digits(rng, 6))
            start = _place_free(rng, row, sum(len(p) for p in other), 0, n)
            if start is not None:
                row.write(start, list(other))
    return Span(task, a_start, a_start + len(answer), distance)


def filler_slice(rng: np.random.Generator, docs: Sequence[np.ndarray], length: int
                 ) -> np.ndarray:
    """`length` tokens of text: a random document from a random offset, continued by the
    next documents when it runs out."""
    i = int(rng.integers(len(docs)))
    start = int(rng.integers(max(len(docs[i]) - length, 0) + 1))
    pieces, have = [docs[i][start:start + length]], min(len(docs[i]) - start, length)
    while have < length:
        i = (i + 1) % len(docs)
        pieces.append(docs[i][:length - have])
        have += len(pieces[-1])
    return np.concatenate(pieces)


def training_row(rng: np.random.Generator, docs: Sequence[np.ndarray], length: int,
                 tasks: Sequence[str], task_fraction: float, min_distance: int,
                 max_distance: int, encode: Callable[[str], np.ndarray],
                 tasks_per_row: int = 1) -> TaskRow:
    """A training row: with probability `task_fraction` up to `tasks_per_row` tasks (each
    drawn from `tasks`) at distances drawn uniformly from [min_distance, max_distance] among
    those at which they fit beside what is already written (8 draws each; a task that never
    fits is left out, so a row may stay plain text), else plain text."""
    filler = filler_slice(rng, docs, length)
    if not tasks or rng.random() >= task_fraction:
        return TaskRow(filler.astype(np.int32), ())
    row, spans = _Row(filler), []
    for _ in range(tasks_per_row):
        task = tasks[int(rng.integers(len(tasks)))]
        for _ in range(8):
            distance = int(rng.integers(min_distance, max(min_distance, max_distance) + 1))
            try:
                spans.append(_plant(rng, row, task, distance, encode))
                break
            except ValueError:
                continue
    return TaskRow(row.tokens, tuple(spans))


def eval_rows(seed: int, docs: Sequence[np.ndarray], length: int, task: str,
              buckets: Sequence[tuple[int, int]], per_bucket: int,
              encode: Callable[[str], np.ndarray]) -> list[tuple[int, TaskRow]]:
    """`per_bucket` rows of `task` for each distance bucket [lo, hi), answers at the end of
    rows of `length` tokens; a list of (bucket index, row). Distances are uniform over those
    in the bucket at which the task fits (a bucket where it never fits has no rows).
    Deterministic in `seed`."""
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    out = []
    for b, (lo, hi) in enumerate(buckets):
        for _ in range(per_bucket):
            for _ in range(32):
                distance = int(rng.integers(lo, hi))
                try:
                    row = build_row(rng, filler_slice(rng, docs, length), task, distance,
                                    encode, answer_at_end=True)
                except ValueError:
                    continue
                out.append((b, row))
                break
    return out
