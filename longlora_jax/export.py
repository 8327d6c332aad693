"""`python -m longlora_jax.export --workdir W --out O --format merged|peft [--config.KEY=VALUE]`

Turns a training run into a merged HF checkpoint (adapters folded in; transformers loads it)
or a PEFT LoRA adapter (LoRA+ embeddings and norms as `modules_to_save`), see
`longlora_jax.io.export`. Keys: workdir, out, format, step (-1 = newest), mode (peft: what
trained, "" = the run's own), dtype (merged: storage dtype, "" = the frozen kernels'),
overwrite (replace a non-empty out).
"""

import sys

import ml_collections

from longlora_jax.cli import Command, run_command
from longlora_jax.io.export import export_run


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(workdir="", out="", format="merged", step=-1, mode="",
                                          dtype="", overwrite=False))


def _run(config) -> int:
    out = export_run(config.workdir, config.out, format=config.format,
                     step=None if config.step < 0 else config.step, mode=config.mode or None,
                     dtype=config.dtype or None, overwrite=config.overwrite)
    print(f"wrote {config.format} export of {config.workdir} to {out}")
    return 0


COMMAND = Command("export", __doc__, _run, default_config=default_config,
                  required=("workdir", "out"))

if __name__ == "__main__":
    sys.exit(run_command(COMMAND))
