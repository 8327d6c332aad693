"""`python -m longlora_jax.generate --model M --prompt TEXT` (or `--material FILE --question Q`)

Answers with a KV cache and full attention, streaming the text, e.g.

    python -m longlora_jax.generate --model runs/demo --prompt "Who is Anne Elliot?"
    python -m longlora_jax.generate --model runs/demo --material book.txt --question "Summarize"

The keys are documented in `longlora_jax.inference.chat.default_config`. As a library,
`generate(cfg, params, prompt_ids, max_new_tokens=..., temperature=...)` (here, from
`longlora_jax.inference.decode`) decodes token ids with any model's config and weights.
"""

import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.inference.chat import ALIASES, RENAMED, answer, default_config
from longlora_jax.inference.decode import generate


def _run(config) -> int:
    answer(config)
    return 0


COMMAND = Command("generate", __doc__, _run, default_config=default_config, aliases=ALIASES,
                  renamed=RENAMED)

__all__ = ["COMMAND", "generate"]

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
