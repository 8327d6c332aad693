"""A TFDS builder over local text / JSON-lines files, stored as array_record, read without TF.

`local_text_source(files, kind=..., text_field=..., data_dir=...)` prepares (once per distinct
set of input files, keyed by a fingerprint of their paths, sizes and mtimes) a TFDS dataset with
features {"name": Text, "text": Text} and returns its random-access data source
(`builder.as_data_source`, records of bytes). Text files give one document per file, jsonl
files one per line (`text_field` of each JSON object). Empty documents are dropped.

Files are read as UTF-8. Bytes that do not decode become U+FFFD, and the file is named in a
warning with the share of its bytes replaced; more than `MAX_REPLACED_SHARE` replaced is a
DataError (random, compressed or binary bytes come out well above it, text in a legacy 8-bit
Western encoding such as Latin-1 well below; README, "Reliability"). The check runs when the
files are prepared, i.e. once per distinct set of input files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from longlora_jax.data.assets import file_lock
from longlora_jax.errors import DataError

# The largest share of a file's bytes that may be replaced (not UTF-8) before it is refused.
MAX_REPLACED_SHARE = 0.25
_REPLACEMENT = "\ufffd"


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """The input files of one prepared dataset (the config name is their fingerprint)."""

    files: tuple[str, ...] = ()
    kind: str = "text"  # "text" | "jsonl"
    text_field: str = "text"


class LongloraLocalText(tfds.core.GeneratorBasedBuilder):
    """Documents from local files; one TFDS config per fingerprint of the inputs."""

    VERSION = tfds.core.Version("1.1.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents read from local text / jsonl files.",
            features=tfds.features.FeaturesDict(
                {"name": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, str]]]:
        config: LocalTextConfig = self.builder_config
        for file_index, file in enumerate(config.files):
            for suffix, record in read_documents(file, config.kind, config.text_field):
                yield f"{file_index:08d}{suffix}", record


def read_documents(file: str, kind: str, text_field: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(key suffix, {"name", "text"}) of each non-empty document of one file: the whole file
    ("text") or each line's `text_field` ("jsonl"). DataError (one line) for a line that is
    not a JSON object with that string field, or a file mostly not UTF-8."""
    if kind == "text":
        data = pathlib.Path(file).read_bytes()
        text, replaced = _decode_utf8(data)
        _check_decoded(file, replaced, len(data))
        if text.strip():
            yield "", {"name": file, "text": text}
        return
    replaced = size = 0
    with open(file, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            line, bad = _decode_utf8(raw)
            replaced, size = replaced + bad, size + len(raw)
            if not line.strip():
                continue
            text = _jsonl_text(line, file, line_no, text_field)
            if text.strip():
                yield f":{line_no:010d}", {"name": f"{file}:{line_no}", "text": text}
    _check_decoded(file, replaced, size)


def _decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, number of bytes of `data` replaced by U+FFFD) of a lenient UTF-8 decoding.

    Valid sequences decode to exactly their own bytes, and an encoded U+FFFD already in
    `data` (EF BF BD) always decodes as itself, so the replaced bytes are what is left over.
    """
    text = data.decode("utf-8", errors="replace")
    decoded = len(text.replace(_REPLACEMENT, "").encode("utf-8"))
    return text, len(data) - decoded - 3 * data.count(_REPLACEMENT.encode("utf-8"))


def _check_decoded(file: str, replaced: int, size: int) -> None:
    """Warns about a file with bytes that are not UTF-8; DataError when they are too many."""
    if not replaced:
        return
    share = replaced / size
    if share > MAX_REPLACED_SHARE:
        raise DataError(
            f"{file}: {share:.0%} of its bytes are not UTF-8 (more than "
            f"{MAX_REPLACED_SHARE:.0%} is refused); is it text? Convert it to UTF-8 (e.g. "
            "iconv -f latin1 -t utf-8) or leave it out of data.paths")
    print(f"warning: {file}: {share:.2%} of its bytes ({replaced}) are not UTF-8 and were "
          "replaced by U+FFFD", flush=True)


def _jsonl_text(line: str, file: str, line_no: int, field: str) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise DataError(f"{file}:{line_no} is not valid JSON: {type(err).__name__}: "
                        f"{str(err)[:200]}") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f"{file}:{line_no} has no string field {field!r} (set data.text_field)")
    return record[field]


def _fingerprint(files: Sequence[pathlib.Path], kind: str, text_field: str) -> str:
    digest = hashlib.sha256(f"{kind}\0{text_field}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"\0{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return "h" + digest.hexdigest()[:16]


def local_text_source(
    files: Sequence[pathlib.Path],
    *,
    kind: str,
    text_field: str,
    data_dir: pathlib.Path,
):
    """Random-access source of {"name": bytes, "text": bytes} records over `files`.

    Prepared once into `data_dir` (array_record) under a file lock, so concurrent processes
    share one preparation; later calls only open it.
    """
    if kind not in ("text", "jsonl"):
        raise ValueError(f"kind={kind!r}; valid: text, jsonl")
    config = LocalTextConfig(
        name=_fingerprint(files, kind, text_field),
        description=f"{len(files)} {kind} file(s)",
        files=tuple(str(f.resolve()) for f in files), kind=kind, text_field=text_field)
    data_dir.mkdir(parents=True, exist_ok=True)
    builder = LongloraLocalText(config=config, data_dir=str(data_dir), file_format="array_record")
    with file_lock(data_dir / f".{config.name}.lock"):
        try:
            builder.download_and_prepare()
        except AssertionError as err:  # TFDS refuses to write a split with no examples
            if "No examples" not in str(err):
                raise
            shown = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
            raise DataError(f"no non-empty documents in {len(files)} {kind} file(s): "
                            f"{shown}") from None
    return builder.as_data_source(split="train")
