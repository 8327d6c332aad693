"""The LongLoRA train step vs transformers + PEFT: `python -m longlora_jax.bench train`.

Our jitted step (S2-Attn G = N/4, LoRA+ r=8, fused chunked cross-entropy, AdamW) on a random
SmolLM2-shaped model against transformers' LLaMA (SDPA) + PEFT LoRA with trainable embeddings
and norms, gradient checkpointing and torch AdamW: batch 1, fp32, same process, interleaved,
min of the timed steps.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from longlora_jax.benchmarks.common import (
    TIMING_RENAMED,
    Variant,
    report,
    time_round_robin,
    timing_config,
)
from longlora_jax.cli.renames import Renamed
from longlora_jax.io.base import BaseSpec, init_variables, load_base_params
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.llama import LlamaForCausalLM
from longlora_jax.parallel.mesh import single_device_mesh
from longlora_jax.training.fit import model_flops
from longlora_jax.training.optim import default_optim_config
from longlora_jax.training.step import StepOptions, build_train_setup, init_state

# Retired spellings, accepted (with a warning) until the next release.
RENAMED = (*TIMING_RENAMED, Renamed("group_ratio", "attention.group_size_ratio"),
           Renamed("remat", "model.remat"), Renamed("frozen_dtype", "model.frozen_dtype"))


def default_config() -> ml_collections.ConfigDict:
    """lengths, layers (SmolLM2-shaped), model.remat (ours; "none" is the demo's, the peer always
    checkpoints), attention.group_size_ratio (G / N), loss_chunk, model.frozen_dtype (of our
    frozen base), quantize (schemes of `model.quantize` whose steps are timed beside the
    plain one), and the timing settings (`common`); model.* and attention.* as training's."""
    c = timing_config(timeout_s=120.0)
    c.lengths = (2048, 8192)
    c.layers = 4
    c.model = ml_collections.ConfigDict(dict(remat="none", frozen_dtype="float32"))
    c.attention = ml_collections.ConfigDict(dict(group_size_ratio=0.25))
    c.loss_chunk = 1024
    c.quantize = ()  # e.g. int8,int4: our step on a quantized base too, beside the plain one
    return c


def smollm2_shape(n: int, layers: int, remat: str, group_size_ratio: float) -> LlamaConfig:
    """The benchmarked model: SmolLM2-135M's shape (random), S2 at G = ratio x N, LoRA r=8."""
    return LlamaConfig.preset(
        "smollm2-135m", num_hidden_layers=layers, scan_layers=True, remat_policy=remat,
        attention_train="s2", s2_group_size_ratio=group_size_ratio, lora_rank=8, lora_alpha=16.0,
        max_position_embeddings=max(n, 8192),
    )


def matmul_rate() -> float:
    """FLOP/s XLA reaches here on the model's largest matmul shapes (fp32, best of a few):
    the roof that the step's useful FLOPs are measured against."""
    rng = np.random.default_rng(0)
    best = 0.0
    for m, k, n in ((2048, 576, 49152), (4096, 576, 1536), (4096, 1536, 576)):
        a = jax.device_put(rng.standard_normal((m, k), np.float32))
        b = jax.device_put(rng.standard_normal((k, n), np.float32))
        dot = jax.jit(jnp.dot)
        dot(a, b).block_until_ready()
        for _ in range(3):
            start = time.perf_counter()
            dot(a, b).block_until_ready()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best

def our_step(n: int, config, quantize: str = "none") -> Variant:
    """Our jitted LongLoRA step (S2 + LoRA+, chunked loss, AdamW) on a random SmolLM2 shape,
    its frozen base stored as `config.model.frozen_dtype` or quantized."""
    cfg = smollm2_shape(n, config.layers, config.model.remat, config.attention.group_size_ratio)
    setup = build_train_setup(
        LlamaForCausalLM(cfg.replace(quantize=quantize)), single_device_mesh(),
        mode="lora_plus", optim_cfg=default_optim_config(),
        options=StepOptions(loss_chunk=config.loss_chunk), frozen_dtype=config.model.frozen_dtype,
    )
    variables = init_variables(LlamaForCausalLM(cfg), setup.variable_shardings,
                               jax.random.key(0), only=("lora",))
    variables["params"] = load_base_params(BaseSpec("preset", "smollm2-135m"),
                                           setup.model.cfg, seed=0, dtype=config.model.frozen_dtype,
                                           shardings=setup.variable_shardings["params"])
    state, frozen = init_state(setup, variables, jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, n + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((1, n), np.float32), "segment_ids": np.ones((1, n), np.int32),
             "positions": np.arange(n, dtype=np.int32)[None]}
    holder = {"state": state}

    def run():
        holder["state"], metrics = setup.step_fn(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    return Variant("longlora_jax" if quantize == "none" else f"longlora_jax[{quantize}]", run)


def peer_step(n: int, config) -> Variant:
    """transformers LLaMA (SDPA) + PEFT LoRA with trainable embeddings and norms (the
    official LongLoRA recipe), gradient checkpointing, torch AdamW: the PyTorch peer."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hf_cfg = LlamaConfig.preset("smollm2-135m", num_hidden_layers=config.layers,
                                max_position_embeddings=max(n, 8192)).to_hf()
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                              "o_proj"]))
    for name, param in model.named_parameters():  # LoRA+: embeddings and norms train too
        if "embed" in name or "norm" in name:
            param.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    ids = torch.from_numpy(
        np.random.default_rng(0).integers(0, hf_cfg["vocab_size"], (1, n), dtype=np.int64))

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant("hf_peft", run)


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Training-step throughput: our LongLoRA step vs transformers + PEFT, same shapes; and
    our useful-FLOPs efficiency: the step's counted model FLOPs per second over the matmul
    rate XLA reaches in the same run."""
    rows = []
    roof = matmul_rate()
    for n in config.lengths:
        variants = [our_step(n, config), *(our_step(n, config, q) for q in config.quantize)]
        if config.torch:
            variants.append(peer_step(n, config))
        time_round_robin(variants, config)
        row: dict[str, Any] = {"N": n, "layers": config.layers, "remat": config.model.remat}
        best = {v.name: min(v.seconds) if v.seconds else None for v in variants}
        for v in variants:
            row[f"{v.name} s/step"] = best[v.name] or v.skipped
            row[f"{v.name} tokens/s"] = n / best[v.name] if best[v.name] else None
        ours = best[variants[0].name]
        if config.torch and ours and best[variants[-1].name]:
            row["speedup"] = best[variants[-1].name] / ours
        for q, v in zip(config.quantize, variants[1:], strict=False):
            if ours and best[v.name]:
                row[f"{q}/plain"] = best[v.name] / ours
        shape = smollm2_shape(n, config.layers, config.model.remat,
                              config.attention.group_size_ratio)
        flops = model_flops(shape, tokens=n, seq_len=n, mode="lora_plus")
        row["model GFLOP/step"] = flops / 1e9
        row["XLA matmul GFLOP/s"] = roof / 1e9
        if ours:
            row["GFLOP/s"] = flops / ours / 1e9
            row["efficiency"] = flops / ours / roof
        rows.append(row)
        print(f"done N={n}", flush=True)
    ratio = config.attention.group_size_ratio
    meta = {"command": "train", "model": "SmolLM2-135M shape", "batch": 1,
            "mode": "lora_plus r=8", "attention": f"S2 G=N*{ratio} vs HF SDPA full",
            "timing": "min wall seconds of a full optimizer step, variants interleaved"}
    quantized = [c for q in config.quantize for c in (f"longlora_jax[{q}] s/step", f"{q}/plain")]
    meta["frozen_dtype"] = config.model.frozen_dtype
    report(rows, _TRAIN_COLUMNS[:4] + tuple(quantized) + _TRAIN_COLUMNS[4:], config.json, meta)
    return rows


_TRAIN_COLUMNS = ("N", "layers", "remat", "longlora_jax s/step", "hf_peft s/step",
                  "longlora_jax tokens/s", "hf_peft tokens/s", "speedup", "model GFLOP/step",
                  "GFLOP/s", "XLA matmul GFLOP/s", "efficiency")
