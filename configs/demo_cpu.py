"""The README's main job: LongLoRA on a laptop CPU with nothing but package-registry downloads.

SmolLM2-135M-Instruct (offline GGUF asset, 8k context) fine-tuned with S2-Attn (G = 512) and
LoRA+ at 2048 tokens on five Jane Austen novels (offline Debian package), 20 steps; held-out
perplexity on the sixth novel with full attention before and after.

Positions are interpolated 4x (rope.scaling "linear:4": what extending SmolLM2 from 8k to 32k
uses). Training at 2048 tokens keeps the demo on a laptop; what it shows is the adaptation to
interpolated positions that LongLoRA fine-tuning buys: the base model with PI x4 and no
training is far worse than without PI (ppl 155 vs 31), and 20 steps win much of it back.

    python -m longlora_jax.train --config configs/demo_cpu.py --workdir runs/demo
"""

from longlora_jax.training.config import default_config


def get_config():
    c = default_config()
    c.model.base = "smollm2"
    c.model.tokenizer = "auto"
    c.model.dtype = "float32"  # XLA:CPU has no fast bf16 matmul; frozen weights stay bf16
    # Fastest of frozen dtype x remat x loss chunk on CPU at 2048 tokens (`bench settings`,
    # docs/speed.md): full remat 1.4x faster than keeping every activation ("none").
    c.model.remat = "full"
    c.model.scan = True
    c.seq_len = 2048
    c.rope.scaling = "linear:4"  # linear position interpolation, as for 8k -> 32k
    c.attention.train = "s2"
    c.attention.group_size = 512
    c.lora.mode = "lora_plus"
    # 20 steps is a demo, not the paper's 1000: a larger learning rate shows the adaptation.
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 2
    c.batch.global_batch = 1
    c.max_steps = 20
    c.log_every = 1
    c.eval.max_windows = 4
    c.checkpoint.every = 10
    c.data.source = "offline_books"
    c.loss_chunk = 512
    return c
