"""LLaMA-3-8B extended to 64k (the paper's recipe on a newer base).

    python -m longlora_jax.train --config configs/llama3_8b_64k.py[:gpu] --workdir W \
        --config.model.base=hf:Meta-Llama-3-8B
    python -m longlora_jax.aot --config configs/llama3_8b_64k.py          # its slice: v4-8

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh {"sequence": 4},
micro-batch 1; "gpu" one 8-GPU node (A100/H100-80GB), mesh {"fsdp": 2, "sequence": 4},
micro-batch 2. Global batch 64 either way (gradient accumulation).

The tokenizer is the base's own (tokenizer "auto") with the hf: base.
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    return longlora(
        "llama3-8b", 65_536, variant,
        tpu=Layout({"sequence": 4}, micro_batch=1, topology="v4-8"),
        gpu=Layout({"fsdp": 2, "sequence": 4}, micro_batch=2),
    )
