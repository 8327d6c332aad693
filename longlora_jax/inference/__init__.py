"""Inference: KV-cache decoding (`decode`), prompt templates (`prompts`), streaming answers
(`chat`)."""
