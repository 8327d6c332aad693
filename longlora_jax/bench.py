"""`python -m longlora_jax.bench attention|train [--config.KEY=VALUE ...]`

Benchmarks measured side by side in one process, printed as a markdown table (`--json PATH`
also writes them):
  attention   S2-Attn vs full causal attention vs PyTorch's fused SDPA, forward + backward:
              wall time, compiled FLOPs and temporary memory (`benchmarks.attention`).
  train       tokens/s of our LongLoRA train step vs transformers + PEFT on a SmolLM2-shaped
              model (`benchmarks.train_step`).
"""

import sys

from longlora_jax.benchmarks import attention, train_step
from longlora_jax.cli import Command, dispatch

SUBCOMMANDS = {
    "attention": Command("bench attention", attention.__doc__, attention.run,
                         default_config=attention.default_config),
    "train": Command("bench train", train_step.__doc__, train_step.run,
                     default_config=train_step.default_config),
}

if __name__ == "__main__":
    sys.exit(dispatch("bench", __doc__, SUBCOMMANDS))
