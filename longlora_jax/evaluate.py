"""`python -m longlora_jax.evaluate --model M [--model M2 ...] [--config.KEY=VALUE ...]`

Perplexity (and passkey retrieval) with full attention at several context lengths, models
and RoPE variants side by side, e.g.

    python -m longlora_jax.evaluate --model smollm2 --model runs/demo --rope base,linear:4 \
        --lengths 2048,4096,8192 --passkey 10 --out eval/

A model is a training workdir (its base plus the trained weights) or a base: smollm2 |
hf:DIR | gguf:FILE | preset:NAME. The keys are documented in
`longlora_jax.evaluation.compare.default_config`; `--config FILE` starts from a file instead.
"""

import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.evaluation.compare import ALIASES, RENAMED, default_config, evaluate


def _run(config) -> int:
    evaluate(config)
    return 0


COMMAND = Command("evaluate", __doc__, _run, default_config=default_config, aliases=ALIASES,
                  renamed=RENAMED)

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
