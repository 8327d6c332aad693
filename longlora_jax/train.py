"""`python -m longlora_jax.train --config configs/X.py --workdir DIR [--config.a.b=value ...]`

Fine-tunes a LLaMA-family base for a longer context (LongLoRA: S2-Attn + position
interpolation + LoRA+), on one CPU or a TPU pod with the same code (`training.loop.train`).
Run it again on the same workdir to resume from the newest checkpoint. The config's keys are
documented in `longlora_jax.training.config.default_config`.
"""

import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.parallel.distributed import maybe_initialize
from longlora_jax.training.config import ALIASES, RENAMED
from longlora_jax.training.loop import train


def _run(config) -> int:
    maybe_initialize()
    train(config)
    return 0


COMMAND = Command("train", __doc__, _run, aliases=ALIASES, required=("workdir",),
                  renamed=RENAMED)

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
