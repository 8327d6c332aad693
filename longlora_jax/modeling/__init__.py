"""Model definition: the config (`config`), RoPE (`rope`), attention (`attention`: full and
S2, on the kernels of `kernels`; S2 with attention sinks in `sinks`), LoRA (`lora`), quantized
frozen weights (`quant`), RMS and layer normalisation (`norms`), the LLaMA module (`llama`) and
GPT-NeoX's (`gpt_neox`), the families and `build_model` (`families`), the KV cache
(`kv_cache`) and the chunked loss (`loss`).
"""
