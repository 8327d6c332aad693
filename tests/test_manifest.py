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


# ------------------------------------------------- the rules of io.run on made-up checkpoints


def _checkpoint(workdir, step, meta, *, with_manifest):
    from longlora_jax.io import run

    step_dir = workdir / run.CHECKPOINTS / str(step)
    for item in run.ITEMS:
        (step_dir / item).mkdir(parents=True)
        (step_dir / item / "payload").write_bytes(b"x" * 64)
    (step_dir / run.META / "metadata").write_text(json.dumps(meta))
    if with_manifest:
        manifest.write(step_dir, run.ITEMS)
    return step_dir


def test_checkpoint_without_manifest_is_trusted_only_if_it_predates_manifests(tmp_path, capsys):
    from longlora_jax.io import run

    _checkpoint(tmp_path, 1, {"seed": 0}, with_manifest=False)  # before manifests
    _checkpoint(tmp_path, 2, {run.MANIFEST_KEY: manifest.VERSION}, with_manifest=False)
    damaged = _checkpoint(tmp_path, 3, {run.MANIFEST_KEY: manifest.VERSION}, with_manifest=True)
    (damaged / run.OPTIMIZER / "payload").write_bytes(b"x" * 63 + b"y")
    manager = run.checkpoint_manager(tmp_path)
    try:
        assert sorted(manager.all_steps()) == [1, 2, 3]
        assert run.checkpoint_problem(manager, 3) == (
            "item 'optimizer' is damaged: file payload fails its sha256 checksum")
        assert run.checkpoint_problem(manager, 3, (run.TRAINABLE, run.META)) is None
        assert run.checkpoint_problem(manager, 2) == "its manifest.json is missing"
        assert capsys.readouterr().err == ""
        assert run.checkpoint_problem(manager, 1) is None
        err = capsys.readouterr().err
        assert err.startswith("warning: checkpoint ") and "predates checksum manifests" in err
        assert err.count("\n") == 1
    finally:
        manager.close()


def test_checkpoints_of_the_pre_split_layout_are_a_clear_error(tmp_path):
    from longlora_jax.errors import CheckpointError
    from longlora_jax.io import run

    step_dir = tmp_path / run.CHECKPOINTS / "3"
    (step_dir / "state").mkdir(parents=True)
    (step_dir / run.META).mkdir()
    (step_dir / run.META / "metadata").write_text("{}")
    with pytest.raises(CheckpointError, match=r"older longlora_jax \(one 'state' item.*cannot "
                       r"be read by this version; use a new --workdir"):
        run.load_run(tmp_path)
