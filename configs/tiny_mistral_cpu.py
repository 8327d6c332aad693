"""A random-init tiny Mistral (GQA, sliding window 48) on the offline essays: as tiny_cpu.py.

    python -m longlora_jax.train --config configs/tiny_mistral_cpu.py --workdir runs/tiny_mistral

S2-Attn groups of 64 tokens with the 48-token window inside them; LoRA+ on q/k/v/o.
"""

from longlora_jax.training.config import default_config


def get_config():
    c = default_config()
    c.model.base = "preset:tiny-mistral"
    c.model.tokenizer = "bytes"
    c.model.overrides = {"vocab_size": 512, "max_position_embeddings": 128}
    c.model.scan = True
    c.seq_len = 256
    c.attention.train = "s2"
    c.lora.mode = "lora_plus"
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
