"""A model to evaluate or talk to, named by one string, with its tokenizer.

    "smollm2" | "hf:DIR" | "gguf:FILE" | "preset:NAME"   a base model (`pretrained.BaseSpec`;
                                                          a preset is a seeded random init
                                                          with the byte tokenizer)
    any other string                                      a training workdir: the base plus
                                                          the trained leaves (LoRA factors in
                                                          the `lora` collection, applied on
                                                          the fly; LoRA+ embeddings, norms)

RoPE variants (`parse_rope`), to evaluate a model with or without position interpolation:
"own" (as loaded), "none" (plain RoPE), "F" or "linear:F", "dynamic:F", "yarn:F".
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from longlora_jax import sharding
from longlora_jax.io.gguf import load_gguf
from longlora_jax.io.hf import load_pretrained
from longlora_jax.modeling.config import ConfigError, LlamaConfig, RopeScaling
from longlora_jax.modeling.llama import LlamaForCausalLM
from longlora_jax.pretrained import BaseSpec, load_tokenizer

ROPE_KINDS = ("own", "none", "F", "linear:F", "dynamic:F", "yarn:F")
ROPE_HELP = ("RoPE scaling to run with: own (as the model is) | none | F or linear:F (position "
             "interpolation by F) | dynamic:F | yarn:F")
_BASE_PREFIXES = ("hf:", "gguf:", "preset:")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """name (for tables and plots), cfg, variables {"params", "lora"?}, tokenizer (or None)."""

    name: str
    cfg: LlamaConfig
    variables: dict[str, Any]
    tokenizer: Any


def parse_rope(text: str) -> RopeScaling | None:
    """A RoPE variant -> the scaling to use (None = the model's own).

    "own" | "none" | "F" (a number: linear position interpolation by F, 1 = none) |
    "linear:F" | "dynamic:F" | "yarn:F".
    """
    text = text.strip()
    if text == "own":
        return None
    if text == "none":
        return RopeScaling()
    kind, _, factor = text.rpartition(":")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if kind not in ("", "linear", "dynamic", "yarn") or value is None or value < 1:
        raise ConfigError(f"rope variant {text!r}; valid: {', '.join(ROPE_KINDS)} with F >= 1")
    if not kind and value == 1:
        return RopeScaling()
    return RopeScaling(kind or "linear", factor=value)


def with_rope(cfg: LlamaConfig, rope: RopeScaling | None) -> LlamaConfig:
    """cfg with its RoPE scaling replaced (yarn keeps max_position_embeddings as original)."""
    if rope is None:
        return cfg
    if rope.rope_type == "yarn" and rope.original_max_position_embeddings is None:
        rope = dataclasses.replace(
            rope, original_max_position_embeddings=cfg.max_position_embeddings)
    return cfg.replace(rope_scaling=rope)


def rope_label(cfg: LlamaConfig) -> str:
    """"rope linear x4", "rope none", ... for tables and legends."""
    rs = cfg.rope_scaling
    return "rope none" if rs.rope_type == "default" else f"rope {rs.rope_type} x{rs.factor:g}"


def is_base_spec(source: str) -> bool:
    return source == "smollm2" or source.startswith(_BASE_PREFIXES)


def load_model(source: str, *, rope: RopeScaling | None = None, dtype: str = "float32",
               seed: int = 0) -> LoadedModel:
    """Loads `source` (see the module docstring) on the default device, weights as `dtype`.

    Bases are loaded with scanned layers (one compiled layer: fast compiles). Raises
    `FileNotFoundError` for a workdir without checkpoints and `ConfigError` for a bad spec.
    """
    if is_base_spec(source):
        spec = BaseSpec.parse(source)
        overrides = {"scan_layers": True, "dtype": dtype}
        if spec.kind == "preset":
            cfg = LlamaConfig.preset(spec.location, **overrides, param_dtype=dtype)
            init = jax.jit(LlamaForCausalLM(cfg).init)
            params = nn.unbox(init(jax.random.key(seed), np.zeros((1, 8), np.int32)))["params"]
            tokenizer = load_tokenizer("bytes", spec)
        elif spec.kind == "hf":
            cfg, params = load_pretrained(spec.location, dtype=dtype, config_overrides=overrides)
            tokenizer = load_tokenizer("auto", spec)
        else:
            cfg, params = load_gguf(spec.gguf_path(), dtype=dtype, config_overrides=overrides)
            tokenizer = load_tokenizer("auto", spec)
        variables, name = {"params": params}, str(spec)
    else:
        from longlora_jax import checkpointing

        workdir = pathlib.Path(source)
        if not workdir.is_dir():
            raise FileNotFoundError(
                f"model {source!r} is neither a training workdir nor a base spec "
                "(smollm2 | hf:DIR | gguf:FILE | preset:NAME)")
        cfg, variables, spec = checkpointing.restore_for_export(workdir, dtype=dtype)
        cfg = cfg.replace(dtype=dtype)
        tokenizer = load_tokenizer(_workdir_tokenizer(workdir), spec)
        name = workdir.name
    return LoadedModel(name, with_rope(cfg, rope), variables, tokenizer)


def place_variables(cfg: LlamaConfig, variables: dict, mesh: Mesh) -> dict:
    """`variables` on `mesh`, split by the logical-axis table (a no-op where already so)."""
    abstract = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0),
                              np.zeros((1, 8), np.int32))
    shardings = sharding.tree_shardings(mesh, abstract)
    return {k: jax.device_put(v, shardings[k]) for k, v in variables.items()}


def _workdir_tokenizer(workdir: pathlib.Path) -> str:
    from longlora_jax.checkpointing import Checkpointer

    checkpointer = Checkpointer(workdir, every=0, keep=1, async_save=False)
    try:
        return checkpointer.read_meta(checkpointer.steps()[-1]).get("tokenizer", "auto")
    finally:
        checkpointer.close()


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`ids -> text` without special tokens, for HF tokenizers and the byte tokenizer.

    A tokenizer without `skip_special_tokens` (the byte tokenizer) is given only the ids
    below its `vocab_size`: a random-init model's vocabulary may be larger.
    """
    try:
        params = inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        params = {}
    if "skip_special_tokens" in params:
        return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
    size = getattr(tokenizer, "vocab_size", None)
    return lambda ids: tokenizer.decode([int(i) for i in ids if size is None or int(i) < size])
