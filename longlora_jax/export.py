"""`python -m longlora_jax.export --workdir W --out O --format merged|peft|gguf [--config.K=V]`

Turns a training run into a merged HF checkpoint (adapters folded in; transformers loads it),
a PEFT LoRA adapter (LoRA+ embeddings and norms as `modules_to_save`) or a GGUF file for
llama.cpp (`O/model.gguf`, `--config.gguf.type=f32|f16|q8_0`), see `longlora_jax.io.export`.
`--workdir` may also name a base model for merged and gguf (`--workdir smollm2 --format gguf`).
The keys are documented in `longlora_jax.io.export.default_config`.
"""

import sys

from longlora_jax.cli import Command, run_command
from longlora_jax.io.export import default_config, export_run


def _run(config) -> int:
    out = export_run(config.workdir, config.out, format=config.format,
                     step=None if config.step < 0 else config.step, mode=config.mode or None,
                     dtype=config.dtype or None, gguf_type=config.gguf.type,
                     overwrite=config.overwrite)
    print(f"wrote {config.format} export of {config.workdir} to {out}")
    return 0


COMMAND = Command("export", __doc__, _run, default_config=default_config,
                  required=("workdir", "out"))

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
