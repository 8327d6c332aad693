"""Run metrics: WORKDIR/metrics.jsonl, TensorBoard event files and a terminal progress bar.

metrics.jsonl is the record: one JSON object per logged step (`step`, `time` in seconds
since the epoch, the scalars). TensorBoard (WORKDIR/tensorboard) mirrors it. A run that
resumes from the checkpoint at step S first cuts metrics.jsonl back to the rows of steps
<= S (the steps after S are trained again) and rebuilds the TensorBoard events from what is
kept, so every step appears once, with the values of the run the checkpoints descend from.
A fresh start (no checkpoint) clears both.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import tqdm
from tensorboardX import SummaryWriter

from longlora_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_EVENT_FILES = "events.out.tfevents.*"
_NOT_SCALARS = ("step", "time")


class MetricsWriteError(UserError):
    """metrics.jsonl cannot be written (a full disk, permissions)."""


def read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; lines that do not parse (the torn last line of a killed
    writer) are left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    resume_step: the checkpoint step this run continues from (None: a fresh start); the
    records of later steps are dropped first (see the module docstring).
    """

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool, total_steps: int,
                 resume_step: int | None):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._tb = None
        if enabled:
            kept = [r for r in read_records(self.path)
                    if resume_step is not None and r.get("step", 0) <= resume_step]
            self._rewrite(kept)
            logdir = pathlib.Path(workdir) / TENSORBOARD_DIR
            for old in logdir.glob(_EVENT_FILES):
                old.unlink()
            self._tb = SummaryWriter(str(logdir))
            for record in kept:
                self._mirror(record)
            self._tb.flush()
        self._bar = tqdm.tqdm(
            total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        """metrics.jsonl := `records`, atomically (a kill leaves the old or the new file)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as err:
            raise MetricsWriteError(f"cannot write {self.path}: {err.strerror}") from None

    def _mirror(self, record: Mapping[str, Any]) -> None:
        for key, value in record.items():
            if key not in _NOT_SCALARS:
                self._tb.add_scalar(key, value, record["step"], walltime=record.get("time"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (numbers) for `step` in metrics.jsonl and TensorBoard.

        MetricsWriteError (one line) when metrics.jsonl cannot be appended to.
        """
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(),
                  **{k: float(v) for k, v in scalars.items()}}
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise MetricsWriteError(f"cannot append to {self.path}: {err.strerror}; the "
                                    "newest checkpoint is kept, rerun to resume") from None
        self._mirror(record)
        self._tb.flush()

    def records(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl (this run's lineage; [] on processes other than 0)."""
        return read_records(self.path) if self.enabled else []

    def progress(self, step: int, postfix: Mapping[str, Any]) -> None:
        """Advances the progress bar to `step` and shows `postfix` (e.g. the loss)."""
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def say(self, line: str) -> None:
        """A log line from process 0 that does not break the progress bar."""
        if self.enabled:
            tqdm.tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
