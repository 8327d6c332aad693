"""The training loop's parts on their own, without a model: stop signals and the non-finite
loss (`training.stop`), the evaluation schedule, step metrics and checkpoint saves
(`training.hooks`), metrics cut back on resume (`training.metrics`) and the summary
(`training.summary`). The whole loop is exercised in test_train.py and test_workdir.py."""

import json
import math
import os
import signal

import pytest

from longlora_jax.training.hooks import EvalSchedule, Evaluations, Saves, StepLog
from longlora_jax.training.metrics import MetricsWriter
from longlora_jax.training.stop import TrainingStopped, check_finite, stop_on_signals
from longlora_jax.training.summary import (
    Segment,
    finished_summary,
    run_summary,
    write_summary,
)


class FakeWriter:
    """MetricsWriter's interface, recording what the parts write and say."""

    def __init__(self):
        self.rows, self.lines, self.bar = [], [], []

    def write(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def say(self, line):
        self.lines.append(line)

    def progress(self, step, postfix):
        self.bar.append((step, dict(postfix)))


# ----------------------------------------------------------------------------- stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sets_the_flag_and_the_handlers_come_back(sig):
    def mine(signum, frame):
        raise AssertionError("not called inside the block")

    previous = signal.signal(signal.SIGINT, mine)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with stop_on_signals() as stop:
            assert not stop.requested()
            os.kill(os.getpid(), sig)
            assert stop.requested() and stop.signal == sig
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_handlers_come_back_when_the_block_raises():
    term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped), stop_on_signals():
        check_finite(math.nan, 3, None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (term, intr)


def test_a_non_finite_loss_stops_and_names_what_was_kept():
    check_finite(2.5, 1, None)
    with pytest.raises(TrainingStopped, match=r"^loss is nan at step 7; stopped without "
                       r"saving, the newest checkpoint \(step 6\) is untouched; lower optim.lr"):
        check_finite(math.nan, 7, 6)
    with pytest.raises(TrainingStopped, match=r"loss is inf at step 1; .*no checkpoint had"):
        check_finite(math.inf, 1, None)


# ----------------------------------------------------------------------------- evaluation


def test_eval_schedule_steps():
    schedule = EvalSchedule(before=True, after=True, every=2, max_steps=5)
    assert schedule.wanted()
    assert schedule.at_start(0) and not schedule.at_start(2)  # a resumed run did it already
    assert [s for s in range(1, 6) if schedule.at_step(s)] == [2, 4]
    assert schedule.at_end(5, stopped=False)
    assert not schedule.at_end(5, stopped=True) and not schedule.at_end(3, stopped=False)
    # The last step is evaluated once, by `after` (and not at all without it).
    assert not EvalSchedule(before=False, after=False, every=5, max_steps=5).at_step(5)
    never = EvalSchedule(before=False, after=False, every=0, max_steps=5)
    assert not never.wanted()
    assert not any(never.at_step(s) for s in range(1, 6))


def test_evaluations_write_rows_and_build_variables_only_when_due():
    writer, built, seen = FakeWriter(), [], []

    def variables():
        built.append(True)
        return "vars"

    def evaluate(v):
        seen.append(v)
        return {"ppl": 2.0 + len(seen), "nll": 0.5, "windows": 3, "tokens": 96.0}

    evals = Evaluations(EvalSchedule(before=True, after=True, every=2, max_steps=4), evaluate,
                        writer)
    assert evals.before(0, variables)["ppl"] == 3.0
    for step in range(1, 5):
        evals.during(step, variables)
    assert evals.after(4, variables, stopped=True) is None
    assert evals.after(4, variables, stopped=False)["ppl"] == 5.0
    assert evals.before(2, variables) is None
    assert len(built) == len(seen) == 3 and seen == ["vars"] * 3
    assert [(step, row["eval_ppl"]) for step, row in writer.rows] == [(0, 3.0), (2, 4.0),
                                                                        (4, 5.0)]
    assert writer.lines == ["eval before training: ppl 3.000 over 3 windows (96 tokens)",
                            "eval after training:  ppl 5.000 over 3 windows"]


# ----------------------------------------------------------------------------- step metrics


def test_step_log_rows_throughput_and_segment_tokens():
    writer, segment = FakeWriter(), Segment(start_step=0)
    log = StepLog(writer, segment, log_every=2, max_steps=5)
    for step in range(1, 6):
        metrics = {"loss": 1.0 / step, "tokens": 100.0}
        log.record(step, metrics)
        assert set(metrics) == {"loss", "tokens"}  # the caller's dict is not changed
    assert [step for step, _ in writer.rows] == [2, 4, 5]  # every log_every and the last
    assert [step for step, _ in writer.bar] == [1, 2, 3, 4, 5]
    assert segment.tokens == 500.0
    assert log.last["loss"] == 0.2 and log.last["step_time"] > 0
    assert log.last["tokens_per_sec"] == pytest.approx(100.0 / log.last["step_time"])
    assert list(writer.rows[-1][1]) == ["loss", "tokens", "tokens_per_sec", "step_time"]


# ----------------------------------------------------------------------------- checkpoints


class FakeCheckpointer:
    """Checkpointer's interface: saves every `every` steps or when forced."""

    def __init__(self, steps, every):
        self._steps, self.every, self.saved, self.waits = list(steps), every, [], 0

    def steps(self):
        return list(self._steps)

    def save(self, step, state, data_iterator, meta, *, force=False):
        if not force and step % self.every:
            return False
        self._steps.append(step)
        self.saved.append((step, meta))
        return True

    def wait(self):
        self.waits += 1


def test_saves_when_due_at_the_end_and_when_stopping_with_the_lineage():
    checkpointer = FakeCheckpointer(steps=[2], every=3)
    earlier = [{"start_step": 0, "end_step": 2}]
    saves = Saves(checkpointer, {"seed": 1}, earlier, max_steps=7)
    assert saves.last_good_step == 2
    segment = Segment(start_step=2)
    for step in (3, 4):
        saves.after_step(step, "state", "data", segment, stopping=False)
    assert [s for s, _ in checkpointer.saved] == [3] and saves.last_good_step == 3
    saves.after_step(5, "state", "data", segment, stopping=True)  # a signal: saved, on disk
    assert saves.last_good_step == 5 and checkpointer.waits == 1
    saves.after_step(7, "state", "data", segment, stopping=False)  # max_steps, not due
    assert [s for s, _ in checkpointer.saved] == [3, 5, 7]
    meta = checkpointer.saved[-1][1]
    assert meta["seed"] == 1
    assert [(s["start_step"], s["end_step"]) for s in meta["segments"]] == [(0, 2), (2, 7)]
    assert earlier == [{"start_step": 0, "end_step": 2}]  # the earlier segments stay as they are


def test_no_checkpoint_yet_is_none():
    assert Saves(FakeCheckpointer([], every=1), {}, [], max_steps=1).last_good_step is None


# ----------------------------------------------------------------------------- metrics, summary


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=4, resume_step=None)
    for step in range(1, 5):
        writer.write(step, {"loss": float(step)})
    writer.close()
    resumed = MetricsWriter(tmp_path, enabled=True, total_steps=4, resume_step=2)
    assert [r["step"] for r in resumed.records()] == [1, 2]
    resumed.close()
    fresh = MetricsWriter(tmp_path, enabled=True, total_steps=4, resume_step=None)
    assert fresh.records() == []
    fresh.close()


def test_summary_covers_every_segment_and_finds_the_first_evaluation(tmp_path, capsys):
    segments = [{"start_step": 0, "end_step": 2, "train_seconds": 1.0, "tokens": 10.0},
                {"start_step": 2, "end_step": 4, "train_seconds": 3.0, "tokens": 30.0}]
    records = [{"step": 0, "eval_ppl": 9.0, "eval_nll": 2.2}, {"step": 1, "loss": 2.0},
               {"step": 4, "eval_ppl": 7.0, "eval_nll": 1.9}]
    summary = run_summary(segments, records, last_metrics={"loss": 1.5, "tokens_per_sec": 10.0})
    assert summary["end_step"] == 4 and summary["tokens_per_sec"] == 10.0
    assert [e["step"] for e in summary["evaluations"]] == [0, 4]
    assert summary["eval_before"] == {"step": 0, "ppl": 9.0, "nll": 2.2}  # an earlier segment
    mine = {"ppl": 8.0, "nll": 2.1}
    assert run_summary(segments, records, eval_before=mine)["eval_before"] == mine

    assert finished_summary(tmp_path, 4, segments) == {"end_step": 4, "segments": segments}
    write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert finished_summary(tmp_path, 4, []) == summary
    assert capsys.readouterr().out == ("summary: steps 0 -> 4 in 4.0 s over 2 segments | "
                                       "final loss 1.5000, 10 tokens/s | eval before: ppl 9.000\n")
