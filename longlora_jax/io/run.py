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

`load_model(source)` loads any model the commands take: a base ("smollm2", "hf:DIR",
"gguf:FILE", "preset:NAME"; see `io.base`), a base plus a PEFT adapter directory
("hf:DIR+ADAPTER_DIR", e.g. an official LongLoRA LoRA release; see `io.peft`), or a training
workdir (the base plus the trained leaves). LoRA factors stay in the `lora` collection and
are applied on the fly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
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
# The one item of checkpoints written before the trainable leaves and the optimizer were split.
_PRE_SPLIT_ITEM = "state"
_META_FILE = "metadata"  # the file orbax's JsonCheckpointHandler writes in the meta item


def checkpoint_manager(workdir: str | pathlib.Path, *, keep: int | None = None,
                       async_save: bool = False,
                       on_written: Callable[[], None] | None = None) -> ocp.CheckpointManager:
    """The orbax manager of `workdir/checkpoints` with this layout's four items.

    on_written: called by orbax on process 0, in its writer thread, once every process has
    written a save's items and before the temporary directory is renamed to the step (the
    checkpointer writes the manifest there); it makes the manager asynchronous.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save or bool(on_written),
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


def newest_readable_meta(manager: ocp.CheckpointManager, items: Sequence[str] = (META,)
                         ) -> tuple[int, dict[str, Any]] | None:
    """(step, meta) of the newest checkpoint whose `items` verify (`checkpoint_problem`) and
    whose meta reads; each newer one is reported in one warning line and skipped (it stays on
    disk). None when there is no such checkpoint."""
    for step in sorted(manager.all_steps(), reverse=True):
        where = pathlib.Path(manager.directory) / str(step)
        problem = checkpoint_problem(manager, step, items)
        if problem is None:
            try:
                return step, read_meta(manager, step)
            except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
                problem = f"its meta is unreadable ({first_line(err)})"
        warn(f"checkpoint {where} cannot be used: {problem}; using the previous one (this one "
             "is left on disk)")
    return None


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

    quantize: how to store the base (`LlamaConfig.quantize`); None keeps the run's own. A
    quantized base is quantized from the run's `model.frozen_dtype`, as training did, so
    its codes and scales are the ones the run trained on; compute stays in `dtype`.
    """
    workdir = pathlib.Path(workdir)
    manager = checkpoint_manager(workdir)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {workdir / CHECKPOINTS}")
        if step is None:
            found = newest_readable_meta(manager, (TRAINABLE, META))
            if found is None:
                raise CheckpointError(f"no checkpoint in {workdir / CHECKPOINTS} verifies (see "
                                      "the warnings above); nothing was changed")
            step, meta = found
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {workdir / CHECKPOINTS}; "
                                  f"available: {steps}")
        else:
            problem = checkpoint_problem(manager, step, (TRAINABLE, META))
            if problem is not None:
                raise CheckpointError(f"checkpoint {step} in {workdir / CHECKPOINTS} cannot be "
                                      f"used: {problem}")
            meta = read_meta(manager, step)
        if "model" not in meta:
            raise CheckpointError(f"checkpoint {step} in {workdir / CHECKPOINTS} was written by "
                                  "an older longlora_jax (its meta has no model config)")
        cfg = LlamaConfig.from_dict(meta["model"])
        if quantize is not None:
            cfg = cfg.replace(quantize=quantize)
        mesh = single_device_mesh()
        shardings = rules.tree_shardings(mesh, abstract_variables(build_model(cfg)))
        labels, abstract = trainable_abstract(cfg, meta["mode"], shardings)
        trainable = manager.restore(step, args=ocp.args.Composite(
            **{TRAINABLE: ocp.args.StandardRestore(abstract)}))[TRAINABLE]
    finally:
        manager.close()
    base_dtype = dtype
    if cfg.quantize != "none":
        base_dtype = meta.get("config", {}).get("model", {}).get("frozen_dtype", dtype)
    params = load_base_params(BaseSpec.parse(meta["base"]), cfg.replace(dtype=dtype),
                              seed=meta["seed"], dtype=base_dtype,
                              shardings=shardings["params"])
    _, frozen = split_trainable({"params": params}, labels)
    return Run(cfg.replace(dtype=dtype), merge_trees(trainable, frozen), meta, step)


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
