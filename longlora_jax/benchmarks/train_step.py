"""The LongLoRA train step vs transformers + PEFT: `python -m longlora_jax.bench train`.

Our jitted step (S2-Attn G = N/4, LoRA+ r=8, fused chunked cross-entropy, AdamW) on a random
SmolLM2-shaped model against transformers' LLaMA + PEFT LoRA with trainable embeddings and
norms, gradient checkpointing and torch AdamW: batch 1, fp32, same process, interleaved, min
of the timed steps. Peers (`peers`): "s2", the official S2-Attn (`torch_peers`, registered as
a transformers attention) -- the same algorithm as ours, so their ratio is implementation;
"full", causal SDPA, beside which our step with full attention runs too, so S2's gain over
full attention (algorithm) is a ratio of its own on each side. Our step recomputes the layers
in the backward pass (`model.remat` "full") as the peers' gradient checkpointing does.

MFU counts the FLOPs the step needs (MaxText's rule: forward and the backward the trainable
set needs, no recompute), HFU the FLOPs it executes (remat and the flash backward's score
recompute included), both against the fp32 matmul rate XLA reaches in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from longlora_jax.benchmarks import torch_peers
from longlora_jax.benchmarks.common import (
    TIMING_RENAMED,
    Variant,
    report,
    time_round_robin,
    timing_config,
)
from longlora_jax.cli.renames import Renamed
from longlora_jax.errors import ConfigError
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


PEERS = ("s2", "full")


def default_config() -> ml_collections.ConfigDict:
    """lengths, preset (the model's shape: a `LlamaConfig` preset), layers, peers (of
    `PEERS`: the official S2 and/or full attention, each with our step on the same
    algorithm), model.remat (ours; "full" matches the peers' gradient checkpointing),
    attention.group_size_ratio (G / N), loss_chunk, model.frozen_dtype (of our frozen base),
    quantize (schemes of `model.quantize` whose steps are timed beside the plain one), and the
    timing settings (`common`); model.* and attention.* as training's."""
    c = timing_config(timeout_s=120.0)
    c.lengths = (2048, 8192)
    c.preset = "smollm2-135m"
    c.layers = 4
    c.peers = ("s2",)
    c.model = ml_collections.ConfigDict(dict(remat="full", frozen_dtype="float32"))
    c.attention = ml_collections.ConfigDict(dict(group_size_ratio=0.25))
    c.loss_chunk = 1024
    c.quantize = ()  # e.g. int8,int4: our step on a quantized base too, beside the plain one
    return c


def bench_shape(n: int, config, attention: str = "s2") -> LlamaConfig:
    """The benchmarked model: `config.preset`'s shape (random; SmolLM2-135M by default) with
    `config.layers` layers and `config.model.remat`, S2 at G = group_size_ratio x N (or full
    attention), LoRA r=8."""
    return LlamaConfig.preset(
        config.preset, num_hidden_layers=config.layers, scan_layers=True,
        remat_policy=config.model.remat, attention_train=attention,
        s2_group_size_ratio=config.attention.group_size_ratio, lora_rank=8,
        lora_alpha=16.0, max_position_embeddings=max(n, 8192),
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

def our_step_parts(n: int, config, quantize: str = "none", attention: str = "s2") -> tuple:
    """Our jitted LongLoRA step (S2 or full attention + LoRA+, chunked loss, AdamW) on a
    random SmolLM2 shape, its frozen base stored as `config.model.frozen_dtype` or quantized:
    (step_fn, state, frozen, batch), step_fn(state, frozen, batch) -> (state, metrics)."""
    cfg = bench_shape(n, config, attention)
    setup = build_train_setup(
        LlamaForCausalLM(cfg.replace(quantize=quantize)), single_device_mesh(),
        mode="lora_plus", optim_cfg=default_optim_config(),
        options=StepOptions(loss_chunk=config.loss_chunk), frozen_dtype=config.model.frozen_dtype,
    )
    variables = init_variables(LlamaForCausalLM(cfg), setup.variable_shardings,
                               jax.random.key(0), only=("lora",))
    variables["params"] = load_base_params(BaseSpec("preset", config.preset),
                                           setup.model.cfg, seed=0, dtype=config.model.frozen_dtype,
                                           shardings=setup.variable_shardings["params"])
    state, frozen = init_state(setup, variables, jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, n + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((1, n), np.float32), "segment_ids": np.ones((1, n), np.int32),
             "positions": np.arange(n, dtype=np.int32)[None]}
    return setup.step_fn, state, frozen, batch


def our_step(n: int, config, quantize: str = "none", attention: str = "s2") -> Variant:
    """`our_step_parts` as a Variant: each run is one optimizer step."""
    step_fn, state, frozen, batch = our_step_parts(n, config, quantize, attention)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step_fn(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    name = "longlora_jax" if attention == "s2" else f"longlora_jax_{attention}"
    return Variant(name if quantize == "none" else f"{name}[{quantize}]", run)


def peer_step(n: int, config, attention: str) -> Variant:
    """transformers LLaMA + PEFT LoRA with trainable embeddings and norms (the official
    LongLoRA recipe), gradient checkpointing, torch AdamW: the PyTorch peer, its attention
    the official S2 ("s2") or causal SDPA ("full")."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hf_cfg = LlamaConfig.preset(config.preset, num_hidden_layers=config.layers,
                                max_position_embeddings=max(n, 8192)).to_hf()
    implementation = ("sdpa" if attention == "full"
                      else torch_peers.register(config.attention.group_size_ratio))
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_cfg, attn_implementation=implementation))
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

    return Variant(f"hf_peft_{attention}", run)


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Training-step throughput: our LongLoRA step vs transformers + PEFT on the same
    algorithm (module docstring), same shapes; and MFU / HFU against the matmul rate XLA
    reaches in the same run."""
    unknown = [p for p in config.peers if p not in PEERS]
    if unknown or not config.peers:
        raise ConfigError(f"peers={tuple(config.peers)}; valid: one or more of "
                          f"{', '.join(PEERS)}")
    rows = []
    roof = matmul_rate()
    for n in config.lengths:
        variants = [our_step(n, config), *(our_step(n, config, q) for q in config.quantize)]
        if "full" in config.peers:
            variants.append(our_step(n, config, attention="full"))
        if config.torch:
            variants += [peer_step(n, config, peer) for peer in config.peers]
        time_round_robin(variants, config)
        row: dict[str, Any] = {"N": n, "layers": config.layers, "remat": config.model.remat}
        best = {v.name: min(v.seconds) if v.seconds else None for v in variants}
        for v in variants:
            row[f"{v.name} s/step"] = best[v.name] or v.skipped
            row[f"{v.name} tokens/s"] = n / best[v.name] if best[v.name] else None
        for column, peer, ours in (("S2: ours vs official", "hf_peft_s2", "longlora_jax"),
                                   ("full: ours vs HF", "hf_peft_full", "longlora_jax_full"),
                                   ("S2 vs full (ours)", "longlora_jax_full", "longlora_jax"),
                                   ("S2 vs full (HF)", "hf_peft_full", "hf_peft_s2")):
            if best.get(peer) and best.get(ours):
                row[column] = best[peer] / best[ours]
        ours = best["longlora_jax"]
        for q, v in zip(config.quantize, variants[1:], strict=False):
            if ours and best[v.name]:
                row[f"{q}/plain"] = best[v.name] / ours
        shape = bench_shape(n, config)
        needed = model_flops(shape, tokens=n, seq_len=n, mode="lora_plus", recompute=False)
        executed = model_flops(shape, tokens=n, seq_len=n, mode="lora_plus")
        row["model GFLOP/step"] = needed / 1e9
        row["executed GFLOP/step"] = executed / 1e9
        row["XLA matmul GFLOP/s"] = roof / 1e9
        if ours:
            row["MFU"] = needed / ours / roof
            row["HFU"] = executed / ours / roof
        rows.append(row)
        print(f"done N={n}", flush=True)
    ratio = config.attention.group_size_ratio
    meta = {"command": "train", "model": f"{config.preset} shape", "batch": 1,
            "mode": "lora_plus r=8", "attention": f"S2 G=N*{ratio}", "peers": list(config.peers),
            "frozen_dtype": config.model.frozen_dtype,
            "timing": "min wall seconds of a full optimizer step, variants interleaved"}
    quantized = [c for q in config.quantize for c in (f"longlora_jax[{q}] s/step", f"{q}/plain")]
    seconds = ["longlora_jax s/step", *quantized]
    if "s2" in config.peers:
        seconds += ["hf_peft_s2 s/step"]
    if "full" in config.peers:
        seconds += ["longlora_jax_full s/step", "hf_peft_full s/step"]
    report(rows, ("N", "layers", "remat", *seconds, *_RATIO_COLUMNS), config.json, meta)
    return rows


_RATIO_COLUMNS = ("S2: ours vs official", "full: ours vs HF", "S2 vs full (ours)",
                  "S2 vs full (HF)", "model GFLOP/step", "executed GFLOP/step",
                  "XLA matmul GFLOP/s", "MFU", "HFU")
