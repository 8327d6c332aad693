"""LLaMA-2-7B extended to 16k (paper Table 4).

    python -m longlora_jax.train --config configs/llama2_7b_16k.py[:gpu] --workdir W \
        --config.model.base=hf:Llama-2-7b-hf
    python -m longlora_jax.aot --config configs/llama2_7b_16k.py          # its slice: v4-8

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh {"fsdp": 4},
micro-batch 4; "gpu" one 8-GPU node (A100/H100-80GB), mesh {"fsdp": 8},
micro-batch 8. Global batch 64 either way (gradient accumulation).
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    return longlora(
        "llama2-7b", 16_384, variant,
        tpu=Layout({"fsdp": 4}, micro_batch=4, topology="v4-8"),
        gpu=Layout({"fsdp": 8}, micro_batch=8),
    )
