"""A random-init tiny GPT-NeoX / Pythia (rotary_pct 0.25, parallel residual) on the essays.

    python -m longlora_jax.train --config configs/tiny_gpt_neox_cpu.py --workdir runs/tiny_neox

As tiny_cpu.py: LoRA on query_key_value and dense; LoRA+ also trains embed_in and every
LayerNorm (weight and bias).
"""

from longlora_jax.training.config import default_config


def get_config():
    c = default_config()
    c.model.base = "preset:tiny-gpt-neox"
    c.model.tokenizer = "bytes"
    c.model.overrides = {"vocab_size": 512, "max_position_embeddings": 128}
    c.model.scan = True
    c.seq_len = 256
    c.attention.train = "s2"
    c.lora.mode = "lora_plus"
    c.lora.targets = ("query_key_value", "dense")  # the official GPT-NeoX targets
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.batch.global_batch = 4
    c.max_steps = 10
    c.log_every = 1
    c.eval.max_windows = 4
    c.eval.batch = 2
    c.checkpoint.every = 5
    c.loss_chunk = 128
    c.data.source = "offline_essays"
    return c
