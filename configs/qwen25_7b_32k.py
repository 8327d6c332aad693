"""Qwen2.5-7B (q/k/v biases, rope theta 1e6) fine-tuned with LongLoRA at 32k.

    python -m longlora_jax.train --config configs/qwen25_7b_32k.py[:gpu] --workdir W \
        --config.model.base=hf:Qwen2.5-7B
    python -m longlora_jax.aot --config configs/qwen25_7b_32k.py          # its slice: v4-8

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh {"sequence": 4},
micro-batch 1; "gpu" one 8-GPU node (A100/H100-80GB), mesh {"fsdp": 8}, micro-batch 8.
Global batch 64 either way (gradient accumulation).

LoRA on the biased q/k/v/o projections; LoRA+ trains the embeddings and norms, the biases stay
frozen (PEFT's bias="none", as the official fine-tune.py). The preset's 32768 positions need
no interpolation at 32k (ceil(N / 32768) = 1); a longer N interpolates. The tokenizer is the
base's own (tokenizer "auto"), so training needs the hf: base.
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    return longlora(
        "qwen2.5-7b", 32_768, variant, tokenizer="auto",
        tpu=Layout({"sequence": 4}, micro_batch=1, topology="v4-8"),
        gpu=Layout({"fsdp": 8}, micro_batch=8),
    )
