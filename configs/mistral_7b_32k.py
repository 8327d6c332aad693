"""Mistral-7B-v0.1 (sliding window 4096) fine-tuned with LongLoRA at 32k.

    python -m longlora_jax.train --config configs/mistral_7b_32k.py[:gpu] --workdir W \
        --config.model.base=hf:Mistral-7B-v0.1
    python -m longlora_jax.aot --config configs/mistral_7b_32k.py          # its slice: v4-8

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh {"sequence": 4},
micro-batch 1; "gpu" one 8-GPU node (A100/H100-80GB), mesh {"fsdp": 8}, micro-batch 8.
Global batch 64 either way (gradient accumulation).

S2-Attn groups of N/4 = 8192 tokens with the model's 4096-token window inside them (and in
evaluation's full attention). Mistral-7B-v0.1's config already spans 32768 positions, so the
recipe's ceil(N / 32768) = 1 leaves RoPE unscaled; a longer N interpolates. The default
"llama2" tokenizer is Mistral-7B-v0.1's own SentencePiece model (the offline asset).
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    return longlora(
        "mistral-7b", 32_768, variant,
        tpu=Layout({"sequence": 4}, micro_batch=1, topology="v4-8"),
        gpu=Layout({"fsdp": 8}, micro_batch=8),
    )
