"""Where a run's frozen base model and tokenizer come from, named by one string.

    "smollm2"           the offline SmolLM2-135M-Instruct GGUF asset (`longlora_jax.assets`)
    "hf:DIR"            an HF checkpoint directory (config.json + safetensors)
    "gguf:FILE"         a LLaMA GGUF file
    "preset:NAME"       random initialisation of a `LlamaConfig` preset (e.g. "preset:tiny")

Tokenizers: "auto" (the base's own: HF dir or GGUF metadata), "bytes" (a 256-symbol byte
tokenizer, for random-init models), "llama2" (the offline LLaMA-2 SentencePiece model), or
"hf:DIR" (any HF tokenizer directory). Checkpoints store these strings, not the weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax

from longlora_jax import assets
from longlora_jax.modeling.config import ConfigError, LlamaConfig
from longlora_jax.train_step import TrainSetup, init_variables

BASE_KINDS = ("smollm2", "hf:DIR", "gguf:FILE", "preset:NAME")
TOKENIZERS = ("auto", "bytes", "llama2", "hf:DIR")


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """A parsed base-model string: kind in {"asset", "hf", "gguf", "preset"} and its location."""

    kind: str
    location: str

    @classmethod
    def parse(cls, spec: str) -> BaseSpec:
        if spec == "smollm2":
            return cls("asset", "smollm2")
        kind, sep, location = spec.partition(":")
        if not sep or kind not in ("hf", "gguf", "preset") or not location:
            raise ConfigError(f"model.base={spec!r}; valid forms: {', '.join(BASE_KINDS)}")
        if kind in ("hf", "gguf"):
            location = os.path.abspath(os.path.expanduser(location))
        return cls(kind, location)

    def __str__(self) -> str:
        return "smollm2" if self.kind == "asset" else f"{self.kind}:{self.location}"

    @property
    def is_hf(self) -> bool:
        return self.kind == "hf"

    def gguf_path(self) -> str:
        return str(assets.smollm2_gguf()) if self.kind == "asset" else self.location


def base_config(spec: BaseSpec, overrides: Mapping[str, Any] | None = None) -> LlamaConfig:
    """The base architecture (reads config.json or GGUF metadata only, no weights)."""
    overrides = dict(overrides or {})
    if spec.kind == "preset":
        return LlamaConfig.preset(spec.location, **overrides)
    if spec.kind == "hf":
        return LlamaConfig.from_hf(spec.location, **overrides)
    from longlora_jax.io.gguf import read_gguf_config

    return read_gguf_config(spec.gguf_path(), config_overrides=overrides)


def load_base_params(spec: BaseSpec, cfg: LlamaConfig, *, dtype: str, shardings: Any) -> dict:
    """Frozen base `params` for `cfg`'s layout, stored as `dtype`, placed by `shardings`.

    Only for checkpoint-backed bases; a "preset" base is initialised from the run's seed.
    """
    arch = {f: getattr(cfg, f) for f in ("scan_layers", "dtype")}
    if spec.kind == "hf":
        from longlora_jax.io.hf import load_pretrained

        _, params = load_pretrained(spec.location, dtype=dtype, shardings=shardings,
                                    config_overrides=arch)
    elif spec.kind in ("asset", "gguf"):
        from longlora_jax.io.gguf import load_gguf

        _, params = load_gguf(spec.gguf_path(), dtype=dtype, shardings=shardings,
                              config_overrides=arch)
    else:
        raise ConfigError(f"base {spec} has no weights to load (random init from the seed)")
    return params


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The PRNG keys a run derives from its seed (random base, LoRA init, dropout)."""
    base, lora, state = jax.random.split(jax.random.key(seed), 3)
    return {"base": base, "lora": lora, "state": state}


def initial_variables(setup: TrainSetup, spec: BaseSpec, *, seed: int, seq_len: int,
                      dtype: str) -> dict[str, Any]:
    """A run's starting variables on its mesh: the base (loaded, or initialised from the seed
    for a preset) plus fresh LoRA factors. Checkpoint-backed weights are stored as `dtype`.
    """
    keys = run_keys(seed)
    cfg = setup.model.cfg
    if spec.kind == "preset":
        return init_variables(setup, keys["base"], seq_len)
    params = load_base_params(spec, cfg, dtype=dtype, shardings=setup.variable_shardings["params"])
    variables = {"params": params}
    if cfg.lora_rank:
        variables.update(init_variables(setup, keys["lora"], seq_len, only=("lora",)))
    return variables


def load_tokenizer(tokenizer: str, spec: BaseSpec):
    """A tokenizer with `encode(text) -> ids` and `eos_token_id` (see `data.tokenizer`)."""
    if tokenizer == "bytes":
        from longlora_jax.data.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if tokenizer == "llama2":
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(assets.llama2_tokenizer_model().parent))
    from transformers import AutoTokenizer

    if tokenizer.startswith("hf:"):
        return AutoTokenizer.from_pretrained(tokenizer[3:], local_files_only=True)
    if tokenizer != "auto":
        raise ConfigError(f"model.tokenizer={tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
    if spec.kind == "hf":
        return AutoTokenizer.from_pretrained(spec.location, local_files_only=True)
    if spec.kind in ("asset", "gguf"):
        from longlora_jax.io.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(spec.gguf_path())
    raise ConfigError(
        f"model.tokenizer='auto' needs a base with a tokenizer, but {spec} is a random init; "
        "set model.tokenizer to 'bytes', 'llama2' or 'hf:DIR'"
    )
