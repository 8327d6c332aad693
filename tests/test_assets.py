"""Offline assets (real package downloads, cached) and the R serialization reader."""

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from longlora_jax.data import assets
from longlora_jax.data.rdata import RDataError, read_lazyload_db, unserialize
from longlora_jax.errors import AssetError
from tests.helpers import REPO_ROOT

# --- a tiny R XDR serializer written from R's serialize.c, to feed the reader ---------------


def _i(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def _flags(sexptype, *, attr=False, tag=False, levels=0):
    return _i(sexptype | attr << 9 | tag << 10 | levels << 12)


def _header():
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8"


def _char(value, encoding="utf-8"):
    if value is None:
        return _flags(9) + _i(-1)
    raw = value.encode(encoding)
    levels = {"utf-8": 1 << 3, "latin-1": 1 << 2}[encoding] if not value.isascii() else 1 << 6
    return _flags(9, levels=levels) + _i(len(raw)) + raw


def _sym(name):
    return _flags(1) + _char(name)


def _pairlist(items):
    """items: (tag bytes or None, value bytes); NILVALUE-terminated."""
    out = b""
    for tag, value in items:
        out += _flags(2, tag=tag is not None) + (tag or b"") + value
    return out + _i(254)


def _strsxp(values, attrs=b""):
    body = _i(len(values)) + b"".join(_char(v, e) for v, e in values)
    return _flags(16, attr=bool(attrs)) + body + attrs


def test_reader_decodes_vectors_attributes_references_and_altrep():
    names = _pairlist([(_sym("names"), _strsxp([("a", "utf-8"), ("b", "utf-8")]))])
    names_again = _pairlist([(_i(1 << 8 | 255), _strsxp([("c", "utf-8"), ("d", "utf-8")]))])
    ints = _flags(13, attr=True) + _i(2, 7, -(2**31)) + names  # c(a=7L, b=NA)
    reals = _flags(14, attr=True) + _i(2) + struct.pack(">2d", 1.5, -2.0) + names_again
    altrep_info = _pairlist([(None, _sym("compact_intseq")), (None, _sym("base")),
                             (None, _flags(13) + _i(1, 13))])
    seq = _i(238) + altrep_info + _flags(14) + _i(3) + struct.pack(">3d", 4, 10, 1) + _i(254)
    strings = _strsxp([("café", "utf-8"), ("naïve", "latin-1"), (None, "utf-8"), ("", "utf-8")])
    stream = _header() + _flags(19) + _i(4) + ints + reals + seq + strings

    out = unserialize(stream)
    ints_obj, reals_obj, seq_obj, str_obj = out.data
    assert ints_obj.named() == {"a": 7, "b": -(2**31)}
    assert reals_obj.named() == {"c": 1.5, "d": -2.0}  # "names" symbol read back by reference
    np.testing.assert_array_equal(seq_obj.data, np.arange(10, 14))
    assert str_obj.data == ["café", "naïve", None, ""]


def test_reader_refuses_what_it_cannot_read():
    with pytest.raises(RDataError, match="truncated"):
        unserialize(_header() + _flags(16) + _i(3))
    with pytest.raises(RDataError, match="unsupported R object type 4"):
        unserialize(_header() + _flags(4) + _i(0))
    with pytest.raises(RDataError, match="only XDR"):
        unserialize(b"A\n" + _i(3))


def test_lazyload_db_with_zlib_and_xz_entries(tmp_path):
    objects = {"first": _strsxp([("line one", "utf-8"), ("line two", "utf-8")]),
               "second": _flags(13) + _i(1, 42)}
    for compressed, pack in [(1, lambda s: _i(len(s)) + zlib.compress(s)),
                             (3, lambda s: _i(len(s)) + b"X" + lzma.compress(s))]:
        rdb, index = b"", []
        for name, body in objects.items():
            entry = pack(_header() + body)
            index.append((name, len(rdb), len(entry)))
            rdb += entry
        variables = _flags(19, attr=True) + _i(len(index)) + b"".join(
            _flags(13) + _i(2, off, n) for _, off, n in index) + _pairlist(
            [(_sym("names"), _strsxp([(name, "utf-8") for name, _, _ in index]))])
        rdx = _flags(19, attr=True) + _i(3) + variables + _flags(19) + _i(0) + (
            _flags(10) + _i(1, compressed)) + _pairlist([(_sym("names"), _strsxp(
                [("variables", "utf-8"), ("references", "utf-8"), ("compressed", "utf-8")]))])
        (tmp_path / "db.rdx").write_bytes(gzip.compress(_header() + rdx))
        (tmp_path / "db.rdb").write_bytes(rdb)
        db = read_lazyload_db(tmp_path / "db.rdx", tmp_path / "db.rdb")
        assert db["first"].data == ["line one", "line two"]
        assert db["second"].data.tolist() == [42]


# --- the real assets -------------------------------------------------------------------------


def test_essays():
    essays = assets.essays()
    assert len(essays) == 49
    names = [e.name for e in essays]
    assert names == sorted(names) and "addiction" in names and "worked" in names
    longest = max(essays, key=lambda e: len(e.text))
    assert longest.name == "worked" and len(longest.text) > 70_000
    assert all(e.text.strip() for e in essays)


def test_books_are_the_six_novels():
    books = assets.books()
    assert [b.name for b in books] == ["Sense & Sensibility", "Pride & Prejudice",
                                       "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"]
    by_title = {b.name: b.text for b in books}
    pride = by_title["Pride & Prejudice"]
    assert "It is a truth universally acknowledged, that a single man in possession" in pride
    assert pride.startswith("PRIDE AND PREJUDICE\n")
    # janeaustenr documents these vectors as 13030 and 16235 lines.
    assert pride.count("\n") == 13030 and by_title["Emma"].count("\n") == 16235
    assert "Emma Woodhouse, handsome, clever, and rich" in by_title["Emma"]


def _mistral_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaTokenizer.from_pretrained(
        str(assets.mistral_tokenizer_model().parent))


def test_mistral_tokenizer_layout_and_book_lengths():
    tok = _mistral_tokenizer()
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.convert_ids_to_tokens(tok.encode("龘", add_special_tokens=False))[-3:] == [
        "<0xE9>", "<0xBE>", "<0x98>"]  # byte fallback for a character not in the vocabulary
    shortest = min(assets.books(), key=lambda book: len(book.text))
    assert shortest.name == "Northanger Abbey"
    assert len(tok.encode(shortest.text, add_special_tokens=False)) > 100_000


@pytest.mark.slow
def test_smollm2_gguf():
    gguf = pytest.importorskip("gguf")
    path = assets.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98362432
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"


# --- cache behaviour -----------------------------------------------------------------------------


def test_interrupted_fetch_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def broken(out, scratch):
        (out / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._cached_dir("thing", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock"]
    (tmp_path / ".thing.tmp-killed").mkdir()  # as left by a process killed mid-fetch

    calls = []

    def good(out, scratch):
        calls.append(1)
        (out / "whole.txt").write_text("whole")

    assert (assets._cached_dir("thing", good) / "whole.txt").read_text() == "whole"
    assert (assets._cached_dir("thing", good) / "whole.txt").read_text() == "whole"
    assert calls == [1]  # fetched once, reused afterwards
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "longlora_jax.assets", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, check=False)


def test_concurrent_fetches_share_one_download(tmp_path):
    env = {assets.CACHE_ENV: str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "longlora_jax.assets", "fetch", "essays"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT, env={**os.environ, **env}) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] == f"essays: {tmp_path / 'essays'}\n"
    assert len(list((tmp_path / "essays").glob("*.txt"))) == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == [".essays.lock", "essays"]


def test_cli_path(tmp_path):
    assets.essays()
    done = _cli("path", "essays")
    assert done.returncode == 0 and done.stdout.strip() == str(assets.cache_dir() / "essays")
    empty = _cli("path", "smollm2", env={assets.CACHE_ENV: str(tmp_path)})
    assert empty.returncode == 1 and "fetch smollm2" in empty.stderr
    assert _cli("fetch", "weights").returncode == 2  # argparse: invalid choice


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_missing_apt_index_is_explained(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    (tmp_path / "apt.conf").write_text(f'Dir::State::Lists "{lists}";\n')
    monkeypatch.setenv("APT_CONFIG", str(tmp_path / "apt.conf"))
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(AssetError, match="run `apt-get update` first") as err:
        assets.books()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "books").exists()


def test_held_out_split_is_deterministic_and_order_free():
    docs = [assets.Document(f"doc{i}", str(i)) for i in range(20)]
    train, held = assets.held_out_split(docs, 3)
    train_r, held_r = assets.held_out_split(docs[::-1], 3)
    assert {d.name for d in held} == {d.name for d in held_r} and len(held) == 3
    assert [d.name for d in train] == [d.name for d in docs if d not in held]
    assert [d.name for d in train_r] == [d.name for d in train][::-1]
    with pytest.raises(ValueError, match="num_eval=20 must be in"):
        assets.held_out_split(docs, 20)
