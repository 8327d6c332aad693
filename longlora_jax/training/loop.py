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
"""

from __future__ import annotations

import contextlib
import datetime
import json
import pathlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from longlora_jax.data.eval_data import eval_documents
from longlora_jax.data.pipeline import make_train_iterator
from longlora_jax.errors import ConfigError, UserError
from longlora_jax.evaluation.perplexity import make_eval_fn, perplexity
from longlora_jax.io.base import check_tokenizer, initial_variables, load_tokenizer, run_keys
from longlora_jax.modeling.lora import merge_trees, trainable_summary
from longlora_jax.parallel.distributed import any_process, is_main_process
from longlora_jax.parallel.mesh import make_mesh
from longlora_jax.training.checkpoint import Checkpointer, fingerprint
from longlora_jax.training.config import build_setup, with_epochs_resolved
from longlora_jax.training.lock import hold_workdir
from longlora_jax.training.metrics import MetricsWriter
from longlora_jax.training.step import TrainSetup, init_state


class TrainingStopped(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps (all processes agree)."""

    def __init__(self):
        self.signal: int | None = None

    def handle(self, signum, _frame):
        self.signal = signum

    def requested(self) -> bool:
        return any_process(self.signal is not None)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """SIGTERM/SIGINT set the flag for the block; the previous handlers come back after it."""
    flag = _StopFlag()
    previous = {sig: signal.signal(sig, flag.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _global_batch(setup: TrainSetup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
        for k, v in local.items()
    }


def _replicated_inputs(eval_fn, batch_sharding: NamedSharding):
    """`eval_fn` for host batches that every process holds whole (the evaluation windows):
    each becomes a global array of which every process supplies its own shards."""

    def run(variables, *arrays_bn: np.ndarray):
        arrays = [jax.make_array_from_callback(x.shape, batch_sharding, lambda i, x=x: x[i])
                  for x in arrays_bn]
        return eval_fn(variables, *arrays)

    return run


def _evaluate(config, eval_fn, variables, docs, seq_len) -> dict[str, float]:
    return perplexity(
        eval_fn, variables, docs, seq_len=config.eval.seq_len or seq_len,
        protocol=config.eval.protocol, batch_size=config.eval.batch,
        max_windows=config.eval.max_windows,
    )


class _Segment:
    """This launch's part of the run (a segment): from the step it started at to the newest
    step, its training seconds (compiles included, evaluations before and after not) and
    its tokens. Every checkpoint's meta carries the segments of its lineage."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.tokens = 0.0

    def record(self, step: int) -> dict[str, Any]:
        return {"start_step": self.start_step, "end_step": step, "started": self.started,
                "train_seconds": time.perf_counter() - self.t0, "tokens": self.tokens}


def _run_summary(segments: list[dict[str, Any]], records: list[dict[str, Any]],
                 **extra: Any) -> dict[str, Any]:
    """summary.json: the whole run, all segments of its lineage (the checkpoints' meta) and
    every evaluation in metrics.jsonl."""
    seconds = sum(s["train_seconds"] for s in segments)
    tokens = sum(s["tokens"] for s in segments)
    evaluations = [{"step": r["step"], "ppl": r["eval_ppl"], "nll": r["eval_nll"]}
                   for r in records if "eval_ppl" in r]
    return {"end_step": segments[-1]["end_step"], "train_seconds": seconds, "tokens": tokens,
            "tokens_per_sec": tokens / max(seconds, 1e-9), "segments": segments,
            "evaluations": evaluations, **extra}


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
    workdir.mkdir(parents=True, exist_ok=True)
    with hold_workdir(workdir), contextlib.ExitStack() as stack:
        return _train(config, workdir, stack)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
           stack: contextlib.ExitStack) -> dict[str, Any]:
    is_main = is_main_process()
    mesh = make_mesh(dict(config.mesh))
    setup, spec, global_batch = build_setup(config, mesh)
    cfg, model, seq_len = setup.model.cfg, setup.model, config.seq_len
    tokenizer = load_tokenizer(config.model.tokenizer, spec)
    check_tokenizer(tokenizer, config.model.tokenizer, cfg, spec)
    checkpointer = Checkpointer(workdir, every=config.checkpoint.every,
                                keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    stack.callback(checkpointer.close)
    expected = fingerprint(cfg, config.lora.mode)
    checkpointer.check_compatible(expected)
    checkpointer.remove_unfinished()

    data_iter = make_train_iterator(
        config.data, tokenizer, seq_len=seq_len, global_batch=global_batch,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
    )

    variables = initial_variables(spec, cfg, seed=config.seed, dtype=config.model.frozen_dtype,
                                  shardings=setup.variable_shardings)
    state, frozen = init_state(setup, variables, run_keys(config.seed)["state"])
    del variables
    summary_line, n_trainable, n_total = trainable_summary(
        merge_trees(state.trainable, frozen), setup.labels
    )
    restored = checkpointer.restore_latest(setup.abstract_state, data_iter)
    start_step, segments = 0, []
    if restored is not None:
        state, start_step, restored_meta = restored
        segments = list(restored_meta.get("segments", []))
    if start_step >= config.max_steps:
        # A finished run: leave its metrics and summary as they are.
        print(f"nothing to do: the checkpoint is at step {start_step} and max_steps is "
              f"{config.max_steps}; raise --config.max_steps to train further", flush=True)
        summary_path = workdir / "summary.json"
        if summary_path.exists():
            return json.loads(summary_path.read_text())
        return {"end_step": start_step, "segments": segments}
    writer = MetricsWriter(workdir, enabled=is_main, total_steps=config.max_steps,
                           resume_step=start_step if restored is not None else None)
    stack.callback(writer.close)
    if restored is not None:
        writer.say(f"resumed from checkpoint at step {start_step} in {checkpointer.directory}")
    writer.say(
        f"model {spec} | {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"rope {cfg.rope_scaling.rope_type} x{cfg.rope_scaling.factor or 1} | "
        f"seq_len {seq_len}, attention {cfg.attention_train}"
        + (f" (G={cfg.s2_group(seq_len)})" if cfg.attention_train == "s2" else "")
        + f" | mode {config.lora.mode} | mesh {dict(mesh.shape)}"
    )
    writer.say(summary_line)

    meta = {
        "fingerprint": expected,
        "model": cfg.to_dict(),
        "mode": config.lora.mode,
        "base": str(spec),
        "tokenizer": config.model.tokenizer,
        "seed": config.seed,
        "config": json.loads(config.to_json_best_effort()),
    }
    eval_fn = _replicated_inputs(make_eval_fn(model, mesh, loss_chunk=config.loss_chunk),
                                 setup.batch_sharding)
    wants_eval = config.eval.before or config.eval.after or config.eval.every
    docs = eval_documents(config.data, tokenizer) if wants_eval else []
    extra: dict[str, Any] = {"trainable_params": n_trainable, "total_params": n_total}
    if config.eval.before and start_step == 0:
        result = _evaluate(config, eval_fn, merge_trees(state.trainable, frozen), docs, seq_len)
        extra["eval_before"] = result
        writer.say(f"eval before training: ppl {result['ppl']:.3f} over "
                   f"{result['windows']} windows ({int(result['tokens'])} tokens)")
        writer.write(start_step, {"eval_ppl": result["ppl"], "eval_nll": result["nll"]})

    step = start_step
    segment = _Segment(start_step)
    t_last = segment.t0
    metrics = {}
    last_good_step = checkpointer.steps()[-1] if checkpointer.steps() else None
    with _stop_on_signals() as stop:
        while step < config.max_steps:
            batch = _global_batch(setup, next(data_iter))
            state, metrics = setup.step_fn(state, frozen, batch)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                kept = (f"the newest checkpoint (step {last_good_step}) is untouched"
                        if last_good_step is not None else "no checkpoint had been saved")
                raise TrainingStopped(
                    f"loss is {metrics['loss']} at step {step}; stopped without saving, {kept}; "
                    "lower optim.lr or check the data before resuming"
                )
            now = time.perf_counter()
            metrics["tokens_per_sec"] = metrics["tokens"] / max(now - t_last, 1e-9)
            metrics["step_time"] = now - t_last
            t_last = now
            segment.tokens += metrics["tokens"]
            writer.progress(step, {"loss": metrics["loss"]})
            if step % config.log_every == 0 or step == config.max_steps:
                writer.write(step, metrics)
            if config.eval.every and step % config.eval.every == 0 and step < config.max_steps:
                result = _evaluate(config, eval_fn, merge_trees(state.trainable, frozen), docs,
                                   seq_len)
                writer.write(step, {"eval_ppl": result["ppl"], "eval_nll": result["nll"]})
            interrupted = stop.requested()
            lineage = {**meta, "segments": [*segments, segment.record(step)]}
            if checkpointer.save(step, state, data_iter, lineage,
                                 force=interrupted or step == config.max_steps):
                last_good_step = step
            if interrupted:
                checkpointer.wait()
                writer.say(f"stopped by signal {stop.signal} at step {step}; checkpoint saved in "
                           f"{checkpointer.directory}; rerun the same command to resume")
                extra["interrupted_at"] = step
                break
    segments.append(segment.record(step))
    extra["last_metrics"] = metrics
    if config.eval.after and step == config.max_steps and "interrupted_at" not in extra:
        result = _evaluate(config, eval_fn, merge_trees(state.trainable, frozen), docs, seq_len)
        extra["eval_after"] = result
        writer.say(f"eval after training:  ppl {result['ppl']:.3f} over "
                   f"{result['windows']} windows")
        writer.write(step, {"eval_ppl": result["ppl"], "eval_nll": result["nll"]})
    checkpointer.wait()  # the summary is written once the last checkpoint is on disk
    summary = _run_summary(segments, writer.records(), **extra)
    before = [e for e in summary["evaluations"] if e["step"] == 0]
    if "eval_before" not in summary and before:  # evaluated by an earlier segment
        summary["eval_before"] = before[0]
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    segments = summary["segments"]
    lines = [f"steps {segments[0]['start_step']} -> {summary['end_step']} in "
             f"{summary['train_seconds']:.1f} s"
             + (f" over {len(segments)} segments" if len(segments) > 1 else "")]
    last = summary.get("last_metrics") or {}
    if last:
        lines.append(f"final loss {last['loss']:.4f}, {last['tokens_per_sec']:.0f} tokens/s")
    for key in ("eval_before", "eval_after"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')}: ppl {summary[key]['ppl']:.3f}")
    print("summary: " + " | ".join(lines), flush=True)
