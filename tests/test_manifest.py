"""Checkpoint manifests on a directory of plain files: written, verified, and each kind of
damage named with its item (tier one: no jax, milliseconds)."""

import json

import pytest

from longlora_jax.io import manifest

ITEMS = ("trainable", "optimizer", "meta")


@pytest.fixture
def step_dir(tmp_path):
    for item in ITEMS:
        (tmp_path / item / "d").mkdir(parents=True)
        (tmp_path / item / "d" / "data0").write_bytes(bytes(range(256)) * 40)
        (tmp_path / item / "_METADATA").write_text(json.dumps({"item": item}))
    manifest.write(tmp_path, ITEMS)
    return tmp_path


def test_written_manifest_lists_every_file_and_verifies(step_dir):
    listed = json.loads((step_dir / manifest.MANIFEST).read_text())
    assert listed["version"] == manifest.VERSION and listed["algorithm"] == "sha256"
    assert sorted(listed["items"]["trainable"]) == ["_METADATA", "d/data0"]
    assert listed["items"]["trainable"]["d/data0"][0] == 256 * 40
    assert manifest.verify(step_dir) is None
    assert manifest.verify(step_dir, ["trainable", "meta"]) is None
    assert not (step_dir / (manifest.MANIFEST + ".tmp")).exists()


def test_truncated_file_is_found_by_size(step_dir):
    data = step_dir / "optimizer" / "d" / "data0"
    data.write_bytes(data.read_bytes()[:100])
    problem = manifest.verify(step_dir)
    assert "item 'optimizer' is damaged" in problem and "d/data0" in problem
    assert "truncated" in problem
    assert manifest.verify(step_dir, ["trainable", "meta"]) is None  # the others hold


def test_flipped_byte_fails_the_checksum(step_dir):
    data = step_dir / "trainable" / "d" / "data0"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    problem = manifest.verify(step_dir)
    assert problem == "item 'trainable' is damaged: file d/data0 fails its sha256 checksum"


def test_missing_item_file_and_manifest(step_dir):
    (step_dir / "meta" / "_METADATA").unlink()
    assert manifest.verify(step_dir) == "item 'meta' is damaged: file _METADATA is missing"
    for path in (step_dir / "optimizer").rglob("*"):
        if path.is_file():
            path.unlink()
    for path in sorted((step_dir / "optimizer").rglob("*"), reverse=True):
        path.rmdir()
    (step_dir / "optimizer").rmdir()
    assert "item 'optimizer' is missing" in manifest.verify(step_dir)
    (step_dir / manifest.MANIFEST).write_text('{"items": ')
    assert "manifest.json is damaged" in manifest.verify(step_dir)
    (step_dir / manifest.MANIFEST).unlink()
    assert not manifest.exists(step_dir)
    assert manifest.verify(step_dir) == "its manifest.json is missing"


def test_unlisted_item_and_extra_files(step_dir):
    (step_dir / "trainable" / "extra").write_text("not listed")  # ignored
    assert manifest.verify(step_dir) is None
    assert manifest.verify(step_dir, ["data"]) == "item 'data' is not in its manifest.json"
    with pytest.raises(FileNotFoundError, match="item 'data' is missing"):
        manifest.write(step_dir, ["data"])
