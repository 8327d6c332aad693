"""Where a run's frozen base model and its tokenizer come from, each named by one string.

Bases (`model.base`):
    "smollm2"        the offline SmolLM2-135M-Instruct GGUF asset (`data.assets`)
    "hf:DIR"         an HF checkpoint directory (config.json + safetensors)
    "gguf:FILE"      a LLaMA GGUF file
    "preset:NAME"    random initialisation of a `LlamaConfig` preset, from the run's seed

Tokenizers (`model.tokenizer`): "auto" (the base's own: the HF directory's or the GGUF
metadata's; for a random-init preset, the byte tokenizer), "bytes" (a 256-symbol byte
tokenizer), "hf:DIR" (any HF tokenizer directory) or "standin-sp32k" (Mistral-7B-v0.1's
SentencePiece model from the offline assets: LLaMA-2's size and special ids but not its
vocabulary, a stand-in for random-init throughput runs). `check_tokenizer` refuses a
tokenizer whose ids do not fit the model's embedding and warns about one that fits but is not
the base's own. Checkpoints store these strings, never the weights of the base.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from transformers import AutoTokenizer, LlamaTokenizer

from longlora_jax.data import assets
from longlora_jax.data.tokenizer import ByteTokenizer
from longlora_jax.errors import ConfigError, first_line
from longlora_jax.io.gguf import load_gguf, load_gguf_tokenizer, read_gguf_config
from longlora_jax.io.hf import load_pretrained
from longlora_jax.modeling import quant
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.families import build_model
from longlora_jax.parallel import rules

BASE_KINDS = ("smollm2", "hf:DIR", "gguf:FILE", "preset:NAME")
TOKENIZERS = ("auto", "bytes", "standin-sp32k", "hf:DIR")


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


def is_base_spec(source: str) -> bool:
    """Whether `source` names a base model (rather than a training workdir)."""
    return source == "smollm2" or source.startswith(("hf:", "gguf:", "preset:"))


def base_config(spec: BaseSpec, overrides: Mapping[str, Any] | None = None) -> LlamaConfig:
    """The base architecture (reads config.json or GGUF metadata only, no weights)."""
    overrides = dict(overrides or {})
    if spec.kind == "preset":
        return LlamaConfig.preset(spec.location, **overrides)
    if spec.kind == "hf":
        return LlamaConfig.from_hf(spec.location, **overrides)
    return read_gguf_config(spec.gguf_path(), config_overrides=overrides)


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The PRNG keys a run derives from its seed (random base, LoRA init, dropout)."""
    base, lora, state = jax.random.split(jax.random.key(seed), 3)
    return {"base": base, "lora": lora, "state": state}


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """The model's variables as boxed ShapeDtypeStructs (logical names kept; no memory)."""
    ids = np.zeros((1, 8), np.int32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), ids)


def variable_shardings(model: nn.Module, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings of every variable of `model` on `mesh`, from the logical-axis table."""
    return rules.tree_shardings(mesh, abstract_variables(model))


def init_variables(model: nn.Module, shardings: Mapping[str, Any], rng: jax.Array, *,
                   only: Sequence[str] | None = None) -> dict[str, Any]:
    """Randomly initialised variables, placed by `shardings` ({collection: tree}).

    only: the collections to create, e.g. ("lora",) to add fresh adapters to a loaded base
    without materialising a random copy of the base weights (XLA drops what is not returned).
    """
    keep = tuple(shardings) if only is None else tuple(only)

    def init(key):
        variables = nn.unbox(model.init(key, np.zeros((1, 8), np.int32), train=False))
        return {k: v for k, v in variables.items() if k in keep}

    return jax.jit(init, out_shardings={k: shardings[k] for k in keep})(rng)


def load_base_params(spec: BaseSpec, cfg: LlamaConfig, *, seed: int, dtype: str,
                     shardings: Any) -> dict[str, Any]:
    """The frozen base `params` for `cfg`'s layout, stored as `dtype`, placed by `shardings`.

    A "preset" base is initialised from `run_keys(seed)["base"]`, as its run did. With
    `cfg.quantize` the projection kernels are quantized from their `dtype` values (scales in
    `dtype`): by the loader as it reads each tensor, or on the devices for a preset.
    """
    arch = {f: getattr(cfg, f) for f in ("scan_layers", "dtype", "quantize", "quantize_skip")}
    if spec.kind == "preset":  # initialised in fp32 and then cast, whatever `dtype`
        float_cfg = cfg.replace(param_dtype="float32", quantize="none")
        modules = quant.quantized_modules(shardings)
        float_shardings = traverse_util.unflatten_dict({
            path: s for path, s in traverse_util.flatten_dict(shardings).items()
            if not quant.is_group_leaf(path)})
        params = init_variables(build_model(float_cfg), {"params": float_shardings},
                                run_keys(seed)["base"], only=("params",))["params"]
        return jax.jit(lambda p: quant.quantize_tree(
            jax.tree.map(lambda x: x.astype(dtype), p), cfg.quantize, modules),
            out_shardings=shardings)(params)
    if spec.kind == "hf":
        _, params = load_pretrained(spec.location, dtype=dtype, shardings=shardings,
                                    config_overrides=arch)
    else:
        _, params = load_gguf(spec.gguf_path(), dtype=dtype, shardings=shardings,
                              config_overrides=arch)
    return params


def initial_variables(spec: BaseSpec, cfg: LlamaConfig, *, seed: int, dtype: str,
                      shardings: Mapping[str, Any]) -> dict[str, Any]:
    """A run's starting variables: the base (loaded, or from the seed) plus fresh LoRA factors.

    shardings: {collection: tree of shardings} (`variable_shardings`).
    """
    variables = {"params": load_base_params(spec, cfg, seed=seed, dtype=dtype,
                                            shardings=shardings["params"])}
    if cfg.lora_rank:
        variables.update(init_variables(build_model(cfg), shardings, run_keys(seed)["lora"],
                                        only=("lora",)))
    return variables


def shard_variables(cfg: LlamaConfig, variables: Mapping[str, Any], mesh: Mesh) -> dict:
    """`variables` placed on `mesh` by the logical-axis table (a no-op where already so)."""
    shardings = variable_shardings(build_model(cfg), mesh)
    return {k: jax.device_put(v, shardings[k]) for k, v in variables.items()}


def load_tokenizer(tokenizer: str, spec: BaseSpec):
    """A tokenizer with `encode(text) -> ids` and `eos_token_id` (see `data.tokenizer`)."""
    if tokenizer == "llama2":
        raise ConfigError(
            "model.tokenizer='llama2' named Mistral-7B-v0.1's vocabulary, never LLaMA-2's; use "
            "'auto' (a real base's own tokenizer, e.g. with model.base=hf:DIR) or "
            "'standin-sp32k' (the same stand-in, named for what it is)")
    if tokenizer == "bytes" or (tokenizer == "auto" and spec.kind == "preset"):
        return ByteTokenizer()
    if tokenizer == "standin-sp32k":
        return LlamaTokenizer.from_pretrained(str(assets.mistral_tokenizer_model().parent))
    if tokenizer.startswith("hf:"):
        return _hf_tokenizer(tokenizer[3:])
    if tokenizer != "auto":
        raise ConfigError(f"model.tokenizer={tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
    if spec.kind == "hf":
        if not has_own_tokenizer(spec):
            raise ConfigError(f"model.tokenizer='auto' but the base {spec} has no tokenizer "
                              f"files ({', '.join(TOKENIZER_FILES)}); set model.tokenizer")
        return _hf_tokenizer(spec.location)
    return load_gguf_tokenizer(spec.gguf_path())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# What transformers raises for tokenizer files it cannot parse (JSON, encodings, missing or
# wrongly typed fields); the `tokenizers` library raises a bare `Exception` (caught by type).
_TOKENIZER_FILE_ERRORS = (ValueError, OSError, KeyError, TypeError, AttributeError, IndexError,
                          RecursionError)


def _hf_tokenizer(location: str):
    """The HF tokenizer of a local directory; ConfigError (one line, naming the directory and
    the parser's complaint) when its files cannot be read."""
    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=True)
    except Exception as err:
        if type(err) is not Exception and not isinstance(err, _TOKENIZER_FILE_ERRORS):
            raise
        raise ConfigError(f"the tokenizer files in {location} cannot be read "
                          f"({type(err).__name__}: {first_line(err)[:200]})") from None


def has_own_tokenizer(spec: BaseSpec) -> bool:
    """Whether the base brings a tokenizer (GGUF metadata, or tokenizer files in an HF dir)."""
    if spec.kind == "hf":
        return any(os.path.isfile(os.path.join(spec.location, f)) for f in TOKENIZER_FILES)
    return spec.kind in ("asset", "gguf")


def tokenizer_size(tokenizer) -> int:
    """How many ids the tokenizer can produce (added and special tokens included)."""
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    return int(tokenizer.vocab_size)


def check_tokenizer(tokenizer, tokenizer_name: str, cfg: LlamaConfig, spec: BaseSpec) -> None:
    """ConfigError when the tokenizer's ids do not fit the model's embedding; a warning when
    it fits but is not the base's own (`tokenizer_name` other than "auto" for a base that has
    a tokenizer, with a different vocabulary)."""
    size = tokenizer_size(tokenizer)
    if size > cfg.vocab_size:
        raise ConfigError(
            f"model.tokenizer={tokenizer_name!r} has {size} ids but the model's embedding "
            f"({spec}) has {cfg.vocab_size} rows; use the base's own tokenizer "
            "(model.tokenizer='auto') or one whose ids fit")
    if tokenizer_name == "auto" or not has_own_tokenizer(spec):
        return
    own = load_tokenizer("auto", spec)
    if own.get_vocab() != getattr(tokenizer, "get_vocab", dict)():
        warnings.warn(f"model.tokenizer={tokenizer_name!r} is not the tokenizer of the base "
                      f"{spec} (their vocabularies differ): the model will read ids it was "
                      "not trained on", stacklevel=2)
