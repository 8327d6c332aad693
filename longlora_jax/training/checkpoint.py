"""Training checkpoints (orbax) in the run layout of `io.run`: trainable leaves, optimizer
state, data-iterator state and the run's metadata, one directory per step.

The frozen base weights are not in a checkpoint; `meta` names where they come from
(`io.base.BaseSpec`), so every checkpoint is the size of what trains, and the trainable leaves
are an item of their own that evaluation and export restore without the optimizer. Orbax
writes each step into a temporary directory and renames it when complete, so an interrupted
save never looks finished; a checkpoint that is finished but damaged (truncated files) is
skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import orbax.checkpoint as ocp

from longlora_jax.errors import CheckpointError, first_line
from longlora_jax.io import run
from longlora_jax.modeling.config import LlamaConfig

# What must match between a checkpoint and the run that resumes it (LlamaConfig fields).
_FINGERPRINT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    "scan_layers", "lora_rank", "lora_targets",
)


def fingerprint(cfg: LlamaConfig, mode: str) -> dict[str, Any]:
    """What identifies the shape of a run's trainable state."""
    out = {field: getattr(cfg, field) for field in _FINGERPRINT_FIELDS}
    out["lora_targets"] = list(out["lora_targets"])
    out["mode"] = mode
    return out


def _optimizer_part(state: Any) -> dict[str, Any]:
    """What a TrainState holds besides the trainable leaves."""
    return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}


class Checkpointer:
    """Saves and restores training checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int,
                 async_save: bool = True):
        self.every = every
        self.manager = run.checkpoint_manager(workdir, keep=keep, async_save=async_save)
        self.directory = pathlib.Path(self.manager.directory)

    def steps(self) -> list[int]:
        """Finished checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: Mapping[str, Any], *,
             force: bool = False) -> bool:
        """Saves at `step` when due (every `every` steps) or when `force`; True if it saved."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(**{
                run.TRAINABLE: ocp.args.StandardSave(state.trainable),
                run.OPTIMIZER: ocp.args.StandardSave(_optimizer_part(state)),
                run.DATA: grain.checkpoint.CheckpointSave(data_iterator),
                run.META: ocp.args.JsonSave(dict(meta)),
            }),
            force=True,
        )

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
            if have.get(key) != value:
                raise CheckpointError(
                    f"{self.directory} holds checkpoints of a different run: {key}="
                    f"{have.get(key)!r} there, {value!r} here; use a new --workdir"
                )

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
        """(state, step) from the newest restorable checkpoint, or None if there is none.

        The data iterator is restored in place. A damaged newest checkpoint is reported and
        the previous one is tried; the damaged one is left on disk for inspection.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    run.TRAINABLE: ocp.args.StandardRestore(abstract_state.trainable),
                    run.OPTIMIZER: ocp.args.StandardRestore(_optimizer_part(abstract_state)),
                    run.DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                }))
            except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({first_line(err)}); falling back to the previous one", flush=True)
                continue
            rest = restored[run.OPTIMIZER]
            state = abstract_state.replace(trainable=restored[run.TRAINABLE], **rest)
            return state, step
        return None

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
