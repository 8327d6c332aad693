"""The grain training pipeline: determinism, exact resume, per-process sharding, sources."""

import codecs
import json
import pathlib
import re
import time

import numpy as np
import pytest

from longlora_jax.data import (
    ByteTokenizer,
    assets,
    default_data_config,
    make_train_iterator,
    sources,
)
from longlora_jax.data.local_tfds import local_text_source
from longlora_jax.data.pipeline import combine_states
from longlora_jax.errors import ConfigError, DataError
from tests.helpers import run_python

TOK = ByteTokenizer()
DOCS = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta iota kappa", "lambda mu"]


def _cfg(**overrides):
    cfg = default_data_config()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture
def text_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(DOCS):
        (folder / f"d{i}.txt").write_text(text)
    return _cfg(source="text_files", paths=(str(folder),),
                tfds_data_dir=str(tmp_path / "tfds"))


def test_batches_are_deterministic_and_follow_the_seed():
    cfg = _cfg(prefetch=0)
    first = _take(make_train_iterator(cfg, TOK, seq_len=64, global_batch=4, seed=3), 4)
    again = _take(make_train_iterator(cfg, TOK, seq_len=64, global_batch=4, seed=3), 4)
    other = _take(make_train_iterator(cfg, TOK, seq_len=64, global_batch=4, seed=4), 1)
    _assert_same(first, again)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])
    assert first[0]["inputs"].shape == (4, 64)


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("packing", ["concat", "pad"])
def test_resume_from_saved_state_is_exact(prefetch, packing):
    cfg = _cfg(prefetch=prefetch, packing=packing, source="offline_all")
    kwargs = dict(seq_len=96, global_batch=3, seed=0)
    straight = _take(make_train_iterator(cfg, TOK, **kwargs), 7)

    first = make_train_iterator(cfg, TOK, **kwargs)
    _assert_same(_take(first, 4), straight[:4])
    time.sleep(0.2)  # let a prefetch thread run ahead: the state must not follow it
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    _assert_same(_take(first, 3), straight[4:])  # the saving run goes on undisturbed

    resumed = make_train_iterator(cfg, TOK, **kwargs)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), straight[4:])
    resumed.set_state(state)  # rewinding a used iterator works too
    _assert_same(_take(resumed, 1), straight[4:5])


def test_state_of_another_layout_or_dataset_is_refused():
    state = make_train_iterator(_cfg(), TOK, seq_len=32, global_batch=4).get_state()
    half = make_train_iterator(_cfg(), TOK, seq_len=32, global_batch=4, process_index=1,
                               process_count=2)
    with pytest.raises(DataError, match=r"iterator state is for .*'first_lane': 0"):
        half.set_state(half.get_state() | {"first_lane": 0})
    with pytest.raises(DataError, match="seq_len=32, this pipeline has seq_len=64"):
        make_train_iterator(_cfg(), TOK, seq_len=64, global_batch=4).set_state(state)
    for cfg, seed in [(_cfg(source="offline_books"), 0), (_cfg(), 1)]:
        other = make_train_iterator(cfg, TOK, seq_len=32, global_batch=4, seed=seed)
        with pytest.raises(DataError, match="saved with other data settings"):
            other.set_state(state)
    same = make_train_iterator(_cfg(prefetch=0, cache_docs=3), TOK, seq_len=32, global_batch=4)
    same.set_state(state)


def test_states_of_any_process_count_resume_exactly():
    """The lane states two processes saved, combined, resume on 1, 2 and 4 processes."""
    cfg = _cfg(prefetch=0, source="offline_all")
    kwargs = dict(seq_len=48, global_batch=4, seed=2)
    straight = _take(make_train_iterator(cfg, TOK, **kwargs), 5)
    saved = []
    for p in range(2):
        it = make_train_iterator(cfg, TOK, process_index=p, process_count=2, **kwargs)
        _take(it, 3)
        saved.append(json.loads(json.dumps(it.get_state())))
    state = combine_states(saved[::-1])  # in any order
    for count in (1, 2, 4):
        parts = []
        for p in range(count):
            it = make_train_iterator(cfg, TOK, process_index=p, process_count=count, **kwargs)
            it.set_state(state)
            parts.append(_take(it, 2))
        for step in range(2):
            for key, value in straight[3 + step].items():
                together = np.concatenate([part[step][key] for part in parts])
                np.testing.assert_array_equal(together, value, err_msg=(count, key))
    with pytest.raises(DataError, match=r"do not cover one global batch \(lanes \[\(2, 4\)\]"):
        combine_states(saved[1:])


def test_another_global_batch_resumes_where_the_data_stopped(text_files, capsys):
    """4 lanes read positions 0..7 of the example order (pad packing: one example a row);
    on 3 lanes reading resumes at position 8 (lane r reads the positions r mod 3 from there:
    9, 10, 8, then 12, 13, 11), nothing skipped or repeated, one warning."""
    cfg = text_files.copy_and_resolve_references()
    cfg.packing, cfg.prefetch = "pad", 0
    one_by_one = _take(make_train_iterator(cfg, TOK, seq_len=16, global_batch=1), 14)
    four = make_train_iterator(cfg, TOK, seq_len=16, global_batch=4)
    _take(four, 2)
    three = make_train_iterator(cfg, TOK, seq_len=16, global_batch=3)
    capsys.readouterr()
    three.set_state(four.get_state())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: the global batch is 3 but was 4 "
                                                     "when the data position was saved: reading "
                                                     "resumes at example 8"), err
    assert "0 at or after it had been read" in err
    for positions in ([9, 10, 8], [12, 13, 11]):
        rows = next(three)["inputs"]
        for lane, position in enumerate(positions):
            np.testing.assert_array_equal(rows[lane], one_by_one[position]["inputs"][0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    cfg = _cfg(prefetch=0, source="offline_all")
    kwargs = dict(seq_len=48, global_batch=4, seed=1)
    global_batches = _take(make_train_iterator(cfg, TOK, **kwargs), 3)
    slices = [_take(make_train_iterator(cfg, TOK, process_index=p, process_count=process_count,
                                        **kwargs), 3) for p in range(process_count)]
    for step, whole in enumerate(global_batches):
        for key, value in whole.items():
            parts = [slices[p][step][key] for p in range(process_count)]
            assert parts[0].shape == (4 // process_count, 48)
            np.testing.assert_array_equal(np.concatenate(parts), value, err_msg=key)


def test_every_epoch_visits_every_document_once_in_a_new_order(text_files):
    # One document per row (pad packing): row l of batch k is position l + k*B of the order.
    text_files.packing, text_files.prefetch = "pad", 0
    batches = _take(make_train_iterator(text_files, TOK, seq_len=64, global_batch=3, seed=0), 10)
    rows = [row for batch in batches for row in batch["inputs"]]
    texts = [TOK.decode(row[row > 0]) for row in rows]
    epochs = [texts[e * len(DOCS):(e + 1) * len(DOCS)] for e in range(len(rows) // len(DOCS))]
    for epoch in epochs:
        assert sorted(epoch) == sorted(DOCS)
    assert any(epoch != epochs[0] for epoch in epochs[1:])


def test_concat_packing_joins_documents_with_eos(text_files):
    text_files.shuffle, text_files.prefetch = False, 0
    batches = _take(make_train_iterator(text_files, TOK, seq_len=16, global_batch=1), 12)
    stream = np.concatenate([b["inputs"][0] for b in batches] + [batches[-1]["targets"][0, -1:]])
    for b in batches:  # a new segment starts right after every EOS, and only there
        inputs, seg = b["inputs"][0], b["segment_ids"][0]
        np.testing.assert_array_equal(seg[1:] != seg[:-1], inputs[:-1] == TOK.eos_token_id)
        np.testing.assert_array_equal(b["targets"][0, :-1], inputs[1:])
        assert b["loss_mask"].min() == 1.0
    pieces = [TOK.decode(p) for p in np.split(stream, np.flatnonzero(stream == 2) + 1)]
    assert sorted(pieces[:len(DOCS)]) == sorted(DOCS)  # first pass: every document, whole
    assert pieces[len(DOCS):2 * len(DOCS)] == pieces[:len(DOCS)]  # no shuffle: same order


def test_jsonl_documents_come_from_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(DOCS)))
    cfg = _cfg(source="jsonl", paths=(str(path),), text_field="body",
               tfds_data_dir=str(tmp_path / "tfds"))
    docs = sources.documents(cfg)
    assert sorted(docs[i].text for i in range(len(docs))) == sorted(DOCS)
    cfg.text_field = "text"
    with pytest.raises(DataError, match=r"docs.jsonl:1 has no string field 'text'"):
        sources.documents(cfg)


def _replaced_reference(data: bytes) -> int:
    """Bytes that a lenient UTF-8 decoding replaces, counted by the codec's own error calls."""
    spans = []

    def count(err: UnicodeDecodeError):
        spans.append(err.end - err.start)
        return "\ufffd", err.end

    codecs.register_error("test_count_replaced", count)
    data.decode("utf-8", errors="test_count_replaced")
    return sum(spans)


def _warnings(out: str) -> dict[str, tuple[str, int]]:
    found = re.findall(r"warning: (\S+): ([\d.]+%) of its bytes \((\d+)\) are not UTF-8", out)
    return {pathlib.Path(name).name: (share, int(n)) for name, share, n in found}


def test_text_that_is_not_utf8_is_reported_or_refused(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    latin1 = "Déjà vu à la crème brûlée, über naïve façades. " * 20
    (folder / "latin1.txt").write_bytes(latin1.encode("latin-1"))
    # Already UTF-8 replacement characters, a cut multi-byte sequence, an encoded surrogate.
    odd = "ok \ufffd fine ".encode() + "é".encode()[:1] + b" \xed\xa0\x80 end"
    (folder / "odd.txt").write_bytes(odd)
    (folder / "clean.txt").write_text("plain ascii text")
    cfg = _cfg(source="text_files", paths=(str(folder),), tfds_data_dir=str(tmp_path / "tfds"))
    docs = sources.documents(cfg)
    warned = _warnings(capsys.readouterr().out)
    for name, data in (("latin1.txt", latin1.encode("latin-1")), ("odd.txt", odd)):
        replaced = _replaced_reference(data)
        assert warned[name] == (f"{replaced / len(data):.2%}", replaced), name
    assert "clean.txt" not in warned
    texts = [docs[i].text for i in range(len(docs))]
    assert "".join(c if c.isascii() else "\ufffd" for c in latin1) in texts

    lines = [json.dumps({"text": "fine"}).encode(), b'{"text": "caf\xe9 cr\xe8me"}']
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines))
    sources.documents(_cfg(source="jsonl", paths=(str(tmp_path / "docs.jsonl"),),
                           tfds_data_dir=str(tmp_path / "tfds")))
    data = b"\n".join(lines)
    assert _warnings(capsys.readouterr().out)["docs.jsonl"][1] == _replaced_reference(data)

    noise = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    (tmp_path / "noise.bin").write_bytes(noise)
    share = _replaced_reference(noise) / len(noise)
    with pytest.raises(DataError, match=rf"noise.bin: {share:.0%} of its bytes are not UTF-8 "
                       r"\(more than 25% is refused\)"):
        sources.documents(_cfg(source="text_files", paths=(str(tmp_path / "noise.bin"),),
                               tfds_data_dir=str(tmp_path / "tfds")))


def test_local_files_are_read_without_tensorflow(text_files):
    out = run_python(f"""
        import sys, ml_collections
        from longlora_jax.data import ByteTokenizer, default_data_config, make_train_iterator
        cfg = default_data_config()
        cfg.source, cfg.paths = "text_files", {tuple(text_files.paths)!r}
        cfg.tfds_data_dir = {text_files.tfds_data_dir!r}
        batch = next(make_train_iterator(cfg, ByteTokenizer(), seq_len=8, global_batch=2))
        print(batch["inputs"].shape, "tensorflow" in sys.modules)
    """)
    assert out.split()[-1] == "False" and "(2, 8)" in out


def test_tfds_catalog_dataset_is_read_when_prepared(tmp_path):
    files = []
    for i, text in enumerate(DOCS):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text)
    local_text_source(files, kind="text", text_field="text", data_dir=tmp_path)
    (prepared,) = (tmp_path / "longlora_local_text").iterdir()
    cfg = _cfg(source="tfds", tfds_name=f"longlora_local_text/{prepared.name}",
               tfds_split="train", tfds_data_dir=str(tmp_path))
    docs = sources.documents(cfg)
    assert sorted(docs[i].text for i in range(len(docs))) == sorted(DOCS)
    cfg.tfds_split = "test"
    with pytest.raises(DataError, match="tfds_split='test'"):
        sources.documents(cfg)
    cfg.tfds_split, cfg.text_field = "train", "book_text"
    with pytest.raises(DataError, match=r"text_field='book_text' is not a feature.*'text'"):
        sources.documents(cfg)


def test_tfds_catalog_dataset_absent_is_a_clear_error(tmp_path):
    cfg = _cfg(source="tfds", tfds_name="pg19", tfds_split="test", tfds_data_dir=str(tmp_path),
               text_field="book_text")
    with pytest.raises(DataError, match=r"'pg19' is not prepared in .*tfds build pg19") as err:
        make_train_iterator(cfg, TOK, seq_len=8, global_batch=1)
    assert "\n" not in str(err.value)
    cfg.tfds_name = "no_such_dataset_xyz"
    with pytest.raises(DataError, match="not a TFDS catalog dataset"):
        make_train_iterator(cfg, TOK, seq_len=8, global_batch=1)


def test_offline_training_documents_exclude_the_held_out_ones():
    cfg = _cfg(source="offline_all", heldout_essays=4, heldout_books=1)
    train = sources.documents(cfg)
    held = sources.documents(cfg, heldout=True)
    train_names = {train[i].name for i in range(len(train))}
    held_names = {held[i].name for i in range(len(held))}
    assert len(train_names) == 49 - 4 + 6 - 1 and len(held_names) == 5
    assert not train_names & held_names


class _NoEos:
    def encode(self, text):
        return [1, 2]


@pytest.mark.parametrize("overrides, kwargs, error, message", [
    ({"source": "text_files", "paths": ("/no/such/file.txt",)}, {}, DataError,
     "'/no/such/file.txt' does not exist"),
    ({"source": "text_files", "paths": ("/no/such/*.txt",)}, {}, DataError, "matches no file"),
    ({"source": "text_files"}, {}, ConfigError, "needs data.paths"),
    ({"source": "sft_json", "paths": ("/no/such.json",)}, {}, DataError, "does not exist"),
    ({"source": "books"}, {}, ConfigError, "data.source='books'; valid: offline_essays"),
    ({"source": "token_file", "paths": ("x.bin",)}, {}, ConfigError, "data.source='token_file'"),
    ({"packing": "greedy"}, {}, ConfigError, "data.packing='greedy'"),
    ({"source": "offline_books", "heldout_books": 6}, {}, ConfigError,
     r"data.heldout_books=6 must be in \[0, 6\)"),
    ({}, {"seq_len": 1}, ConfigError, "seq_len=1 must be >= 2"),
    ({}, {"global_batch": 3, "process_count": 2}, ConfigError, "multiple of process_count=2"),
    ({}, {"process_index": 2, "process_count": 2}, ConfigError, r"process_index=2 must be in"),
    ({}, {"tokenizer": _NoEos()}, ConfigError, "has no eos_token_id"),
])
def test_bad_input_is_a_one_line_error(tmp_path, overrides, kwargs, error, message):
    cfg = _cfg(**overrides)
    args = {"seq_len": 8, "global_batch": 2, "tokenizer": TOK, **kwargs}
    with pytest.raises(error, match=message) as err:
        make_train_iterator(cfg, args.pop("tokenizer"), **args)
    assert "\n" not in str(err.value)


def test_unknown_config_field_is_refused():
    cfg = default_data_config()
    cfg.unlock()
    cfg.sources = "offline_books"
    with pytest.raises(ConfigError, match=r"unknown data config field\(s\) \['sources'\]"):
        make_train_iterator(cfg, TOK, seq_len=8, global_batch=1)


def test_mistral_tokenizer_on_offline_books():
    transformers = pytest.importorskip("transformers")
    tok = transformers.LlamaTokenizer.from_pretrained(str(assets.mistral_tokenizer_model().parent))
    cfg = _cfg(source="offline_books", prefetch=0)
    batch = next(make_train_iterator(cfg, tok, seq_len=256, global_batch=2))
    assert batch["inputs"].max() < 32000 and batch["inputs"].min() >= 0
    books = " ".join(" ".join(doc.text.split()) for doc in assets.books())
    for row in batch["inputs"]:
        text = " ".join(tok.decode(row[20:200]).split())
        assert text[10:90] in books
