"""`train(config)`: one LongLoRA run, started or resumed in `config.workdir`.

0. takes the workdir (`training.lock`: one run per workdir; a second one is refused);
1. builds the run's LlamaConfig (`training.config.model_config`) and the device mesh;
2. loads the frozen base (HF dir / GGUF / offline asset / random preset) straight into its
   shardings and adds fresh LoRA factors;
3. resumes from the newest complete checkpoint in the workdir if there is one, cutting the
   metrics back to its step (`training.metrics`);
4. evaluates held-out perplexity with full attention, trains to `max_steps`, evaluates again;
5. writes WORKDIR/metrics.jsonl, TensorBoard events and WORKDIR/summary.json (the whole run:
   every segment of the checkpoint lineage, each launch that trained part of it).

SIGTERM/SIGINT save a checkpoint at the current step and end the run cleanly (the handlers
are the caller's again afterwards); a non-finite loss stops the run without saving, keeping
the last good checkpoint; a checkpoint that cannot be written (a full disk) stops it with
one line, keeping the newest good checkpoint (`training.checkpoint`). A kill (SIGKILL, a lost
machine) loses the steps after the newest checkpoint; the next launch trains them again, with
the same data and the same results.

`_train` reads as these steps; the parts it calls around each training step (evaluation,
step metrics, checkpoint saves) are `training.hooks`, the stop signals and the non-finite
loss `training.stop`, the segments and summary.json `training.summary`.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from longlora_jax.data.pipeline import make_train_iterator
from longlora_jax.errors import ConfigError
from longlora_jax.io.base import (
    BaseSpec,
    check_tokenizer,
    initial_variables,
    load_tokenizer,
    run_keys,
)
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.lora import merge_trees, trainable_summary
from longlora_jax.parallel.distributed import is_main_process
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.training.checkpoint import Checkpointer, fingerprint
from longlora_jax.training.config import build_setup, with_epochs_resolved
from longlora_jax.training.hooks import Evaluations, Saves, StepLog
from longlora_jax.training.lock import LOCK_FILE, hold_workdir
from longlora_jax.training.metrics import MetricsWriter
from longlora_jax.training.step import TrainSetup, init_state
from longlora_jax.training.stop import TrainingStopped, check_finite, stop_on_signals
from longlora_jax.training.summary import Segment, finished_summary, run_summary, write_summary

__all__ = ["TrainingStopped", "train"]


def _global_batch(setup: TrainSetup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
        for k, v in local.items()
    }


def train(config: ml_collections.ConfigDict,
          workdir: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Runs (or resumes) the training described by `config`; returns the summary.

    workdir: the run directory (default `config.workdir`), a file system path; one run at a
    time (`training.lock`: WorkdirError names the one holding it). `config` is not modified.
    """
    if not (workdir or config.workdir):
        raise ConfigError("workdir is required (--workdir DIR)")
    config = with_epochs_resolved(config)
    where = str(workdir or config.workdir)
    if "://" in where:
        raise ConfigError(f"workdir={where!r} is a URL; train writes to a file system path "
                          "(mount the bucket, e.g. with gcsfuse, and give the mount point)")
    workdir = pathlib.Path(where)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with hold_workdir(workdir), contextlib.ExitStack() as stack:
            return _train(config, workdir, stack)
    except BaseException:
        if created and is_main_process():
            _remove_if_unused(workdir)
        raise


def _remove_if_unused(workdir: pathlib.Path) -> None:
    """Removes a workdir this run created when it failed before writing anything but its
    (released) lock file, so a bad config leaves no empty run directory behind."""
    if {p.name for p in workdir.iterdir()} <= {LOCK_FILE}:
        (workdir / LOCK_FILE).unlink(missing_ok=True)
        workdir.rmdir()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
           stack: contextlib.ExitStack) -> dict[str, Any]:
    # 1. The model, its mesh and step, the tokenizer; the checkpoints of the workdir.
    mesh = make_mesh(dict(config.mesh))
    setup, spec, global_batch = build_setup(config, mesh)
    cfg = setup.model.cfg
    tokenizer = load_tokenizer(config.model.tokenizer, spec)
    check_tokenizer(tokenizer, config.model.tokenizer, cfg, spec)
    checkpointer = Checkpointer(workdir, every=config.checkpoint.every,
                                keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    stack.callback(checkpointer.close)
    expected = fingerprint(cfg, config.lora.mode)
    checkpointer.check_compatible(expected)
    checkpointer.remove_unfinished()

    # 2. The data, the frozen base with fresh LoRA factors.
    data_iter = make_train_iterator(
        config.data, tokenizer, seq_len=config.seq_len, global_batch=global_batch,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
    )
    variables = initial_variables(spec, cfg, seed=config.seed, dtype=config.model.frozen_dtype,
                                  shardings=setup.variable_shardings)
    state, frozen = init_state(setup, variables, run_keys(config.seed)["state"])
    del variables
    params_line, n_trainable, n_total = trainable_summary(
        merge_trees(state.trainable, frozen), setup.labels
    )

    # 3. Resume from the newest complete checkpoint; a finished run is left as it is.
    restored = checkpointer.restore_latest(setup.abstract_state, data_iter)
    start_step, segments = 0, []
    if restored is not None:
        state, start_step, restored_meta = restored
        segments = list(restored_meta.get("segments", []))
    if start_step >= config.max_steps:
        print(f"nothing to do: the checkpoint is at step {start_step} and max_steps is "
              f"{config.max_steps}; raise --config.max_steps to train further", flush=True)
        return finished_summary(workdir, start_step, segments)
    writer = MetricsWriter(workdir, enabled=is_main_process(), total_steps=config.max_steps,
                           resume_step=start_step if restored is not None else None)
    stack.callback(writer.close)
    if restored is not None:
        writer.say(f"resumed from checkpoint at step {start_step} in {checkpointer.directory}")
        if (change := _shape_change(restored_meta.get("devices"), _devices(mesh))) is not None:
            writer.say(change)
    writer.say(_describe(config, cfg, spec, mesh))
    writer.say(params_line)

    # 4. Evaluate, train to max_steps (or a stop), evaluate again.
    evals = Evaluations.for_run(config, setup.model, mesh, setup.batch_sharding, tokenizer,
                                writer)

    def current_variables():  # the current state's full variables, for an evaluation
        return merge_trees(state.trainable, frozen)

    extra: dict[str, Any] = {"trainable_params": n_trainable, "total_params": n_total}
    if (result := evals.before(start_step, current_variables)) is not None:
        extra["eval_before"] = result
    saves = Saves(checkpointer, _lineage_meta(config, cfg, spec, expected, mesh), segments,
                  max_steps=config.max_steps)
    segment = Segment(start_step)
    log = StepLog(writer, segment, log_every=config.log_every, max_steps=config.max_steps)
    step = start_step
    with stop_on_signals() as stop:
        while step < config.max_steps:
            batch = _global_batch(setup, next(data_iter))
            state, metrics = setup.step_fn(state, frozen, batch)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(metrics["loss"], step, saves.last_good_step)
            log.record(step, metrics)
            evals.during(step, current_variables)
            stopping = stop.requested()
            saves.after_step(step, state, data_iter, segment, stopping=stopping)
            if stopping:
                writer.say(f"stopped by signal {stop.signal} at step {step}; checkpoint saved in "
                           f"{checkpointer.directory}; rerun the same command to resume")
                extra["interrupted_at"] = step
                break
    segments.append(segment.record(step))
    extra["last_metrics"] = log.last
    stopped = "interrupted_at" in extra
    if (result := evals.after(step, current_variables, stopped=stopped)) is not None:
        extra["eval_after"] = result

    # 5. metrics.jsonl is written as it goes; summary.json once the last checkpoint is on disk.
    checkpointer.wait()
    summary = run_summary(segments, writer.records(), **extra)
    if is_main_process():
        write_summary(workdir, summary)
    return summary


def _describe(config: ml_collections.ConfigDict, cfg: LlamaConfig, spec: BaseSpec,
              mesh: Mesh) -> str:
    """The run's one-line description: model, attention, LoRA mode, mesh."""
    seq_len = config.seq_len
    return (
        f"model {spec} | {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"rope {cfg.rope_scaling.rope_type} x{cfg.rope_scaling.factor or 1} | "
        f"seq_len {seq_len}, attention {cfg.attention_train}"
        + (f" (G={cfg.s2_group(seq_len)})" if cfg.attention_train == "s2" else "")
        + f" | mode {config.lora.mode} | mesh {dict(mesh.shape)}"
    )


def _devices(mesh: Mesh) -> dict[str, Any]:
    """What a checkpoint records of the devices that wrote it: mesh shape, processes."""
    return {"mesh": dict(mesh.shape), "processes": jax.process_count()}


def _shape_change(before: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """The info line of a resume on other devices than the checkpoint's (`_devices`); None
    when they are the same or the checkpoint predates the record."""
    if before is None or before == now:
        return None

    def shape(d: dict[str, Any]) -> str:
        devices, processes = math.prod(d["mesh"].values()), d["processes"]
        return (" x ".join(f"{axis} {n}" for axis, n in d["mesh"].items())
                + f" ({devices} device{'s' * (devices != 1)}, {processes} "
                f"process{'es' * (processes != 1)})")

    return (f"elastic resume: the checkpoint was written on mesh {shape(before)}, this run has "
            f"{shape(now)}; its arrays were restored into this mesh's shardings")


def _lineage_meta(config: ml_collections.ConfigDict, cfg: LlamaConfig, spec: BaseSpec,
                  expected: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """What every checkpoint of the run records besides its segments: the fingerprint a
    resume must match, the model, the base and tokenizer, the seed, the whole config and
    the devices (`_devices`)."""
    return {
        "devices": _devices(mesh),
        "fingerprint": expected,
        "model": cfg.to_dict(),
        "mode": config.lora.mode,
        "base": str(spec),
        "tokenizer": config.model.tokenizer,
        "seed": config.seed,
        "config": json.loads(config.to_json_best_effort()),
    }
