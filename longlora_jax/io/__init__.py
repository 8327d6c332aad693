"""Weights in and out: where a base and its tokenizer come from (`base`), HF safetensors
checkpoints (`hf`), GGUF files (`gguf`), PEFT adapters (`peft`), PyTorch pickles read without
PyTorch (`torch_pickle`), a training run's directory and the one model loader (`run`), the
checksum manifest every checkpoint carries (`manifest`), and a run's export as a merged
checkpoint or an adapter (`export`), or a GGUF file for llama.cpp (`gguf_export`).
"""
