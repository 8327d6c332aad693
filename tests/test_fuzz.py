"""Hostile files: every reader of a file a user downloads or writes, fed truncated, mutated and
malicious inputs (Hypothesis, derandomized: the same inputs every run).

Each input must end in a clean outcome: read, or refused with one line (a `UserError`, the
class every command turns into `error: ...` and exit status 2). Anything else fails the test:
another exception (an interpreter-level crash of the reader), a read slower than the deadline
(a hang), Python memory beyond `_memory_limit` of the input's size (an allocation the file
cannot justify; tracemalloc sees numpy's buffers too), or code execution (the malicious
pickles would create a file or call a recording `os.system`).

`python -m tests.fuzz_count` runs this module and writes docs/reliability/fuzz.json: the
inputs tried per reader and how each ended (docs/reliability.md quotes it).
"""

import collections
import contextlib
import io
import json
import os
import pathlib
import pickle
import struct
import tempfile
import tracemalloc
import zipfile

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_safetensors

from longlora_jax.data.local_tfds import read_documents
from longlora_jax.data.sft import load_sft_json
from longlora_jax.errors import UserError
from longlora_jax.io.base import BaseSpec, load_tokenizer
from longlora_jax.io.gguf import read_gguf_config
from longlora_jax.io.hf import open_safetensors
from longlora_jax.io.torch_pickle import load_torch_file
from longlora_jax.modeling.config import LlamaConfig

torch = pytest.importorskip("torch")

# Inputs per reader and strategy: the whole module stays well under a minute on one core.
EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=10_000,
                suppress_health_check=list(HealthCheck), print_blob=False,
                phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)
REPORT_ENV = "LONGLORA_FUZZ_REPORT"  # where tests.fuzz_count wants the counts
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _memory_limit(size: int) -> int:
    """Python memory a reader may use for an input of `size` bytes: decoded tensors and
    parsed structures are a small multiple of the file, plus a fixed allowance for the
    reader's own objects (a tokenizer's tables, the zip directory)."""
    return 32 * size + (16 << 20)


def attempt(reader: str, files: dict[str, bytes], read) -> str:
    """Writes `files` into a fresh directory and runs `read(directory)`; returns "read" or
    "refused" (one-line UserError) and counts it; anything else fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        tracemalloc.start()
        try:
            read(folder)
            outcome = "read"
        except UserError as err:
            message = str(err).strip()
            assert message and "\n" not in message, f"{reader}: not one line: {message!r}"
            outcome = "refused"
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        size = sum(map(len, files.values()))
        assert peak <= _memory_limit(size), f"{reader}: {peak} bytes for a {size}-byte input"
    OUTCOMES[reader][outcome] += 1
    return outcome


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if os.environ.get(REPORT_ENV):
        pathlib.Path(os.environ[REPORT_ENV]).write_text(json.dumps(
            {name: dict(counts) for name, counts in sorted(OUTCOMES.items())}, indent=1))


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` truncated, with bytes flipped, with random bytes spliced in, or replaced by
    random bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if kind == "truncate":
        return seed[:draw(st.integers(0, max(len(seed) - 1, 0)))]
    if kind == "random":
        return draw(st.binary(max_size=2 * len(seed)))
    data = bytearray(seed)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        return bytes(data)
    at = draw(st.integers(0, len(data)))
    return bytes(data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:])


# ----------------------------------------------------------------------------- seeds


def _torch_seed() -> bytes:
    out = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16),
                "t": torch.arange(12.0).reshape(3, 4).t()}, out)
    return out.getvalue()


TORCH = _torch_seed()


def _zip_with_pickle(pickled: bytes) -> bytes:
    """TORCH with its data.pkl replaced by `pickled` (the storages kept)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(TORCH)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = pickled if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _data_pkl() -> bytes:
    with zipfile.ZipFile(io.BytesIO(TORCH)) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


PICKLE = _data_pkl()
SAFETENSORS = save_safetensors({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                "b": np.ones(3, np.int8)})


def _gguf_seed() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "m.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64),
                           (writer.add_embedding_length, 8), (writer.add_feed_forward_length, 16),
                           (writer.add_head_count, 2), (writer.add_head_count_kv, 1),
                           (writer.add_layer_norm_rms_eps, 1e-5)):
            add(value)
        writer.add_token_list([f"t{i}" for i in range(16)])
        writer.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
        writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


GGUF = _gguf_seed()
CONFIG = json.dumps({"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "rope_theta": 10000.0,
                     "rope_scaling": {"rope_type": "linear", "factor": 2.0}}).encode()


def _tokenizer_seed() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


TOKENIZER = _tokenizer_seed()
TOKENIZER_CONFIG = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                               "unk_token": "[UNK]"}).encode()
SFT = json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"},
                  {"instruction": "Añadir", "input": "1 + 1", "output": "2 ✓"}]).encode()
JSONL = b'{"text": "first document"}\n\n{"text": "zweites \\u00e9 \xc3\xa9"}\n{"text": "3"}\n'
TEXT = "A document with prose, ünïcödé and 漢字.\n".encode() * 4


# ----------------------------------------------------------------------------- readers


def read_torch(folder):
    load_torch_file(folder / "pytorch_model.bin")


def read_safetensors(folder):
    with contextlib.ExitStack() as stack:
        for tensor in open_safetensors([folder / "model.safetensors"], stack).values():
            np.asarray(tensor[:])


def read_gguf(folder):
    read_gguf_config(folder / "m.gguf")


def read_config(folder):
    LlamaConfig.from_hf(folder)


def read_tokenizer(folder):
    load_tokenizer(f"hf:{folder}", BaseSpec("preset", "tiny")).encode("hello world")


def read_sft(folder):
    load_sft_json(folder / "sft.json")


def read_jsonl(folder):
    list(read_documents(str(folder / "d.jsonl"), "jsonl", "text"))


def read_text(folder):
    list(read_documents(str(folder / "d.txt"), "text", "text"))


def test_seeds_are_read():
    """The unmutated inputs are valid: mutations start from files the readers accept."""
    seeds = [("pytorch_model.bin", TORCH, read_torch),
             ("model.safetensors", SAFETENSORS, read_safetensors), ("m.gguf", GGUF, read_gguf),
             ("config.json", CONFIG, read_config), ("sft.json", SFT, read_sft),
             ("d.jsonl", JSONL, read_jsonl), ("d.txt", TEXT, read_text)]
    for name, data, read in seeds:
        assert attempt("seed", {name: data}, read) == "read", name
    assert attempt("seed", {"tokenizer.json": TOKENIZER,
                            "tokenizer_config.json": TOKENIZER_CONFIG}, read_tokenizer) == "read"


@FUZZ
@given(mutated(TORCH))
def test_torch_file(data):
    attempt("torch .bin (zip)", {"pytorch_model.bin": data}, read_torch)


@FUZZ
@given(mutated(PICKLE))
def test_torch_pickle(data):
    attempt("torch .bin (its pickle)", {"pytorch_model.bin": _zip_with_pickle(data)}, read_torch)


@FUZZ
@given(mutated(SAFETENSORS))
def test_safetensors_file(data):
    attempt("safetensors", {"model.safetensors": data}, read_safetensors)


@FUZZ
@given(mutated(SAFETENSORS[8:8 + struct.unpack("<Q", SAFETENSORS[:8])[0]]))
def test_safetensors_header(header):
    """The JSON header mutated, its length prefix kept right: the checks behind it run."""
    (size,) = struct.unpack("<Q", SAFETENSORS[:8])
    data = struct.pack("<Q", len(header)) + header + SAFETENSORS[8 + size:]
    attempt("safetensors", {"model.safetensors": data}, read_safetensors)


@FUZZ
@given(mutated(GGUF))
def test_gguf(data):
    attempt("gguf", {"m.gguf": data}, read_gguf)


@FUZZ
@given(mutated(CONFIG))
def test_hf_config(data):
    attempt("config.json", {"config.json": data}, read_config)


@settings(FUZZ, max_examples=EXAMPLES // 2)  # transformers' loader is the slow one
@given(mutated(TOKENIZER))
def test_tokenizer_files(data):
    attempt("tokenizer.json", {"tokenizer.json": data, "tokenizer_config.json": TOKENIZER_CONFIG},
            read_tokenizer)


@FUZZ
@given(mutated(SFT))
def test_sft_json(data):
    attempt("SFT json", {"sft.json": data}, read_sft)


@FUZZ
@given(mutated(JSONL))
def test_jsonl(data):
    attempt("jsonl", {"d.jsonl": data}, read_jsonl)


@FUZZ
@given(mutated(TEXT))
def test_text(data):
    attempt("text", {"d.txt": data}, read_text)


# ----------------------------------------------------------------------------- malicious


class _Reduce:
    """Pickles as a call of `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_pickles(marker: pathlib.Path) -> dict[str, bytes]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": pickle.dumps(_Reduce(os.system, f"touch {marker}")),
        "builtins.eval": pickle.dumps(_Reduce(eval, touch)),
        "builtins.exec": pickle.dumps(_Reduce(exec, touch)),
        "nested reduce": pickle.dumps({"w": _Reduce(collections.OrderedDict,
                                                    [("x", _Reduce(eval, touch))])}),
        "getattr chain": pickle.dumps(_Reduce(getattr, _Reduce(__import__, "os"), "system")),
        "huge BINBYTES8": pickle.PROTO + b"\x04" + b"\x8e" + struct.pack("<Q", 1 << 60),
        "deep nesting": b"\x80\x04" + b"]" * 50_000 + b".",
    }


def test_malicious_pickles_run_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    pickles = _malicious_pickles(marker)
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    for name, pickled in pickles.items():
        outcome = attempt("torch .bin (its pickle)", {"pytorch_model.bin":
                                                      _zip_with_pickle(pickled)}, read_torch)
        assert outcome == "refused", name
    assert not calls and not marker.exists()


def _safetensors_with(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 16


MALICIOUS_SAFETENSORS = {
    "header length 2^60": struct.pack("<Q", 1 << 60) + b"{}",
    "tensor of 2^60 bytes": _safetensors_with({"a": {"dtype": "F32", "shape": [1 << 58],
                                                     "data_offsets": [0, 1 << 60]}}),
    "shape product overflow": _safetensors_with({"a": {"dtype": "F32", "shape": [1 << 62, 8],
                                                       "data_offsets": [0, 16]}}),
    "offsets past the end": _safetensors_with({"a": {"dtype": "U8", "shape": [64],
                                                     "data_offsets": [0, 64]}}),
    "overlapping tensors": _safetensors_with({
        "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}),
}


@pytest.mark.parametrize("name", MALICIOUS_SAFETENSORS)
def test_malicious_safetensors_are_refused(name):
    outcome = attempt("safetensors", {"model.safetensors": MALICIOUS_SAFETENSORS[name]},
                      read_safetensors)
    assert outcome == "refused"


def _gguf_header(n_tensors: int, n_kv: int, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


def _gguf_string(text: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text


def _tensor_past_the_end() -> bytes:
    """GGUF with its one tensor's data claimed at an offset far beyond the file."""
    data = bytearray(GGUF)
    name = b"output_norm.weight"
    at = data.index(_gguf_string(name)) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, offset_at, 1 << 40)
    return bytes(data)


MALICIOUS_GGUF = {
    "2^60 tensors": _gguf_header(1 << 60, 0),
    "2^60 metadata entries": _gguf_header(0, 1 << 60),
    "key of length 2^60": _gguf_header(0, 1, _gguf_string(b"k", 1 << 60)),
    "string array of 2^60 entries": _gguf_header(0, 1, _gguf_string(b"general.x")
                                                 + struct.pack("<IIQ", 9, 8, 1 << 60)),
    "tensor past the end of the file": _tensor_past_the_end(),
}


@pytest.mark.parametrize("name", MALICIOUS_GGUF)
def test_malicious_gguf_are_refused(name):
    assert attempt("gguf", {"m.gguf": MALICIOUS_GGUF[name]}, read_gguf) == "refused"


def test_deeply_nested_json_is_refused():
    deep = b"[" * 100_000 + b"]" * 100_000
    for reader, name, read in (("SFT json", "sft.json", read_sft),
                               ("config.json", "config.json", read_config),
                               ("jsonl", "d.jsonl", read_jsonl)):
        assert attempt(reader, {name: deep}, read) == "refused", reader
