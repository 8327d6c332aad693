"""A random-init tiny Qwen2 (GQA, q/k/v biases, tied embeddings) on the offline essays.

    python -m longlora_jax.train --config configs/tiny_qwen2_cpu.py --workdir runs/tiny_qwen2

As tiny_cpu.py: LoRA on the biased q/k/v/o projections; LoRA+ also trains the embeddings and
RMSNorms, the biases stay frozen (PEFT's bias="none", as the official fine-tune.py).
"""

from longlora_jax.training.config import default_config


def get_config():
    c = default_config()
    c.model.base = "preset:tiny-qwen2"
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
