"""The parts the training loop calls around its steps, each testable without a model.

- `EvalSchedule` / `Evaluations`: held-out perplexity before training (step 0 only), every
  `eval.every` steps and after the last step (not after a stop), each a metrics row;
- `StepLog`: a step's throughput and time, the progress bar, a metrics row every `log_every`
  steps and at the last, the segment's tokens;
- `Saves`: a checkpoint when due, at `max_steps` and when stopped, with the run's lineage in
  its meta; remembers the newest good one.

Stop signals and a non-finite loss are `training.stop`; segments and summary.json are
`training.summary`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from longlora_jax.data.eval_data import eval_documents
from longlora_jax.evaluation.perplexity import make_eval_fn, perplexity
from longlora_jax.training.checkpoint import Checkpointer
from longlora_jax.training.metrics import MetricsWriter
from longlora_jax.training.summary import Segment

# The full variables (frozen base and trainable leaves), built only when an evaluation runs.
Variables = Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class EvalSchedule:
    """Which steps evaluate (`config.eval.before/after/every`, `config.max_steps`)."""

    before: bool
    after: bool
    every: int
    max_steps: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> EvalSchedule:
        """The schedule of a training config."""
        return cls(before=bool(config.eval.before), after=bool(config.eval.after),
                   every=int(config.eval.every or 0), max_steps=config.max_steps)

    def wanted(self) -> bool:
        """Whether the run evaluates at all (the evaluation documents are loaded only then)."""
        return self.before or self.after or bool(self.every)

    def at_start(self, start_step: int) -> bool:
        """Before training: a fresh run only (a resumed one evaluated it in its first launch)."""
        return self.before and start_step == 0

    def at_step(self, step: int) -> bool:
        """After training `step`: every `every` steps, the last step left to `at_end`."""
        return bool(self.every) and step % self.every == 0 and step < self.max_steps

    def at_end(self, step: int, *, stopped: bool) -> bool:
        """After the loop: when it reached `max_steps` (not when a signal stopped it)."""
        return self.after and step == self.max_steps and not stopped


def _replicated_inputs(eval_fn, batch_sharding: NamedSharding):
    """`eval_fn` for host batches that every process holds whole (the evaluation windows):
    each becomes a global array of which every process supplies its own shards."""

    def run(variables, *arrays_bn: np.ndarray):
        arrays = [jax.make_array_from_callback(x.shape, batch_sharding, lambda i, x=x: x[i])
                  for x in arrays_bn]
        return eval_fn(variables, *arrays)

    return run


class Evaluations:
    """Runs the evaluations of `schedule`: `evaluate(variables)` is the perplexity result
    (`ppl`, `nll`, `windows`, `tokens`), written as a metrics row (`eval_ppl`, `eval_nll`)
    at its step; the ones before and after training also as a log line."""

    def __init__(self, schedule: EvalSchedule, evaluate: Callable[[Any], dict[str, float]],
                 writer: MetricsWriter):
        self.schedule = schedule
        self._evaluate = evaluate
        self._writer = writer

    @classmethod
    def for_run(cls, config: ml_collections.ConfigDict, model: Any, mesh: Mesh,
                batch_sharding: NamedSharding, tokenizer: Any,
                writer: MetricsWriter) -> Evaluations:
        """Full-attention perplexity on the held-out documents of `config.data` (loaded only
        when the schedule evaluates), with the protocol and sizes of `config.eval`."""
        schedule = EvalSchedule.from_config(config)
        eval_fn = _replicated_inputs(make_eval_fn(model, mesh, loss_chunk=config.loss_chunk),
                                     batch_sharding)
        docs = eval_documents(config.data, tokenizer) if schedule.wanted() else []

        def evaluate(variables):
            return perplexity(
                eval_fn, variables, docs, seq_len=config.eval.seq_len or config.seq_len,
                protocol=config.eval.protocol, batch_size=config.eval.batch,
                max_windows=config.eval.max_windows,
            )

        return cls(schedule, evaluate, writer)

    def _run(self, step: int, variables: Variables) -> dict[str, float]:
        result = self._evaluate(variables())
        self._writer.write(step, {"eval_ppl": result["ppl"], "eval_nll": result["nll"]})
        return result

    def before(self, step: int, variables: Variables) -> dict[str, float] | None:
        """The evaluation before training, if the schedule has one at `step`."""
        if not self.schedule.at_start(step):
            return None
        result = self._run(step, variables)
        self._writer.say(f"eval before training: ppl {result['ppl']:.3f} over "
                         f"{result['windows']} windows ({int(result['tokens'])} tokens)")
        return result

    def during(self, step: int, variables: Variables) -> None:
        """The evaluation after training `step`, if one is due."""
        if self.schedule.at_step(step):
            self._run(step, variables)

    def after(self, step: int, variables: Variables, *,
              stopped: bool) -> dict[str, float] | None:
        """The evaluation after training, if the schedule has one (see `at_end`)."""
        if not self.schedule.at_end(step, stopped=stopped):
            return None
        result = self._run(step, variables)
        self._writer.say(f"eval after training:  ppl {result['ppl']:.3f} over "
                         f"{result['windows']} windows")
        return result


class StepLog:
    """Each trained step's metrics: `tokens_per_sec` and `step_time` (wall time since the
    previous step, or since the segment started) are added, the progress bar shows the loss,
    a metrics row is written every `log_every` steps and at `max_steps`, and the step's
    tokens count towards the segment. `last` is the newest step's metrics."""

    def __init__(self, writer: MetricsWriter, segment: Segment, *, log_every: int,
                 max_steps: int):
        self._writer = writer
        self._segment = segment
        self._log_every = log_every
        self._max_steps = max_steps
        self._t_last = segment.t0
        self.last: dict[str, float] = {}

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs `step`'s metrics (host floats; `loss` and `tokens` among them)."""
        now = time.perf_counter()
        metrics = {**metrics, "tokens_per_sec": metrics["tokens"] / max(now - self._t_last, 1e-9),
                   "step_time": now - self._t_last}
        self._t_last = now
        self._segment.tokens += metrics["tokens"]
        self._writer.progress(step, {"loss": metrics["loss"]})
        if step % self._log_every == 0 or step == self._max_steps:
            self._writer.write(step, metrics)
        self.last = metrics


class Saves:
    """The run's checkpoints: every `checkpoint.every` steps (the Checkpointer's rule), at
    `max_steps` and when the run is stopping; each one's meta is `meta` plus the segments of
    its lineage (`segments` of earlier launches and this one's). `last_good_step` is the
    newest checkpoint known to be written (None: none yet)."""

    def __init__(self, checkpointer: Checkpointer, meta: Mapping[str, Any],
                 segments: list[dict[str, Any]], *, max_steps: int):
        self._checkpointer = checkpointer
        self._meta = meta
        self._segments = segments
        self._max_steps = max_steps
        steps = checkpointer.steps()
        self.last_good_step: int | None = steps[-1] if steps else None

    def after_step(self, step: int, state: Any, data_iterator: Any, segment: Segment, *,
                   stopping: bool) -> None:
        """Saves at `step` when due; when `stopping`, saves and waits until it is on disk.

        CheckpointError (one line) when a save fails (`training.checkpoint`).
        """
        lineage = {**self._meta, "segments": [*self._segments, segment.record(step)]}
        if self._checkpointer.save(step, state, data_iterator, lineage,
                                   force=stopping or step == self._max_steps):
            self.last_good_step = step
        if stopping:
            self._checkpointer.wait()
