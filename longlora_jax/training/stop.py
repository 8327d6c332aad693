"""Why a run stops before `max_steps`: a stop signal, or a loss that is not finite.

`stop_on_signals()` turns SIGTERM/SIGINT into a flag for the block it guards (the caller's
handlers come back after it); the loop checks `StopFlag.requested()` between steps, saves and
ends cleanly. `check_finite` stops the run, without saving, at a NaN or infinite loss.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator

from longlora_jax.errors import UserError
from longlora_jax.parallel.distributed import any_process

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps (all processes agree)."""

    def __init__(self):
        self.signal: int | None = None

    def handle(self, signum, _frame):
        self.signal = signum

    def requested(self) -> bool:
        """True once a stop signal reached any process (every process must call it)."""
        return any_process(self.signal is not None)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGTERM/SIGINT set the flag for the block; the previous handlers come back after it."""
    flag = StopFlag()
    previous = {sig: signal.signal(sig, flag.handle) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_finite(loss: float, step: int, last_good_step: int | None) -> None:
    """TrainingStopped when `loss` (of `step`) is NaN or infinite; the message names the
    newest checkpoint (`last_good_step`, None: none saved), which is left untouched."""
    if math.isfinite(loss):
        return
    kept = (f"the newest checkpoint (step {last_good_step}) is untouched"
            if last_good_step is not None else "no checkpoint had been saved")
    raise TrainingStopped(
        f"loss is {loss} at step {step}; stopped without saving, {kept}; "
        "lower optim.lr or check the data before resuming"
    )
