"""PEFT LoRA adapters read onto a base: the official LongLoRA releases and PEFT's own files.

An adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules) and
`adapter_model.safetensors`, or `adapter_model.bin` (a `torch.save` pickle, read by
`io.torch_pickle`, which executes nothing). The official LongLoRA releases add
`trainable_params.bin`: the LoRA+ weights (token embeddings, norms) under their HF names
("model.embed_tokens.weight", ...). Their embedding has one row more than LLaMA-2's 32000
(the official scripts add a pad token and resize); the untied LM head then gets that row as
the mean of its others, as the official `smart_tokenizer_and_embedding_resize` does.

PEFT keys look like "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
(optionally with ".default" before ".weight"); full weights (PEFT `modules_to_save`, e.g. our
LoRA+ export) carry the HF name after the prefix. The HF name table of `io.hf` places all of
them; LoRA factors go to the `lora` collection (A [in, r], B [r, out], scale alpha / r).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from longlora_jax.errors import CheckpointError
from longlora_jax.io.hf import lookup_hf, output_projection, tensor_names
from longlora_jax.io.torch_pickle import load_torch_file
from longlora_jax.modeling.config import LORA_TARGETS, LlamaConfig
from longlora_jax.modeling.lora import LORA_COLLECTION

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINABLE_PARAMS = "trainable_params.bin"
PEFT_PREFIX = "base_model.model."
_FACTORS = {"lora_A": "a", "lora_B": "b"}


def read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A safetensors file, or a PyTorch file through the restricted unpickler."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return load_torch_file(path)


def _adapter_config(adapter_dir: pathlib.Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {str(adapter_dir)!r}: not a PEFT adapter")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config['peft_type']!r}; only LORA adapters")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported (plain LoRA only)")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not set(targets or ()) <= set(LORA_TARGETS):
        raise CheckpointError(f"{path}: target_modules {targets!r}; supported: a list of "
                              f"{', '.join(LORA_TARGETS)}")
    return config


def _full_name(key: str) -> tuple[str, str | None]:
    """(HF module or tensor name, "a" | "b" | None) of a PEFT / trainable-params key."""
    name = key.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight")
    name = name.replace(".modules_to_save.weight", ".weight")
    for peft, ours in _FACTORS.items():
        if name.endswith(f".{peft}.weight"):
            return name[: -len(f".{peft}.weight")] + ".weight", ours
    return name, None


def _set(flat: dict, path: tuple[str, ...], layer: int | None, value: np.ndarray,
         shape: tuple[int, ...], dtype) -> None:
    if layer is None:
        flat[path] = value.astype(dtype)
        return
    stack = np.array(flat[path], dtype) if path in flat else np.zeros(shape, dtype)
    stack[layer] = value
    flat[path] = stack


def apply_adapter(cfg: LlamaConfig, params: Mapping[str, Any],
                  adapter_dir: str | pathlib.Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """(cfg with the adapter's LoRA settings, {"params", "lora"}) of a base plus an adapter.

    `params`: the base's (scanned or not, as `cfg.scan_layers` says). CheckpointError for an
    adapter that does not fit the base (unknown module, wrong shape, missing factor).
    """
    adapter_dir = pathlib.Path(adapter_dir)
    config = _adapter_config(adapter_dir)
    weights = [adapter_dir / f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()]
    if not weights:
        raise CheckpointError(f"no {' or '.join(ADAPTER_WEIGHTS)} in {str(adapter_dir)!r}")
    tensors = read_tensors(weights[0])
    if (adapter_dir / TRAINABLE_PARAMS).is_file():
        tensors |= read_tensors(adapter_dir / TRAINABLE_PARAMS)
    rank = int(config["r"])
    cfg = cfg.replace(lora_rank=rank, lora_alpha=float(config["lora_alpha"]),
                      lora_targets=tuple(sorted(config["target_modules"])))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    kernel_dtype = flat[next(n.path for n in tensor_names(cfg)
                             if n.path[-1] == "embedding")].dtype
    lora: dict[tuple[str, ...], np.ndarray] = {}
    full: dict[str, np.ndarray] = {}
    factors = 0
    for key, array in tensors.items():
        name, factor = _full_name(key)
        if factor is None:
            full[name] = array
            continue
        entry = lookup_hf(name, scan_layers=cfg.scan_layers, cfg=cfg)
        if entry.path[-2] not in cfg.lora_targets:
            raise CheckpointError(f"{key}: {entry.path[-2]} is not in the adapter's "
                                  f"target_modules {sorted(cfg.lora_targets)}")
        kernel = flat[entry.path]
        fan_in, fan_out = kernel.shape[-2:]
        want = (rank, fan_in) if factor == "a" else (fan_out, rank)
        if array.shape != want:
            raise CheckpointError(f"{key} has shape {list(array.shape)}, expected {list(want)}")
        stack = (cfg.num_hidden_layers,) if entry.layer is not None else ()
        _set(lora, (*entry.path[:-1], factor), entry.layer, array.T,
             (*stack, *array.T.shape), np.float32)
        factors += 1
    expected = 2 * len(cfg.lora_targets) * cfg.num_hidden_layers
    if factors != expected:
        raise CheckpointError(f"{adapter_dir}: {factors} LoRA factors, expected {expected} (A "
                              f"and B of {sorted(cfg.lora_targets)} in every layer)")
    cfg = _load_full_weights(cfg, flat, full, kernel_dtype)
    variables = {"params": traverse_util.unflatten_dict(flat),
                 LORA_COLLECTION: traverse_util.unflatten_dict(lora)}
    return cfg, variables


def _load_full_weights(cfg: LlamaConfig, flat: dict, full: Mapping[str, np.ndarray],
                       dtype) -> LlamaConfig:
    """Puts the adapter's full weights (embeddings, norms) into `flat`, growing the
    vocabulary when the embedding has more rows than the base (see the module docstring)."""
    embed = next(n for n in tensor_names(cfg) if n.path[-1] == "embedding")
    head = output_projection(cfg)
    embedding = full.get(embed.hf)
    if embedding is not None and embedding.shape[0] > cfg.vocab_size:
        extra = embedding.shape[0] - cfg.vocab_size
        cfg = cfg.replace(vocab_size=embedding.shape[0])
        flat[embed.path] = np.zeros(embedding.shape, dtype)
        if not cfg.tie_word_embeddings:
            head_path = lookup_hf(head, cfg=cfg).path
            kernel = flat[head_path]  # [E, V]
            mean = kernel.mean(axis=1, keepdims=True)
            flat[head_path] = np.concatenate([kernel] + [mean] * extra, axis=1)
    for name, array in full.items():
        if name == head and cfg.tie_word_embeddings:
            continue  # our tied export saves the shared matrix under both names
        entry = lookup_hf(name, scan_layers=cfg.scan_layers, cfg=cfg)
        target = flat[entry.path]
        value = array.T if entry.transpose else array
        one = target.shape[1:] if entry.layer is not None else target.shape
        if value.shape != one:
            raise CheckpointError(f"{name} has shape {list(array.shape)}, expected "
                                  f"{list(one[::-1] if entry.transpose else one)}")
        _set(flat, entry.path, entry.layer, value, target.shape, target.dtype)
    return cfg
