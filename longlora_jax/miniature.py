"""`python -m longlora_jax.miniature --out docs/miniature [--quick]`

The paper in miniature on a CPU, where context matters: a small LLaMA pretrained here at a short
window on text with long-range tasks (needles, repeated passages, variable tracking), extended
4x with position interpolation by each fine-tuning variant (full, LoRA, LoRA+; full, S2, short
attention, S2 with wrap, sinks or a full-attention tail), measured by retrieval accuracy and
perplexity by distance, held-out text and cost (`longlora_jax.experiments.miniature`).
The keys are documented in `longlora_jax.experiments.miniature.default_config`.
"""

import pathlib
import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.experiments.miniature import MINIATURE, QUICK, default_config, run_miniature
from longlora_jax.experiments.miniature_report import rewrite_report


def _run(config) -> int:
    if config.report_only:
        rewrite_report(pathlib.Path(config.out))
        return 0
    run_miniature(config.out, QUICK if config.quick else MINIATURE, workdir=config.workdir)
    return 0


COMMAND = Command("miniature", __doc__, _run, default_config=default_config,
                  required=("out",))

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
