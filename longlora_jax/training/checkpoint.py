"""Training checkpoints (orbax) in the run layout of `io.run`: trainable leaves, optimizer
state, data-iterator state and the run's metadata, one directory per step.

The frozen base weights are not in a checkpoint; `meta` names where they come from
(`io.base.BaseSpec`), so every checkpoint is the size of what trains, and the trainable leaves
are an item of their own that evaluation and export restore without the optimizer. Orbax
writes each step into a temporary directory and renames it when complete, so an interrupted
save never looks finished; a checkpoint that is finished but damaged (a truncated or changed
file, a missing item) is found by its manifest and skipped in favour of the one before it
(Integrity, below).

A save that cannot be written (a full disk, permissions) raises CheckpointError, one line,
after removing its temporary directory: the checkpoints already finished stay as they are
(orbax only deletes old ones, `keep`, after a new one is complete). Before writing, a save
checks that the file system has room for the state's arrays, so a disk that is already full
is reported before anything is written. Asynchronous saves report their failure at the next
save or `wait`, naming the step that failed.

Readers beside the writer (`io.run.load_run`: evaluate, export, a notebook). Orbax makes a
step visible under its final name only when it is complete, and a checkpoint beyond `keep`
is renamed into `checkpoints/deleting/` in one step and deleted from there (at the next save
or `wait`), so a reader lists only finished checkpoints and never one half-deleted; one that
vanishes while it is read is retried once on the next newest (`load_run`).

Integrity. Every checkpoint carries `manifest.json` (`io.manifest`): each file of its four
items with its size and sha256. Process 0 writes it from orbax's writer thread once every
process has written the items and before orbax renames the temporary directory to the step
(orbax's post-finalization hook; the manager is asynchronous for this, and a synchronous
`async_save=False` save waits for it at once), so the manifest is part of completeness: a
checkpoint that has its final name has its manifest, and a kill at any moment leaves either
a temporary directory (deleted at the next launch) or a finished checkpoint with its manifest.
The meta of such a checkpoint also records `MANIFEST_KEY`. The rule when resuming:
- a checkpoint whose manifest holds (sizes, then checksums; every item) is used;
- one whose manifest does not hold (a truncated, changed or missing file, a missing item), or
  that has no manifest although its meta says it was written with one, is not trusted;
- one without a manifest whose meta has no `MANIFEST_KEY` predates manifests: it is used
  without verification, with one warning line (orbax's own read errors still reject it).
The newest trusted checkpoint is resumed from; each newer one that was not trusted is one
warning line on stderr naming the damaged item, and is moved to `checkpoints/rejected/<step>`
(never deleted: it is the user's to inspect or remove), so that the run can write that step
again. When checkpoints exist and none is trusted the run stops with CheckpointError (one
`error:` line, exit status 2) before changing anything. Process 0 verifies and every process
follows its verdict (`any_process`). Verifying reads every byte of the checkpoint once (the
trainable leaves, the optimizer state, the data and meta items) per launch, and writing the
manifest reads the items once more after the save (in the writer thread for asynchronous
saves). Checkpoints of the layout before the trainable leaves and the optimizer were split
(one `state` item) cannot be read: CheckpointError says so.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from longlora_jax.data.pipeline import combine_states
from longlora_jax.errors import CheckpointError, first_line
from longlora_jax.io import manifest, run
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.parallel.distributed import any_process, is_main_process

# What must match between a checkpoint and the run that resumes it (LlamaConfig fields).
_FINGERPRINT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    "scan_layers", "lora_rank", "lora_targets", "quantize", "quantize_skip",
)
# Fields added after checkpoints were written without them: their value in those.
_FINGERPRINT_DEFAULTS = {"quantize": "none", "quantize_skip": []}


def fingerprint(cfg: LlamaConfig, mode: str) -> dict[str, Any]:
    """What identifies the shape of a run's trainable state."""
    out = {field: getattr(cfg, field) for field in _FINGERPRINT_FIELDS}
    out["lora_targets"] = list(out["lora_targets"])
    out["quantize_skip"] = list(out["quantize_skip"])
    out["mode"] = mode
    return out


def _optimizer_part(state: Any) -> dict[str, Any]:
    """What a TrainState holds besides the trainable leaves."""
    return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}


# Where checkpoints that were not trusted are moved when the run resumes from an older one.
REJECTED = "rejected"

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
        self._async = async_save
        self.manager = run.checkpoint_manager(workdir, keep=keep, on_written=self._write_manifest)
        self.directory = pathlib.Path(self.manager.directory)
        self._pending: int | None = None  # the step an asynchronous save may still be writing
        self._failed = False
        self._problems: dict[int, str | None] = {}  # step -> why it is not trusted (None: it is)

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
        self._purge_deleted()

    def _purge_deleted(self) -> None:
        """Deletes the checkpoints orbax moved to `checkpoints/deleting/` (beyond `keep`;
        `io.run.checkpoint_manager`), process 0."""
        if is_main_process() and (self.directory / run.DELETING).is_dir():
            shutil.rmtree(self.directory / run.DELETING)  # orbax makes it again when needed

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
                    run.META: ocp.args.JsonSave({**meta, run.MANIFEST_KEY: manifest.VERSION}),
                }),
                force=True,
            )
        except (OSError, ValueError) as err:
            failure = self._failure(step, err)
            if failure is None:
                raise
            raise failure from None
        if not self._async:
            self.wait()
        return saved

    def _write_manifest(self) -> None:
        """orbax's hook (process 0, its writer thread): the manifest of the save being
        finished, written into its temporary directory before orbax renames it."""
        step = self._pending
        found = list(self.directory.glob(f"{step}{ocp.path.step.TMP_DIR_SUFFIX}*"))
        if step is None or len(found) != 1:
            raise RuntimeError(f"cannot find the temporary directory of checkpoint {step} in "
                               f"{self.directory} to write its manifest (found {found})")
        manifest.write(found[0], run.ITEMS)

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

    def _problem(self, step: int) -> str | None:
        """Why checkpoint `step` is not trusted (`run.checkpoint_problem`), None if it is;
        process 0 verifies, every process gets the verdict. CheckpointError for a layout this
        version cannot read."""
        if step not in self._problems:
            run.check_layout(self.manager, step)
            problem = run.checkpoint_problem(self.manager, step) if is_main_process() else None
            if any_process(problem is not None) and problem is None:
                problem = "it does not verify (process 0 says why)"
            self._problems[step] = problem
        return self._problems[step]

    def check_compatible(self, expected: Mapping[str, Any]) -> None:
        """CheckpointError if the newest trusted checkpoint's fingerprint differs."""
        for step in reversed(self.steps()):
            if self._problem(step) is not None:
                continue
            try:
                meta = run.read_meta(self.manager, step)
            except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                self._problems[step] = f"its meta is unreadable ({first_line(err)})"
                continue
            break
        else:
            return
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
        """(state, step, meta) from the newest trusted checkpoint, or None if there is none.

        Elastic: the arrays are read straight into the shardings of `abstract_state` (this
        run's mesh, whatever mesh wrote them), and the data iterator is restored in place
        from the lane states of every process that saved it (`data.pipeline.combine_states`),
        so the mesh shape, the device count and the process count may all differ from the
        run that wrote the checkpoint; a different global batch resumes at a recomputed data
        position (one warning line). Each newer checkpoint that is not trusted
        (see the module docstring) is one warning line and is moved to `checkpoints/rejected`,
        not deleted. CheckpointError (nothing changed) when checkpoints exist and none is
        trusted.
        """
        rejected: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            problem = self._problem(step)
            if problem is None:
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(**{
                        run.TRAINABLE: ocp.args.StandardRestore(abstract_state.trainable),
                        run.OPTIMIZER: ocp.args.StandardRestore(_optimizer_part(abstract_state)),
                        run.META: ocp.args.JsonRestore(),
                    }))
                    states = run.data_states(self.manager, step)
                except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                    problem = f"it is unreadable ({first_line(err)})"
            if problem is not None:
                rejected.append((step, problem))
                continue
            data_iterator.set_state(combine_states(states))  # DataError: other data settings
            self._set_aside(rejected, step)
            rest = restored[run.OPTIMIZER]
            state = abstract_state.replace(trainable=restored[run.TRAINABLE], **rest)
            return state, step, restored[run.META]
        if rejected:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be trusted: "
                + "; ".join(f"step {step}: {problem}" for step, problem in rejected)
                + "; nothing was deleted or moved: move them away or use a new --workdir")
        return None

    def _set_aside(self, rejected: list[tuple[int, str]], resumed: int) -> None:
        """Moves the checkpoints that were not trusted to `checkpoints/rejected/<step>` (one
        warning line each, process 0), so that the resumed run can save those steps again."""
        if not rejected:
            return
        if is_main_process():
            for step, problem in rejected:
                target = self.directory / REJECTED / str(step)
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / REJECTED / f"{step}.{n}"
                target.parent.mkdir(exist_ok=True)
                os.rename(self.directory / str(step), target)
                print(f"warning: checkpoint {self.directory / str(step)} is not trusted: "
                      f"{problem}; resuming from checkpoint {resumed} instead; this one is moved "
                      f"to {target} (not deleted)", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("longlora_jax checkpoints set aside")
        self.manager.reload()
        for step, _ in rejected:
            self._problems.pop(step, None)

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
        self._purge_deleted()

    def close(self) -> None:
        """Waits for the last save and releases orbax's threads."""
        if self._failed:
            # The failure was reported; orbax raises it again on every wait.
            with contextlib.suppress(OSError, ValueError):
                self.manager.close()
            return
        self.wait()
        self.manager.close()
