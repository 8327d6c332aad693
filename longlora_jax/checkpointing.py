"""Training checkpoints (orbax): trainable state, data-iterator state and run metadata.

    WORKDIR/checkpoints/<step>/state   TrainState: trainable leaves, optimizer state, step, rng
    WORKDIR/checkpoints/<step>/data    grain iterator state, one JSON file per process
    WORKDIR/checkpoints/<step>/meta    JSON: model fingerprint, base/tokenizer strings, config

The frozen base weights are not in a checkpoint; `meta` names where they come from
(`pretrained.BaseSpec`), so every checkpoint is the size of what trains. Orbax writes each
step into a temporary directory and renames it when complete, so an interrupted save never
looks finished; a checkpoint that is finished but damaged (truncated files) is skipped with a
warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from longlora_jax import sharding
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.lora import merge_trees, split_trainable
from longlora_jax.pretrained import BaseSpec, initial_variables
from longlora_jax.train_config import build_setup

log = logging.getLogger(__name__)

# What must match between a checkpoint and the run that resumes it (LlamaConfig fields).
_FINGERPRINT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    "scan_layers", "lora_rank", "lora_targets",
)


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint belongs to a different model or trainable mode."""


def fingerprint(cfg: LlamaConfig, mode: str) -> dict[str, Any]:
    """What identifies the shape of a run's trainable state."""
    out = {field: getattr(cfg, field) for field in _FINGERPRINT_FIELDS}
    out["lora_targets"] = list(out["lora_targets"])
    out["mode"] = mode
    return out


class Checkpointer:
    """Saves and restores training checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int,
                 async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

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
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def check_compatible(self, expected: Mapping[str, Any]) -> None:
        """Raises CheckpointMismatchError if the newest readable checkpoint's fingerprint
        differs (an unreadable newest meta is reported, as `restore_latest` does for state)."""
        for step in reversed(self.steps()):
            try:
                found = self.read_meta(step).get("fingerprint", {})
            except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                print(f"warning: metadata of checkpoint {self.directory / str(step)} is "
                      f"unreadable ({_first_line(err)}); checking the previous one", flush=True)
                continue
            break
        else:
            return
        for key, value in expected.items():
            if found.get(key) != value:
                raise CheckpointMismatchError(
                    f"{self.directory} holds checkpoints of a different run: {key}="
                    f"{found.get(key)!r} there, {value!r} here; use a new --workdir"
                )

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
        """(state, step) from the newest restorable checkpoint, or None if there is none.

        The data iterator is restored in place. A damaged newest checkpoint is reported and
        the previous one is tried; the damaged one is left on disk for inspection.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                log.warning("checkpoint at step %d is unreadable (%s); trying the previous one",
                            step, _first_line(err))
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({_first_line(err)}); falling back to the previous one", flush=True)
                continue
            return restored["state"], step
        return None

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the TrainState of checkpoint `step` (e.g. for export or evaluation)."""
        return self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )["state"]

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def restore_for_export(
    workdir: str | pathlib.Path, *, step: int | None = None, dtype: str = "float32"
) -> tuple[LlamaConfig, dict[str, Any], BaseSpec]:
    """(cfg, variables, base) of a training workdir, on one device, for export/evaluation.

    variables = {"params": base with the trained leaves, "lora": trained factors (if any)}:
    the frozen base is rebuilt from what the checkpoint names (loaded as `dtype`, or
    re-initialised from the run's seed for a preset) and the checkpoint's trainable leaves
    (fp32) are put on top. `step` defaults to the newest checkpoint.
    """
    checkpointer = Checkpointer(workdir, every=0, keep=1, async_save=False)
    steps = checkpointer.steps()
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {checkpointer.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                                f"available: {steps}")
    config = ml_collections.ConfigDict(checkpointer.read_meta(step)["config"])
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup, spec, _ = build_setup(config, mesh)
    state = checkpointer.restore_state(step, setup.abstract_state)
    checkpointer.close()
    base = initial_variables(setup, spec, seed=config.seed, seq_len=config.seq_len, dtype=dtype)
    _, frozen = split_trainable(base, setup.labels)
    variables = merge_trees(state.trainable, frozen)
    return setup.model.cfg, variables, spec
