"""The 4-bit group-size experiment of docs/qlora.md (its numbers: group_size.json).

    PYTHONPATH=. python docs/quant_smollm2/group_size.py GROUP SCHEMES   # e.g. 32 int4,nf4

Sets `modeling.quant.GROUP` (input rows per scale; 64 in the library) before anything is
traced, then evaluates SmolLM2 on the held-out text as docs/qlora.md's quality table does;
each run writes runs/quant_group_GROUP/results.json, whose perplexities group_size.json collects.
"""

import sys

import longlora_jax.modeling.quant as quant
from longlora_jax import evaluate
from longlora_jax.cli import run_command

quant.GROUP = int(sys.argv[1])
sys.exit(run_command(evaluate.COMMAND, [
    "--model", "smollm2", "--lengths", "2048", "--quantize", sys.argv[2], "--data",
    "offline_all", "--config.eval.max_windows=8", "--out", f"runs/quant_group_{sys.argv[1]}"]))
