"""LLaMA-2-70B extended to 32k (paper Table 4).

    python -m longlora_jax.train --config configs/llama2_70b_32k.py[:gpu] --workdir W \
        --config.model.base=hf:Llama-2-70b-hf
    python -m longlora_jax.aot --config configs/llama2_70b_32k.py          # its slice: v4-16

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-16, mesh
{"sequence": 4, "tensor": 2}, micro-batch 1; "gpu" one 8-GPU node (A100/H100-80GB), mesh
{"fsdp": 2, "sequence": 4}, micro-batch 2. Global batch 64 either way (gradient
accumulation). Learning rate 1e-5: the paper trains 70B at half the 7B/13B rate (section 4.1;
the official README shows no 70B command).
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    return longlora(
        "llama2-70b", 32_768, variant, lr=1e-5,  # the paper's 70B rate (section 4.1)
        tpu=Layout({"sequence": 4, "tensor": 2}, micro_batch=1, topology="v4-16"),
        gpu=Layout({"fsdp": 2, "sequence": 4}, micro_batch=2),
    )
