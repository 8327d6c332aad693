"""LLaMA-2-7B extended to 100k (paper Table 4: 100,000 tokens).

    python -m longlora_jax.train --config configs/llama2_7b_100k.py[:gpu] --workdir W \
        --config.model.base=hf:Llama-2-7b-hf
    python -m longlora_jax.aot --config configs/llama2_7b_100k.py          # its slice: v4-8

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh {"sequence": 4},
micro-batch 1; "gpu" one 8-GPU node (A100/H100-80GB), mesh {"fsdp": 2, "sequence": 4},
micro-batch 2. Global batch 64 either way (gradient accumulation).
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    return longlora(
        "llama2-7b", 100_000, variant,
        tpu=Layout({"sequence": 4}, micro_batch=1, topology="v4-8"),
        gpu=Layout({"fsdp": 2, "sequence": 4}, micro_batch=2),
    )
