"""Pythia-6.9B (GPT-NeoX) extended from 2k to 16k: the official code's second family.

    python -m longlora_jax.train --config configs/pythia_6_9b_16k.py[:gpu] --workdir W \
        --config.model.base=hf:pythia-6.9b
    python -m longlora_jax.aot --config configs/pythia_6_9b_16k.py          # its slice: v4-8

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh {"fsdp": 4},
micro-batch 4; "gpu" one 8-GPU node (A100/H100-80GB), mesh {"fsdp": 8}, micro-batch 8.
Global batch 64 either way (gradient accumulation).

As the official fine-tune.py for GPT-NeoX: LoRA on "query_key_value" and "dense", linear
position interpolation ceil(16384 / 2048) = 8 on the rotary quarter of each head; LoRA+ also
trains embed_in and every LayerNorm (weight and bias). The tokenizer is the base's own
(tokenizer "auto"), so training needs the hf: base.
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    c = longlora(
        "pythia-6.9b", 16_384, variant, tokenizer="auto",
        tpu=Layout({"fsdp": 4}, micro_batch=4, topology="v4-8"),
        gpu=Layout({"fsdp": 8}, micro_batch=8),
    )
    c.lora.targets = ("query_key_value", "dense")
    return c
