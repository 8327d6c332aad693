"""Weights in and out: HF safetensors checkpoints, GGUF files, PEFT adapters."""
