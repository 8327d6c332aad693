"""LLaMA-2-7B extended to 100k on ONE accelerator chip: QLoRA (a 4-bit frozen base), LoRA+.

    python -m longlora_jax.aot --config configs/llama2_7b_100k_one_chip.py   # one v5p chip
    python -m longlora_jax.train --config configs/llama2_7b_100k_one_chip.py --workdir W \
        --config.model.base=hf:Llama-2-7b-hf

`configs/llama2_7b_100k.py` (the paper's run: 100,000 tokens, S2-Attn G = N/4, PI x25,
LoRA+ r=8, global batch 64), which the paper trains on 8 A100-80GB, laid out for a single
chip: the frozen decoder projections stored as NF4 (`model.quantize`; 3.4 GiB instead of
13 GB), one sequence per forward pass and 64 accumulated micro-steps, full
rematerialisation, the LM head and cross-entropy in chunks of `loss_chunk` tokens, splash
kernels for S2-Attn.

It fits: 67.0 GiB on the chip of 95.74 usable (weights and optimizer state 5.1 GiB,
temporaries 61.9 GiB; docs/fit.md has the report). `tests/test_aot.py` checks it (slow tier).

Variants: "tpu" (default) one TPU v5p chip (95 GiB usable HBM; `aot.topology`); "gpu" one
80 GB GPU (A100/H100), the same layout, an estimate (not compiled here).
"""

from longlora_jax.training.recipes import Layout, longlora


def get_config(variant: str = "tpu"):
    c = longlora(
        "llama2-7b", 100_000, variant,
        tpu=Layout({}, micro_batch=1, topology="v5p:1x1x1"),
        gpu=Layout({}, micro_batch=1),
    )
    c.model.quantize = "nf4"
    return c
