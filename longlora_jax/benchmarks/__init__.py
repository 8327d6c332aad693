"""Benchmarks, measured side by side in one process: attention kernels (`attention`), the
train step against transformers + PEFT (`train_step`), where its time goes (`profile`) and
which of its settings are fastest (`settings`),
XLA's and torch's matmul rate on the step's products (`matmul`), the memory of a quantized
base (`quant`) and its perplexity against bitsandbytes and hqq (`quant_quality`), the official
S2 in PyTorch as a peer (`torch_peers`) and the longest trainable context (`longest`);
shared timing in `common`.
"""
