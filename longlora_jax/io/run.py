"""A training run's directory, read without any training machinery, and the one model loader.

    WORKDIR/checkpoints/<step>/trainable   the trainable leaves (fp32): LoRA factors, and for
                                           LoRA+ the embeddings and norms (all of them: full)
    WORKDIR/checkpoints/<step>/optimizer   optimizer state, step count and dropout key
    WORKDIR/checkpoints/<step>/data        grain iterator state, one JSON file per process
    WORKDIR/checkpoints/<step>/meta        JSON: the model config, the trainable mode, the
                                           base and tokenizer strings, the seed, the run config
    WORKDIR/checkpoints/<step>/manifest.json  every file of the four items, size and sha256
                                           (`io.manifest`; the rules: `training.checkpoint`)

`training.checkpoint` writes them; evaluation, generation and export read a run through
`load_run` here, which restores the trainable leaves alone and rebuilds the frozen base from
what `meta` names: no optimizer is built and its state is never read. Orbax writes each step
into a temporary directory and renames it when complete, so only finished steps are listed.
`load_run` verifies the manifest of the items it reads (trainable, meta) first: the newest
checkpoint that verifies is used, each newer one that does not is one warning line naming the
damaged item, and CheckpointError (one line) when none does or the step asked for does not.
It may run beside the run writing the workdir: checkpoints appear and disappear in one
rename each (`checkpoint_manager`), the one read is held by hard links while it is read
(`held`), and one deleted before it is held is retried once on the next newest.

`load_model(source)` loads any model the commands take: a base ("smollm2", "hf:DIR",
"gguf:FILE", "preset:NAME"; see `io.base`), a base plus a PEFT adapter directory
("hf:DIR+ADAPTER_DIR", e.g. an official LongLoRA LoRA release; see `io.peft`), or a training
workdir (the base plus the trained leaves). LoRA factors stay in the `lora` collection and
are applied on the fly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from longlora_jax.errors import CheckpointError, ConfigError, first_line
from longlora_jax.io import manifest
from longlora_jax.io.base import (
    BaseSpec,
    abstract_variables,
    base_config,
    check_tokenizer,
    is_base_spec,
    load_base_params,
    load_tokenizer,
)
from longlora_jax.io.peft import apply_adapter
from longlora_jax.modeling import quant
from longlora_jax.modeling.config import LlamaConfig, RopeScaling
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.lora import merge_trees, split_trainable, trainable_labels
from longlora_jax.parallel import rules
from longlora_jax.parallel.mesh import single_device_mesh

CHECKPOINTS = "checkpoints"
# `load_model`'s quantize: "auto" (a workdir's own, none for a base) or a scheme.
QUANTIZE = ("auto", *quant.SCHEMES)
TRAINABLE, OPTIMIZER, DATA, META = "trainable", "optimizer", "data", "meta"
ITEMS = (TRAINABLE, OPTIMIZER, DATA, META)
# In the meta of every checkpoint written with a manifest: its manifest's version. A checkpoint
# whose meta has it and that has no manifest.json is damaged; one whose meta lacks it predates
# manifests.
MANIFEST_KEY = "manifest"
# Where orbax moves a checkpoint beyond `checkpoint.keep`, for the writer to delete it there.
DELETING = "deleting"
# Where a reader holds the checkpoint it reads, by hard links (`held`).
READING = "reading"
# The one item of checkpoints written before the trainable leaves and the optimizer were split.
_PRE_SPLIT_ITEM = "state"
_META_FILE = "metadata"  # the file orbax's JsonCheckpointHandler writes in the meta item


def checkpoint_manager(workdir: str | pathlib.Path, *, keep: int | None = None,
                       async_save: bool = False,
                       on_written: Callable[[], None] | None = None) -> ocp.CheckpointManager:
    """The orbax manager of `workdir/checkpoints` with this layout's four items.

    Checkpoints beyond `keep` are renamed into `checkpoints/deleting/` (one atomic rename, so
    a reader never sees a half-deleted step) and deleted from there by the writer
    (`training.checkpoint`).

    on_written: called by orbax on process 0, in its writer thread, once every process has
    written a save's items and before the temporary directory is renamed to the step (the
    checkpointer writes the manifest there); it makes the manager asynchronous.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, todelete_subdir=DELETING,
        enable_async_checkpointing=async_save or bool(on_written),
        async_options=ocp.AsyncOptions(post_finalization_callback=on_written) if on_written
        else None)
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / CHECKPOINTS,
        options=options,
        item_handlers={
            TRAINABLE: ocp.StandardCheckpointHandler(),
            OPTIMIZER: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        },
    )


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The `meta` item of checkpoint `step`."""
    return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def data_states(manager: ocp.CheckpointManager, step: int) -> list[dict[str, Any]]:
    """The data-iterator states of checkpoint `step`, one per process of the run that wrote
    it (grain's handler writes `process_<i>-of-<n>.json` each); read directly, so that a run
    on another number of processes can resume from them. ValueError when some are missing."""
    folder = pathlib.Path(manager.directory) / str(step) / DATA
    files = sorted(folder.glob("process_*-of-*.json"))
    counts = {path.stem.rpartition("-of-")[2] for path in files}
    if not files or len(counts) != 1 or len(files) != int(counts.pop()):
        raise ValueError(f"{folder} does not hold one data state per process "
                         f"({[p.name for p in files]})")
    return [json.loads(path.read_text()) for path in files]


def warn(message: str) -> None:
    """One `warning: ...` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_layout(manager: ocp.CheckpointManager, step: int) -> None:
    """CheckpointError when checkpoint `step` has the layout of checkpoints written before the
    trainable leaves and the optimizer were split (one `state` item): not readable here."""
    step_dir = pathlib.Path(manager.directory) / str(step)
    if (step_dir / _PRE_SPLIT_ITEM).is_dir() and not (step_dir / TRAINABLE).exists():
        raise CheckpointError(
            f"checkpoint {step_dir} was written by an older longlora_jax (one '{_PRE_SPLIT_ITEM}' "
            "item, before the trainable leaves and the optimizer were split) and cannot be read "
            "by this version; use a new --workdir (or the older version to export it)")


def checkpoint_problem(manager: ocp.CheckpointManager, step: int,
                       items: Sequence[str] = ITEMS) -> str | None:
    """Why checkpoint `step` cannot be trusted: its manifest does not hold for `items` (the
    phrase names the damaged item), or it has none although its meta says it was written with
    one; None when it verifies. A checkpoint written before manifests (its meta readable and
    without `MANIFEST_KEY`) is accepted unverified with one warning line. CheckpointError for
    the pre-split layout (`check_layout`)."""
    check_layout(manager, step)
    step_dir = pathlib.Path(manager.directory) / str(step)
    if manifest.exists(step_dir):
        return manifest.verify(step_dir, items)
    try:  # the file itself, not through orbax: process 0 alone may read it (no barriers)
        meta = json.loads((step_dir / META / _META_FILE).read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        return f"it has no {manifest.MANIFEST} and its meta is unreadable ({first_line(err)})"
    if not isinstance(meta, dict) or MANIFEST_KEY in meta:
        return f"its {manifest.MANIFEST} is missing"
    warn(f"checkpoint {step_dir} predates checksum manifests: it is used without verification")
    return None


class Vanished(Exception):
    """Checkpoint `step` was deleted (or moved) while it was being read."""

    def __init__(self, step: int):
        super().__init__(f"checkpoint {step} disappeared while it was read")
        self.step = step


@contextlib.contextmanager
def held(workdir: pathlib.Path, step: int) -> Iterator[pathlib.Path]:
    """A workdir whose `checkpoints/<step>` is checkpoint `step` of `workdir`, held for the
    reader: every file hard-linked into `checkpoints/reading/<id>/checkpoints/<step>` (no
    bytes copied), so the writer deleting it (`checkpoint.keep`) no longer matters once the
    links exist; the links are removed on exit. Where hard links cannot be made (a file
    system without them, a workdir the reader cannot write), `workdir` itself. Vanished when
    the checkpoint disappears before it is held."""
    source = workdir / CHECKPOINTS / str(step)
    root = workdir / CHECKPOINTS / READING / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, root / CHECKPOINTS / str(step), copy_function=os.link)
    except OSError:  # shutil.Error (files that went meanwhile) is an OSError too
        _release(root)
        if not source.is_dir():
            raise Vanished(step) from None
        root = None
    try:
        yield workdir if root is None else root
    finally:
        if root is not None:
            _release(root)


def _release(root: pathlib.Path) -> None:
    """Removes a reader's hard links (`held`), and `checkpoints/reading` when no other reader
    is using it."""
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another reader holds a checkpoint
        root.parent.rmdir()


def _read(workdir: pathlib.Path, step: int, quantize: str | None) -> tuple | str:
    """(step, meta, cfg, labels, shardings, trainable leaves) of checkpoint `step`, held
    (`held`) and verified, or why it cannot be used (`checkpoint_problem`, or an unreadable
    meta). Vanished when it disappears before it is held (or, read in place, before its
    leaves are read)."""
    with held(workdir, step) as where:
        manager = checkpoint_manager(where)
        try:
            in_place = where == workdir
            problem = checkpoint_problem(manager, step, (TRAINABLE, META))
            if problem is None:
                try:
                    meta = read_meta(manager, step)
                except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                    problem = f"its meta is unreadable ({first_line(err)})"
            if problem is not None:
                if in_place and not (workdir / CHECKPOINTS / str(step)).is_dir():
                    raise Vanished(step)
                return problem
            if "model" not in meta:
                raise CheckpointError(f"checkpoint {step} in {workdir / CHECKPOINTS} was written "
                                      "by an older longlora_jax (its meta has no model config)")
            cfg = LlamaConfig.from_dict(meta["model"])
            if quantize is not None:
                cfg = cfg.replace(quantize=quantize)
            shardings = rules.tree_shardings(single_device_mesh(),
                                             abstract_variables(build_model(cfg)))
            labels, abstract = trainable_abstract(cfg, meta["mode"], shardings)
            try:
                trainable = manager.restore(step, args=ocp.args.Composite(
                    **{TRAINABLE: ocp.args.StandardRestore(abstract)}))[TRAINABLE]
            except (ValueError, OSError):
                if in_place and not (workdir / CHECKPOINTS / str(step)).is_dir():
                    raise Vanished(step) from None
                raise
            # Read in place, files opened after its deletion began may not be its own.
            if in_place and not (workdir / CHECKPOINTS / str(step)).is_dir():
                raise Vanished(step)
        finally:
            manager.close()
    return step, meta, cfg, labels, shardings, trainable


def trainable_abstract(cfg: LlamaConfig, mode: str, shardings: Any) -> tuple[Any, Any]:
    """(labels, abstract trainable subtree in fp32 placed by `shardings`) of a run's model."""
    boxed = abstract_variables(build_model(cfg))
    labels = trainable_labels(boxed, mode)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s),
                            nn.unbox(boxed), shardings)
    trainable, _ = split_trainable(abstract, labels)
    return labels, trainable


@dataclasses.dataclass(frozen=True)
class Run:
    """A run read from its workdir: cfg (as trained), variables {"params", "lora"?}, meta."""

    cfg: LlamaConfig
    variables: dict[str, Any]
    meta: dict[str, Any]
    step: int

    @property
    def base(self) -> BaseSpec:
        return BaseSpec.parse(self.meta["base"])

    @property
    def mode(self) -> str:
        return self.meta["mode"]


def load_run(workdir: str | pathlib.Path, *, step: int | None = None,
             dtype: str = "float32", quantize: str | None = None) -> Run:
    """A training run's model on this process's first device (base + trained leaves).

    The frozen base is rebuilt from what the checkpoint's meta names (loaded as `dtype`, or
    re-initialised from the run's seed for a preset); the trainable leaves (fp32) come from
    the checkpoint. `step` defaults to the newest checkpoint whose trainable and meta items
    verify against its manifest (`checkpoint_problem`; each newer one is a warning line).
    CheckpointError when the workdir has no such checkpoint, or `step` does not verify.

    Safe beside a run writing the workdir: only finished checkpoints are listed (orbax
    renames a step into place when it is complete), and the one chosen is held by hard
    links (`held`) before it is verified and read, so the writer deleting it meanwhile
    (`checkpoint.keep`) changes nothing. When it disappears before it is held (or, where
    hard links cannot be made, before it is read), the next newest is read instead, once;
    a second disappearance (or the `step` asked for) is CheckpointError.

    quantize: how to store the base (`LlamaConfig.quantize`); None keeps the run's own. A
    quantized base is quantized from the run's `model.frozen_dtype`, as training did, so
    its codes and scales are the ones the run trained on; compute stays in `dtype`.
    """
    workdir = pathlib.Path(workdir)
    try:
        found = _read_trainable(workdir, step, quantize)
    except Vanished as first:
        if step is not None:
            raise CheckpointError(f"checkpoint {step} in {workdir / CHECKPOINTS} was deleted "
                                  "while it was read (by the run writing there: "
                                  "checkpoint.keep); ask for a newer step") from None
        try:
            found = _read_trainable(workdir, None, quantize, skip=first.step)
        except Vanished as second:
            raise CheckpointError(
                f"checkpoints {first.step} and then {second.step} in {workdir / CHECKPOINTS} "
                "were deleted while they were read (by the run writing there: checkpoint.keep); "
                "read again, or keep more checkpoints (checkpoint.keep)") from None
    step, meta, cfg, labels, shardings, trainable = found
    base_dtype = dtype
    if cfg.quantize != "none":
        base_dtype = meta.get("config", {}).get("model", {}).get("frozen_dtype", dtype)
    params = load_base_params(BaseSpec.parse(meta["base"]), cfg.replace(dtype=dtype),
                              seed=meta["seed"], dtype=base_dtype,
                              shardings=shardings["params"])
    _, frozen = split_trainable({"params": params}, labels)
    return Run(cfg.replace(dtype=dtype), merge_trees(trainable, frozen), meta, step)


def _read_trainable(workdir: pathlib.Path, step: int | None, quantize: str | None, *,
                    skip: int | None = None) -> tuple:
    """`_read` of checkpoint `step`, or (None) of the newest that verifies other than `skip`,
    each newer one that does not being one warning line; for `load_run`. CheckpointError
    when there is none; Vanished as `_read`."""
    folder = workdir / CHECKPOINTS
    manager = checkpoint_manager(workdir)
    try:
        steps = sorted(manager.all_steps())
    finally:
        manager.close()
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {folder}")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {folder}; available: "
                                  f"{steps}")
        found = _read(workdir, step, quantize)
        if isinstance(found, str):
            raise CheckpointError(f"checkpoint {step} in {folder} cannot be used: {found}")
        return found
    for candidate in reversed(steps):
        if candidate == skip:
            continue
        found = _read(workdir, candidate, quantize)
        if not isinstance(found, str):
            return found
        warn(f"checkpoint {folder / str(candidate)} cannot be used: {found}; using the "
             "previous one (this one is left on disk)")
    raise CheckpointError(f"no checkpoint in {folder} verifies (see the warnings above); "
                          "nothing was changed")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """name (for tables and plots), cfg, variables {"params", "lora"?}, tokenizer."""

    name: str
    cfg: LlamaConfig
    variables: dict[str, Any]
    tokenizer: Any


def load_model(source: str, *, rope: RopeScaling | None = None, dtype: str = "float32",
               seed: int = 0, quantize: str = "auto") -> LoadedModel:
    """Loads `source` (see the module docstring) on one device, weights as `dtype`.

    rope: a RoPE scaling to run with instead of the model's own (`modeling.config.parse_rope`;
    None keeps it). quantize: store the base's projections quantized (`quant.SCHEMES`;
    see `LlamaConfig.quantize`) or not ("none"); "auto": a workdir's own (`load_run`), none for
    a base. ConfigError for any other value. Bases are loaded with scanned layers (one
    compiled layer: fast compiles); a preset base is a random init from `seed` with the byte
    tokenizer. CheckpointError for a path that is neither a base nor a workdir with
    checkpoints.
    """
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}; valid: {', '.join(QUANTIZE)}")
    source, plus, adapter = source.partition("+")
    if plus and not is_base_spec(source):
        raise CheckpointError(f"model {source}+{adapter!r}: an adapter goes on a base "
                              "(smollm2 | hf:DIR | gguf:FILE | preset:NAME), e.g. hf:DIR+ADAPTER")
    if is_base_spec(source):
        spec = BaseSpec.parse(source)
        overrides = {"scan_layers": True, "dtype": dtype,
                     "quantize": "none" if quantize == "auto" else quantize}
        if spec.kind == "preset":
            cfg = LlamaConfig.preset(spec.location, **overrides)
            tokenizer = load_tokenizer("bytes", spec)
        else:
            cfg = base_config(spec, overrides)
            tokenizer = load_tokenizer("auto", spec)
        mesh = single_device_mesh()
        shardings = rules.tree_shardings(mesh, abstract_variables(build_model(cfg)))
        params = load_base_params(spec, cfg, seed=seed, dtype=dtype,
                                  shardings=shardings["params"])
        variables, name = {"params": params}, str(spec)
        if plus:
            cfg, variables = apply_adapter(cfg, params, adapter)
            name = f"{spec}+{pathlib.Path(adapter).name}"
        check_tokenizer(tokenizer, "auto", cfg, spec)
        return LoadedModel(name, cfg.with_rope(rope), variables, tokenizer)
    workdir = pathlib.Path(source)
    if not workdir.is_dir():
        raise CheckpointError(
            f"model {source!r} is neither a training workdir nor a base "
            "(smollm2 | hf:DIR | gguf:FILE | preset:NAME)")
    run = load_run(workdir, dtype=dtype, quantize=None if quantize == "auto" else quantize)
    tokenizer = load_tokenizer(run.meta["tokenizer"], run.base)
    check_tokenizer(tokenizer, run.meta["tokenizer"], run.cfg, run.base)
    return LoadedModel(workdir.name, run.cfg.with_rope(rope), run.variables, tokenizer)
