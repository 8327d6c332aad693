"""Evaluation data: token .bin files, held-out documents, perplexity windows (official eval.py)."""

import numpy as np
import pytest

from longlora_jax.data import (
    ByteTokenizer,
    assets,
    default_data_config,
    eval_documents,
    perplexity_windows,
    read_token_file,
    window_starts,
    write_token_file,
)
from longlora_jax.errors import ConfigError, DataError


def _official_batches(data, seq_length, batch_size, sliding_window=256):
    """The official LongLoRA eval.py `get_as_batch`, in numpy."""
    all_ix = list(range(0, len(data) - seq_length, sliding_window))
    all_ix.pop()
    for idx in range(0, len(all_ix), batch_size):
        ix = all_ix[idx:idx + batch_size]
        x = np.stack([data[i:i + seq_length].astype(np.int64) for i in ix])
        y = np.stack([data[i + 1:i + 1 + seq_length].astype(np.int64) for i in ix])
        yield x, y


@pytest.mark.parametrize("dtype, high", [("uint16", 65535), ("uint32", 2**32 - 1)])
def test_token_files_round_trip(tmp_path, dtype, high):
    tokens = np.array([0, 1, 31999, high], np.int64)
    path = write_token_file(tmp_path / "t.bin", tokens, dtype)
    assert path.stat().st_size == 4 * np.dtype(dtype).itemsize
    # The official eval reads the file with a bare np.memmap.
    np.testing.assert_array_equal(np.memmap(path, dtype=dtype, mode="r"), tokens)
    back = read_token_file(path, dtype)
    assert isinstance(back, np.memmap) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, tokens)


def test_bad_token_files_are_one_line_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.bin").write_bytes(b"")
    for name, message in [("odd.bin", "3 bytes, not a positive multiple of 2"),
                          ("empty.bin", "0 bytes"), ("missing.bin", "does not exist")]:
        with pytest.raises(DataError, match=message):
            read_token_file(tmp_path / name)
    with pytest.raises(DataError, match="do not fit uint16"):
        write_token_file(tmp_path / "big.bin", np.array([70000]))
    with pytest.raises(ConfigError, match="token dtype 'int8'"):
        read_token_file(tmp_path / "odd.bin", "int8")


@pytest.mark.parametrize("num_tokens, seq_len, batch_size", [
    (2000, 256, 3), (1025, 256, 4), (5000, 1024, 2), (700, 128, 1)])
def test_official_windows_match_the_official_eval(num_tokens, seq_len, batch_size):
    data = np.random.default_rng(0).integers(0, 65535, num_tokens).astype(np.uint16)
    ours = list(perplexity_windows(data, seq_len, batch_size=batch_size))
    ref = list(_official_batches(data, seq_len, batch_size))
    assert len(ours) == len(ref)
    for (inputs, targets, mask), (x, y) in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(inputs, x)
        np.testing.assert_array_equal(targets, y)
        assert inputs.dtype == np.int32 and mask.dtype == np.float32
        # HF `model(input_ids=x, labels=x)` scores x[:, 1:], i.e. targets[:, :-1].
        np.testing.assert_array_equal(mask, np.broadcast_to(np.r_[np.ones(seq_len - 1), 0],
                                                             x.shape))


def test_nonoverlapping_windows_predict_every_token_once():
    data = np.arange(1000)
    batches = list(perplexity_windows(data, 100, protocol="nonoverlap", batch_size=4,
                                      pad_batches=True))
    inputs = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    mask = np.concatenate([b[2] for b in batches])
    assert all(b[0].shape == (4, 100) for b in batches)
    scored = targets[mask > 0]
    np.testing.assert_array_equal(scored, np.arange(1, 901))  # 9 windows of 100 need 901 tokens
    np.testing.assert_array_equal(inputs[:9].reshape(-1), np.arange(900))
    assert mask[9:].sum() == 0  # padding rows
    np.testing.assert_array_equal(window_starts(1000, 100, protocol="nonoverlap"),
                                  np.arange(0, 900, 100))
    np.testing.assert_array_equal(window_starts(1001, 100, protocol="nonoverlap"),
                                  np.arange(0, 901, 100))


def test_window_errors():
    with pytest.raises(DataError, match="too short for one official window"):
        next(perplexity_windows(np.arange(300), 256))
    with pytest.raises(ConfigError, match="protocol='sliding'"):
        window_starts(1000, 10, protocol="sliding")
    with pytest.raises(ConfigError, match="seq_len=1"):
        window_starts(1000, 1)


def test_eval_documents_are_the_held_out_offline_documents():
    cfg = default_data_config()
    cfg.source, cfg.heldout_essays = "offline_essays", 3
    tok = ByteTokenizer()
    docs = eval_documents(cfg, tok)
    _, held = assets.held_out_split(assets.essays(), 3)
    assert [d.name for d in docs] == [d.name for d in held]
    for doc, ref in zip(docs, held, strict=True):
        np.testing.assert_array_equal(doc.tokens, tok.encode(ref.text))
        assert doc.tokens.dtype == np.int32
    cfg.add_bos = True
    assert eval_documents(cfg, tok, max_docs=1)[0].tokens[0] == tok.bos_token_id
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        eval_documents(cfg)


def test_eval_documents_from_token_files(tmp_path):
    for i in range(2):
        write_token_file(tmp_path / f"{i}.bin", np.arange(10 * (i + 1)), "uint32")
    cfg = default_data_config()
    cfg.source, cfg.paths, cfg.token_dtype = "token_file", (str(tmp_path / "*.bin"),), "uint32"
    docs = eval_documents(cfg)
    assert [len(d.tokens) for d in docs] == [10, 20] and docs[0].name.endswith("0.bin")
    cfg.source = "sft_json"
    with pytest.raises(ConfigError, match=r"data.source='sft_json'"):
        eval_documents(cfg)
