"""`python -m longlora_jax.miniature --out docs/miniature [--quick]`

The paper in miniature on a CPU: a small LLaMA pretrained here at a short context, extended 8x
with position interpolation by each fine-tuning variant (full, LoRA, LoRA+; full, S2 and short
attention), measured on held-out text and for cost (`longlora_jax.experiments.miniature`).
The keys are documented in `longlora_jax.experiments.miniature.default_config`.
"""

import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.experiments.miniature import MINIATURE, QUICK, default_config, run_miniature


def _run(config) -> int:
    run_miniature(config.out, QUICK if config.quick else MINIATURE, workdir=config.workdir)
    return 0


COMMAND = Command("miniature", __doc__, _run, default_config=default_config,
                  required=("out",))

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
