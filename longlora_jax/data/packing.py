"""Rows of the training batch from tokenized examples (pure numpy).

An example is `(tokens_l int32, weights_l float32)`, `weights[i]` the loss weight of predicting
`tokens[i]` (pretraining: all 1, documents end with EOS; SFT: 0 on the prompt). A row of length
N is built from N + 1 consecutive tokens `t`:

    inputs = t[:N]   targets = t[1:]   loss_mask = w[1:]   (0 on padding)
    segment_ids: 1-based index, within the row, of the example each input token belongs to
                 (0 = padding); positions: 0..N-1, or restarting at each segment start.

"concat" packing reads a lane's examples as one stream and cuts windows of N + 1 tokens with
stride N (every token is a target exactly once); "pad" packing puts one example per row,
truncated to N + 1 tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Example = tuple[np.ndarray, np.ndarray]
ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def _row(tokens: np.ndarray, weights: np.ndarray, segments: np.ndarray, seq_len: int,
         reset_positions: bool) -> dict[str, np.ndarray]:
    """A row from up to N + 1 tokens (`segments` 1-based per token); shorter input is padded."""
    n_valid = max(len(tokens) - 1, 0)  # input positions that have a target
    row = {
        "inputs": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.arange(seq_len, dtype=np.int32),
    }
    row["inputs"][:n_valid] = tokens[:n_valid]
    row["targets"][:n_valid] = tokens[1:n_valid + 1]
    row["loss_mask"][:n_valid] = weights[1:n_valid + 1]
    row["segment_ids"][:n_valid] = segments[:n_valid]
    if reset_positions:
        seg = row["segment_ids"]
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        run_start = np.repeat(starts, np.diff(np.r_[starts, seq_len]))
        row["positions"] = (np.arange(seq_len) - run_start).astype(np.int32)
        row["positions"][seg == 0] = 0
    return row


def pad_row(example: Example, seq_len: int, *, reset_positions: bool = False
            ) -> dict[str, np.ndarray]:
    """One example per row: its first N + 1 tokens, padded to N."""
    tokens, weights = (a[:seq_len + 1] for a in example)
    return _row(tokens, weights, np.ones(len(tokens), np.int32), seq_len, reset_positions)


def concat_row(get_example: Callable[[int], Example], position: tuple[int, int], seq_len: int,
               *, reset_positions: bool = False) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """The next window of a concatenated example stream, and where the one after starts.

    `position` = (k, offset): the window starts at token `offset` of the stream's k-th example.
    The returned position is N tokens further (the window's last token starts the next one).
    """
    k, offset = position
    need = seq_len + 1
    pieces, weights, segments = [], [], []
    taken, segment = 0, 0
    next_position = position
    while taken < need:
        tokens_l, weights_l = get_example(k)
        piece = slice(offset, min(len(tokens_l), offset + need - taken))
        segment += 1
        pieces.append(tokens_l[piece])
        weights.append(weights_l[piece])
        segments.append(np.full(piece.stop - piece.start, segment, np.int32))
        if taken <= seq_len < taken + piece.stop - piece.start:  # holds window token N
            next_position = (k, piece.start + seq_len - taken)
        taken += piece.stop - piece.start
        k, offset = k + 1, 0
    row = _row(np.concatenate(pieces), np.concatenate(weights), np.concatenate(segments),
               seq_len, reset_positions)
    return row, next_position
