"""Packing: rows against the flat concatenated stream (an independent numpy reference)."""

import numpy as np
import pytest

from longlora_jax.data.packing import concat_row, pad_row


def _examples(seed=0, count=7, eos=2):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = np.r_[rng.integers(3, 100, size=rng.integers(0, 23)), eos].astype(np.int32)
        weights = rng.integers(0, 2, size=len(tokens)).astype(np.float32)
        out.append((tokens, weights))
    return out


@pytest.mark.parametrize("seq_len", [2, 5, 16, 40])
def test_concat_rows_are_stride_n_windows_of_the_stream(seq_len):
    examples = _examples()
    num_rows = 25
    # Reference: concatenate enough passes over the examples, cut windows of N+1 with stride N.
    passes = (num_rows * seq_len + 1) // sum(len(t) for t, _ in examples) + 2
    order = [k % len(examples) for k in range(passes * len(examples))]
    stream = np.concatenate([examples[i][0] for i in order])
    weight_stream = np.concatenate([examples[i][1] for i in order])
    doc_stream = np.concatenate([np.full(len(examples[i][0]), k) for k, i in enumerate(order)])

    position = (0, 0)
    for j in range(num_rows):
        row, position = concat_row(lambda k: examples[k % len(examples)], position, seq_len)
        window = slice(j * seq_len, j * seq_len + seq_len)
        shifted = slice(j * seq_len + 1, j * seq_len + seq_len + 1)
        np.testing.assert_array_equal(row["inputs"], stream[window])
        np.testing.assert_array_equal(row["targets"], stream[shifted])
        np.testing.assert_array_equal(row["loss_mask"], weight_stream[shifted])
        docs = doc_stream[window]
        _, expected_segments = np.unique(docs, return_inverse=True)
        np.testing.assert_array_equal(row["segment_ids"], expected_segments + 1)
        np.testing.assert_array_equal(row["positions"], np.arange(seq_len))
        assert {k: v.dtype for k, v in row.items()} == {
            "inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "segment_ids": np.int32, "positions": np.int32}


def test_concat_row_reset_positions_restart_at_each_document():
    examples = [(np.array([5, 6, 2], np.int32), np.ones(3, np.float32)),
                (np.array([7, 2], np.int32), np.ones(2, np.float32)),
                (np.array([8, 9, 10, 11, 2], np.int32), np.ones(5, np.float32))]
    row, position = concat_row(lambda k: examples[k], (0, 1), 6, reset_positions=True)
    # stream from (0, 1): 6 2 | 7 2 | 8 9 10 ...  -> inputs 6 2 7 2 8 9, target of 9 is 10
    np.testing.assert_array_equal(row["inputs"], [6, 2, 7, 2, 8, 9])
    np.testing.assert_array_equal(row["targets"], [2, 7, 2, 8, 9, 10])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(row["positions"], [0, 1, 0, 1, 0, 1])
    assert position == (2, 2)  # the window's last token (10) starts the next window


def test_pad_row_truncates_to_n_plus_one_and_pads():
    tokens = np.arange(10, 20, dtype=np.int32)
    weights = np.r_[np.zeros(4), np.ones(6)].astype(np.float32)
    long_row = pad_row((tokens, weights), 6)
    np.testing.assert_array_equal(long_row["inputs"], tokens[:6])
    np.testing.assert_array_equal(long_row["targets"], tokens[1:7])
    np.testing.assert_array_equal(long_row["loss_mask"], weights[1:7])
    np.testing.assert_array_equal(long_row["segment_ids"], np.ones(6))

    short_row = pad_row((tokens[:4], weights[:4] + 1), 6, reset_positions=True)
    np.testing.assert_array_equal(short_row["inputs"], [10, 11, 12, 0, 0, 0])
    np.testing.assert_array_equal(short_row["targets"], [11, 12, 13, 0, 0, 0])
    np.testing.assert_array_equal(short_row["loss_mask"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(short_row["segment_ids"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(short_row["positions"], [0, 1, 2, 0, 0, 0])
