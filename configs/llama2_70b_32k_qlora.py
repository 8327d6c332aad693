"""LLaMA-2-70B extended to 32k on a quarter of the slice: QLoRA, a 4-bit frozen base.

    python -m longlora_jax.train --config configs/llama2_70b_32k_qlora.py[:gpu] --workdir W \
        --config.model.base=hf:Llama-2-70b-hf
    python -m longlora_jax.aot --config configs/llama2_70b_32k_qlora.py    # its slice: v4-8

`configs/llama2_70b_32k.py` (the paper's run: S2-Attn, PI x8, LoRA+ r=8, lr 1e-5, global
batch 64) with the frozen decoder projections stored as NF4 (groups of 64 input rows,
bf16 scales; `model.quantize`), quantized tensor by tensor as the bf16 checkpoint loads:
the frozen weights take ~37 GB instead of 138 GB, so the run fits 4 v4 chips instead of 8.
Embeddings, norms, the LM head and the LoRA factors stay in floating point.

Variants (see `longlora_jax.training.recipes`): "tpu" (default) TPU v4-8, mesh
{"sequence": 4}, micro-batch 1; "gpu" one 8-GPU node (A100/H100-80GB), mesh
{"fsdp": 2, "sequence": 4}, micro-batch 2.
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    c = longlora(
        "llama2-70b", 32_768, variant, lr=1e-5,  # the paper's 70B rate (section 4.1)
        tpu=Layout({"sequence": 4}, micro_batch=1, topology="v4-8"),
        gpu=Layout({"fsdp": 2, "sequence": 4}, micro_batch=2),
    )
    c.model.quantize = "nf4"  # measured better than int4 at the same bytes (docs/qlora.md)
    return c
