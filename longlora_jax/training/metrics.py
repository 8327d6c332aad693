"""Run metrics: WORKDIR/metrics.jsonl, TensorBoard event files and a terminal progress bar.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool, total_steps: int,
                 initial_step: int = 0):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard")) if enabled else None
        self._bar = tqdm.tqdm(
            total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (numbers) for `step` in metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

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
