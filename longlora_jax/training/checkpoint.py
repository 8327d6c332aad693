"""Training checkpoints (orbax) in the run layout of `io.run`: trainable leaves, optimizer
state, data-iterator state and the run's metadata, one directory per step.

The frozen base weights are not in a checkpoint; `meta` names where they come from
(`io.base.BaseSpec`), so every checkpoint is the size of what trains, and the trainable leaves
are an item of their own that evaluation and export restore without the optimizer. Orbax
writes each step into a temporary directory and renames it when complete, so an interrupted
save never looks finished; a checkpoint that is finished but damaged (truncated files) is
skipped with a warning in favour of the one before it.

A save that cannot be written (a full disk, permissions) raises CheckpointError, one line,
after removing its temporary directory: the checkpoints already finished stay as they are
(orbax only deletes old ones, `keep`, after a new one is complete). Before writing, a save
checks that the file system has room for the state's arrays, so a disk that is already full
is reported before anything is written. Asynchronous saves report their failure at the next
save or `wait`, naming the step that failed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from longlora_jax.errors import CheckpointError, first_line
from longlora_jax.io import run
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.parallel.distributed import any_process, is_main_process

# What must match between a checkpoint and the run that resumes it (LlamaConfig fields).
_FINGERPRINT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    "scan_layers", "lora_rank", "lora_targets", "quantize",
)
# Fields added after checkpoints were written without them: their value in those.
_FINGERPRINT_DEFAULTS = {"quantize": "none"}


def fingerprint(cfg: LlamaConfig, mode: str) -> dict[str, Any]:
    """What identifies the shape of a run's trainable state."""
    out = {field: getattr(cfg, field) for field in _FINGERPRINT_FIELDS}
    out["lora_targets"] = list(out["lora_targets"])
    out["mode"] = mode
    return out


def _optimizer_part(state: Any) -> dict[str, Any]:
    """What a TrainState holds besides the trainable leaves."""
    return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}


# tensorstore (under orbax) reports a failed file write as a ValueError carrying the OS error.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def _write_failure(err: Exception) -> str | None:
    """What went wrong, for an error that is a failed write; None for any other error."""
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    found = _TENSORSTORE_OS_ERROR.search(str(err))
    return os.strerror(int(found.group(1))) if found else None


class Checkpointer:
    """Saves and restores training checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int,
                 async_save: bool = True):
        self.every = every
        self.manager = run.checkpoint_manager(workdir, keep=keep, async_save=async_save)
        self.directory = pathlib.Path(self.manager.directory)
        self._pending: int | None = None  # the step an asynchronous save may still be writing
        self._failed = False

    def steps(self) -> list[int]:
        """Finished checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def remove_unfinished(self) -> None:
        """Deletes the temporary directories of saves a killed run left behind (process 0).

        Only for the run that holds the workdir (`training.lock`): nothing else is saving.
        """
        if is_main_process():
            for path in self.directory.glob(f"*{ocp.path.step.TMP_DIR_SUFFIX}*"):
                shutil.rmtree(path)

    def save(self, step: int, state: Any, data_iterator: Any, meta: Mapping[str, Any], *,
             force: bool = False) -> bool:
        """Saves at `step` when due (every `every` steps) or when `force`; True if it saved.

        CheckpointError (one line) when this save or the previous asynchronous one fails.
        """
        if not force and (self.every <= 0 or step % self.every):
            return False
        self.wait()
        if step in self.manager.all_steps():
            return False
        self._check_room(step, state)
        self._pending = step
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(**{
                    run.TRAINABLE: ocp.args.StandardSave(state.trainable),
                    run.OPTIMIZER: ocp.args.StandardSave(_optimizer_part(state)),
                    run.DATA: grain.checkpoint.CheckpointSave(data_iterator),
                    run.META: ocp.args.JsonSave(dict(meta)),
                }),
                force=True,
            )
        except (OSError, ValueError) as err:
            failure = self._failure(step, err)
            if failure is None:
                raise
            raise failure from None
        return saved

    def _kept(self, failed: int) -> str:
        good = [s for s in self.steps() if s != failed]
        return (f"the newest good checkpoint (step {good[-1]}) is kept" if good
                else "no checkpoint had been saved yet")

    def _check_room(self, step: int, state: Any) -> None:
        """CheckpointError before writing when the disk cannot hold the state's arrays."""
        needed = sum(x.nbytes for x in jax.tree.leaves((state.trainable, _optimizer_part(state))))
        free = shutil.disk_usage(self.directory).free
        if any_process(free < needed):
            raise CheckpointError(
                f"not enough space for checkpoint {step} in {self.directory}: it needs about "
                f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; {self._kept(step)}; "
                "free some space and rerun the same command to resume")

    def _failure(self, step: int | None, err: Exception) -> CheckpointError | None:
        """The one-line error of a failed save, its temporary directory removed first; None
        when `err` is not a failed write (a bug: the caller lets it propagate)."""
        reason = _write_failure(err)
        if reason is None:
            return None
        self._failed = True
        self._pending = None
        with contextlib.suppress(OSError, ValueError):  # reported below, with its cause
            self.manager.wait_until_finished()  # let the other writers of this save stop
        if is_main_process() and step is not None:
            for path in self.directory.glob(f"{step}{ocp.path.step.TMP_DIR_SUFFIX}*"):
                shutil.rmtree(path, ignore_errors=True)
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        return CheckpointError(
            f"saving {what} in {self.directory} failed ({reason}); "
            f"{self._kept(step)}; free some space or fix the permissions and rerun the same "
            "command to resume")

    def check_compatible(self, expected: Mapping[str, Any]) -> None:
        """CheckpointError if the newest readable checkpoint's fingerprint differs."""
        found = run.newest_readable_meta(self.manager)
        if found is None:
            return
        _, meta = found
        if "model" not in meta:
            raise CheckpointError(f"{self.directory} holds checkpoints of an older longlora_jax "
                                  "(no model config in their meta); use a new --workdir")
        have = meta.get("fingerprint", {})
        for key, value in expected.items():
            there = have.get(key, _FINGERPRINT_DEFAULTS.get(key))
            if there != value:
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of a different run: {key}="
                    f"{there!r} there, {value!r} here; use a new --workdir"
                )

    def restore_latest(self, abstract_state: Any,
                       data_iterator: Any) -> tuple[Any, int, dict[str, Any]] | None:
        """(state, step, meta) from the newest restorable checkpoint, or None if there is none.

        The data iterator is restored in place. A damaged newest checkpoint is reported and
        the previous one is tried; the damaged one is left on disk for inspection.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    run.TRAINABLE: ocp.args.StandardRestore(abstract_state.trainable),
                    run.OPTIMIZER: ocp.args.StandardRestore(_optimizer_part(abstract_state)),
                    run.DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                    run.META: ocp.args.JsonRestore(),
                }))
            except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({first_line(err)}); falling back to the previous one", flush=True)
                continue
            rest = restored[run.OPTIMIZER]
            state = abstract_state.replace(trainable=restored[run.TRAINABLE], **rest)
            return state, step, restored[run.META]
        return None

    def wait(self) -> None:
        """Blocks until async saves are on disk; CheckpointError (one line) if one failed."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as err:
            failure = self._failure(self._pending, err)
            if failure is None:
                raise
            raise failure from None
        self._pending = None

    def close(self) -> None:
        """Waits for the last save and releases orbax's threads."""
        if self._failed:
            # The failure was reported; orbax raises it again on every wait.
            with contextlib.suppress(OSError, ValueError):
                self.manager.close()
            return
        self.wait()
        self.manager.close()
