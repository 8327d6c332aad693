"""The LongLoRA paper's runs as configs: the recipe they share and where each one runs.

Every `configs/llama*_*.py` and `configs/longalpaca_sft_16k.py` is `longlora(...)` or
`longalpaca_sft(...)` with its model, length and two layouts:

  "tpu" (default)  a named TPU v4 slice (`aot.topology`); `python -m longlora_jax.aot
                   --config C` compiles the step for it and checks that it fits;
  "gpu"            one node of 8 A100/H100-80GB GPUs (the paper's hardware), one process per
                   node (launch/slurm_gpu.sbatch); estimates, not compiled here.

Pick one with `--config configs/X.py:gpu`. The recipe (the official fine-tune.py and
supervised-fine-tune.py): S2-Attn with G = N/4 (wrap off, the flash path), linear position
interpolation ceil(N / 4096), LoRA rank 8 (alpha 16) on q/k/v/o plus trainable embeddings and
norms (LoRA+), AdamW with 20 warmup steps then constant, weight decay 0, global batch 64
sequences (micro-batches of one sequence per data shard and gradient accumulation), 1000
steps, bf16 compute and frozen weights, full rematerialisation, scanned layers. The learning
rate is the paper's (section 4.1): 2e-5 for 7B and 13B, 1e-5 for 70B (the official README
only shows 7B/13B commands, with 2e-5).

Step settings for TPU and GPU, and why (the CPU configs measure theirs with `bench
settings`, docs/speed.md; those measurements do not carry over): bf16 compute and frozen
weights, because matrix units run bf16 at full rate and fp32 frozen weights would double the
base's memory and its reads every step; full rematerialisation, because at 8k-100k tokens a
7B-70B model's kept activations do not fit beside the base (the fit reports, docs/fit.md,
give the temporaries with it); the loss in chunks of 1024 tokens, because the [N, vocabulary]
logits alone would take 12.8 GB in fp32 at 100k tokens and a 32k vocabulary.

The tokenizer is "auto": with `--config.model.base=hf:DIR` the checkpoint's own (every run
refuses a tokenizer whose ids do not fit the embedding). The base defaults to a random init of
the architecture ("preset:..."), enough for AOT compilation and throughput runs, which then
tokenize with the byte tokenizer (`--config.model.tokenizer=standin-sp32k` gives a 32k
SentencePiece stand-in: Mistral-7B-v0.1's vocabulary, never a real base's). Data paths are
relative to the working directory.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from longlora_jax.errors import ConfigError
from longlora_jax.parallel.mesh import MESH_AXES
from longlora_jax.training.config import default_config

VARIANTS = ("tpu", "gpu")
PAPER_GLOBAL_BATCH = 64
# RedPajama-Data-1T-Sample (jsonl, field "text"): what the official fine-tune.py trains on.
REDPAJAMA = ("data/RedPajama-Data-1T-Sample/*.jsonl",)
# LongAlpaca-16k-length (JSON list of instruction/output records): what the official README's
# 16k SFT command trains on (the examples of LongAlpaca-12k that fit 16k tokens).
LONGALPACA_16K = ("data/LongAlpaca-16k-length.json",)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run is laid out on its hardware: the mesh (axes left out are 1), the
    micro-batch (sequences per forward pass over all devices) and, for a TPU layout, the
    slice it is made for (the AOT fit report's default topology)."""

    mesh: dict[str, int]
    micro_batch: int
    topology: str = ""


def _variant(variant: str, tpu: Layout, gpu: Layout) -> Layout:
    if variant not in VARIANTS:
        raise ConfigError(f"config variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return tpu if variant == "tpu" else gpu


def _common(preset: str, seq_len: int, layout: Layout, tokenizer: str,
            lr: float) -> ml_collections.ConfigDict:
    c = default_config()
    c.model.base = f"preset:{preset}"
    c.model.tokenizer = tokenizer
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.scan = True
    c.seq_len = seq_len
    c.rope.scaling = "linear"
    c.attention.train = "s2"
    c.attention.group_size_ratio = 0.25
    c.attention.impl = "auto"
    c.lora.mode = "lora_plus"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optim.lr = lr
    c.optim.warmup_steps = 20
    c.optim.schedule = "constant_with_warmup"
    c.optim.weight_decay = 0.0
    c.batch.global_batch = PAPER_GLOBAL_BATCH
    c.batch.micro_batch = layout.micro_batch
    c.mesh = ml_collections.ConfigDict({**dict.fromkeys(MESH_AXES, 1), **layout.mesh})
    c.aot.topology = layout.topology
    c.log_every = 1
    c.checkpoint.every = 200
    c.checkpoint.keep = 2
    # Perplexity on PG19 / proof-pile runs afterwards with `python -m longlora_jax.evaluate`.
    c.eval.before = False
    c.eval.after = False
    return c


def longlora(preset: str, seq_len: int, variant: str, *, tpu: Layout, gpu: Layout,
             tokenizer: str = "auto", lr: float = 2e-5) -> ml_collections.ConfigDict:
    """Context extension (fine-tune.py): RedPajama, 1000 steps."""
    c = _common(preset, seq_len, _variant(variant, tpu, gpu), tokenizer, lr)
    c.max_steps = 1000
    c.data.source = "jsonl"
    c.data.paths = REDPAJAMA
    c.data.text_field = "text"
    return c


def longalpaca_sft(preset: str, seq_len: int, variant: str, *, tpu: Layout, gpu: Layout,
                   tokenizer: str = "auto", lr: float = 2e-5) -> ml_collections.ConfigDict:
    """Supervised fine-tuning (supervised-fine-tune.py, the README's 16k command):
    LongAlpaca-16k-length, 5 epochs at global batch 64, one example per row (padded), each
    starting with BOS as the official tokenizer call adds it, the official "[INST]...[/INST]"
    prompt, and each row's S2 group from its example's length (the official SFT attention:
    G = L/4 when L is a multiple of 4096, else 8192; `modeling.attention.longlora_sft_group`).
    """
    c = _common(preset, seq_len, _variant(variant, tpu, gpu), tokenizer, lr)
    c.epochs = 5.0
    c.data.source = "sft_json"
    c.data.paths = LONGALPACA_16K
    c.data.sft_template = "longlora"
    c.data.add_bos = True
    c.attention.group_rule = "longlora_sft"
    return c
