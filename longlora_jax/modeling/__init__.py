"""Model definition: config, RoPE, attention (full and S2), LoRA, the LLaMA module."""
