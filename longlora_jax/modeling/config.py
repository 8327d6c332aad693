"""`LlamaConfig`: the architecture (HF `config.json` semantics) plus the LongLoRA knobs.

One frozen, hashable dataclass carries everything a model needs: the architecture fields that
round-trip through HF `config.json` (`from_hf` / `to_hf`), and the training-time settings
(S2-Attn, LoRA, dtypes, remat, scan) that never go into an exported config.

Every model family uses this one class (so every family has the same training knobs, and a
run's metadata rebuilds any of them with `from_dict`); `model_type` (HF's `config.json`
field) names the family, and a few fields only one family uses say where its block differs:

    llama      the LLaMA decoder (RMSNorm, SwiGLU, q/k/v/o projections, RoPE), GQA
    mistral    + `sliding_window` W: a query sees itself and the W - 1 tokens before it
    qwen2      + biases on q/k/v (`attention_bias`; Qwen2/2.5, large `rope_theta`)
    gpt_neox   GPT-NeoX / Pythia: fused head-interleaved `query_key_value`, partial rotary
               (`partial_rotary_factor`, HF's `rotary_pct`), parallel residual
               (`use_parallel_residual`), LayerNorm with bias, GELU MLP (`hidden_act`),
               untied `embed_out`; `attention_bias` puts biases on query_key_value and dense
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from longlora_jax.errors import CheckpointError, ConfigError
from longlora_jax.modeling import quant

HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_TRAIN = ("full", "s2", "short")
S2_GROUP_RULES = ("fixed", "longlora_sft")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
# HF `model_type`s this project builds; the first three share the LLaMA block.
MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_neox")
LLAMA_BLOCK = ("llama", "mistral", "qwen2")
# LoRA targets: the family's projection modules, named as HF (and so PEFT) names them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT_NEOX_LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# Per block (`LlamaConfig.block`): the valid LoRA targets, the default ones (the official
# LongLoRA fine-tune.py's: q/k/v/o for LLaMA, "query_key_value" and "dense" for GPT-NeoX) and
# the MLP activations ("gelu" is the exact erf GELU, the others HF's names of its tanh form).
BLOCK_LORA_TARGETS = {"llama": LORA_TARGETS, "gpt_neox": GPT_NEOX_LORA_TARGETS}
DEFAULT_LORA_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
                        "gpt_neox": ("query_key_value", "dense")}
HIDDEN_ACTS = {"llama": ("silu",),
               "gpt_neox": ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")}

# Per-type fields of a rope scaling block and whether HF requires them.
_ROPE_FIELDS: dict[str, dict[str, bool]] = {
    "default": {},
    "linear": {"factor": True},
    "dynamic": {"factor": True},
    "yarn": {
        "factor": True,
        "original_max_position_embeddings": False,
        "attention_factor": False,
        "beta_fast": False,
        "beta_slow": False,
        "mscale": False,
        "mscale_all_dim": False,
        "truncate": False,
    },
    "llama3": {
        "factor": True,
        "low_freq_factor": True,
        "high_freq_factor": True,
        "original_max_position_embeddings": True,
    },
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling with HF semantics (`rope_parameters` / `rope_scaling` of config.json).

    `rope_type` is one of `HF_ROPE_TYPES`; the other fields are read only by the types that use
    them (see `_ROPE_FIELDS`). `None` means "HF's default for that type".
    """

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def __post_init__(self):
        if self.rope_type not in HF_ROPE_TYPES:
            raise ConfigError(
                f"unknown rope scaling type {self.rope_type!r}; valid: {', '.join(HF_ROPE_TYPES)}"
            )
        for name, required in _ROPE_FIELDS[self.rope_type].items():
            if required and getattr(self, name) is None:
                raise ConfigError(f"rope scaling type {self.rope_type!r} needs field {name!r}")
        if self.factor is not None and self.factor < 1.0:
            raise ConfigError(f"rope scaling factor must be >= 1, got {self.factor}")

    @classmethod
    def from_hf(cls, block: Mapping[str, Any] | None) -> RopeScaling:
        """Parses an HF `rope_scaling` / `rope_parameters` dict (either spelling of the type)."""
        if not block:
            return cls()
        rope_type = block.get("rope_type", block.get("type", "default"))
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        used = _ROPE_FIELDS.get(rope_type, {})
        kwargs = {k: v for k, v in block.items() if k in known and k in used and v is not None}
        return cls(rope_type=rope_type, **kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF dict for this scaling, without `rope_theta` ({"rope_type": "default"} if none)."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        for name in _ROPE_FIELDS[self.rope_type]:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


ROPE_GRAMMAR = "base | default | linear:F | dynamic:F | yarn:F"
ROPE_EXTENSIONS = ("linear", "dynamic", "yarn")


def parse_rope(text: str) -> RopeScaling | None:
    """One RoPE variant in the project's one grammar -> its scaling (None for "base").

    base       the scaling the model already has (as loaded, or as its run trained it)
    default    plain RoPE, no scaling (HF's name for it)
    linear:F   linear position interpolation by F >= 1 (the paper's PI)
    dynamic:F  dynamic NTK scaling by F;  yarn:F  YaRN by F
    Every command spells it so (`rope.scaling`; training also takes "linear" etc. without
    ":F", F from its seq_len).
    """
    text = text.strip()
    if text == "base":
        return None
    if text == "default":
        return RopeScaling()
    kind, _, factor = text.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if kind not in ROPE_EXTENSIONS or value is None or value < 1:
        raise ConfigError(f"rope {text!r}; valid: {ROPE_GRAMMAR} (F >= 1)")
    return RopeScaling(kind, factor=value)


def rope_name(scaling: RopeScaling) -> str:
    """A scaling in the grammar of `parse_rope`: "default", "linear:4", ..."""
    if scaling.rope_type == "default":
        return "default"
    return f"{scaling.rope_type}:{scaling.factor:g}"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A decoder of any supported family (`model_type`) plus the LongLoRA training knobs.

    Architecture (round-trips through HF config.json):
      model_type: "llama" | "mistral" | "qwen2" | "gpt_neox" (see the module docstring).
      vocab_size V, hidden_size E, intermediate_size F, num_hidden_layers L,
      num_attention_heads Hq, num_key_value_heads Hkv, head_dim D (default E // Hq).
      rms_norm_eps: the norms' epsilon (GPT-NeoX: its LayerNorms', HF's `layer_norm_eps`).
      sliding_window W (mistral; None = full causal), attention_bias (qwen2: always True;
      gpt_neox: HF's `attention_bias`, default True; None picks the family's),
      partial_rotary_factor (gpt_neox `rotary_pct`: RoPE on the first D * factor dims of
      each head), use_parallel_residual (gpt_neox), hidden_act (MLP activation).
    Numerics: `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of
      newly initialised parameters; softmax, norms' statistics and the loss are always fp32.
    Training-time only (never exported):
      attention_train: "full" | "s2" | "short" (S2 without the shift: every head in the
        unshifted groups, the paper's ablation) -- attention used by `train=True` passes;
        evaluation and generation always use full causal attention.
      s2_group_size / s2_group_size_ratio: S2-Attn group G (explicit size wins over ratio * N).
      s2_group_rule: "fixed" (that G for every row) | "longlora_sft" (the official SFT rule,
        per row from its example's length; see `attention.longlora_sft_group`).
      s2_wrap: the paper's Algorithm 1 (last shifted group wraps around) instead of the
        official flash-attention segments.
      s2_sink_tokens: S > 0 makes the first S tokens visible to every group of S2 / short
        attention (attention sinks, SinkLoRA's fix of the train/test gap; `modeling.sinks`).
      attention_impl: "auto" | "xla" | "splash" | "cudnn" -- kernel backend.
      lora_rank r (0 disables LoRA), lora_alpha, lora_dropout, lora_targets (HF module
        names of the family's projections; None: the official LongLoRA ones, the attention
        projections).
      remat_policy: "none" | "full" | "dots" | "dots_no_batch" (what the backward pass may keep).
      scan_layers: run the L decoder layers with `nn.scan` (params get a leading layer axis).
      quantize: how the frozen decoder projections are stored: "none" (as `param_dtype`),
        "int8" (per output channel), "int4", "nf4" or "hqq4" (groups of 64 input rows),
        each 4-bit one also with double-quantized scales ("nf4+dq"); see
        `modeling.quant`. Embeddings, norms, biases, LoRA factors and the LM head stay in
        floating point.
      quantize_skip: projections (HF module names, as for lora_targets) kept in floating
        point when `quantize` is set, in every layer (bitsandbytes' skip modules).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Where a family's block differs from LLaMA's (module docstring).
    model_type: str = "llama"
    sliding_window: int | None = None
    attention_bias: bool | None = None
    partial_rotary_factor: float = 1.0
    use_parallel_residual: bool = False
    hidden_act: str | None = None
    # Numerics and memory.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    quantize: str = "none"
    quantize_skip: tuple[str, ...] = ()
    # S2-Attn.
    attention_train: str = "full"
    attention_impl: str = "auto"
    s2_group_size: int | None = None
    s2_group_size_ratio: float = 0.25
    s2_wrap: bool = False
    s2_group_rule: str = "fixed"
    s2_sink_tokens: int = 0
    # LoRA.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self):
        _check_model_type(self.model_type)
        defaults = {"attention_bias": self.model_type in ("qwen2", "gpt_neox"),
                    "hidden_act": HIDDEN_ACTS[self.block][0],
                    "lora_targets": DEFAULT_LORA_TARGETS[self.block]}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("lora_targets", "quantize_skip"):
            names = getattr(self, name)
            if isinstance(names, list | str):
                object.__setattr__(self, name, (names,) if isinstance(names, str) else tuple(names))
        if isinstance(self.rope_scaling, Mapping) or self.rope_scaling is None:
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(self.rope_scaling))
        self.validate()

    def validate(self) -> None:
        """Raises `ConfigError` (one line, naming the value) for an inconsistent config."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("attention_train", self.attention_train, ATTENTION_TRAIN)
        _check_choice("s2_group_rule", self.s2_group_rule, S2_GROUP_RULES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("quantize", self.quantize, quant.SCHEMES)
        if self.quantize not in ("none", "int8"):
            uneven = {n: i for n, (i, _) in self.projections().items() if i % quant.GROUP}
            if uneven:
                raise ConfigError(
                    f"quantize={self.quantize!r} stores groups of {quant.GROUP} input rows, but "
                    f"{', '.join(f'{n} has {i}' for n, i in uneven.items())} inputs; use "
                    "quantize 'int8' or 'none' for this model")
        group, ratio = self.s2_group_size, self.s2_group_size_ratio
        if group is not None and (group <= 0 or group % 2):
            raise ConfigError(f"s2_group_size must be a positive even number, got {group}")
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"s2_group_size_ratio must be in (0, 1], got {ratio}")
        if self.s2_sink_tokens < 0:
            raise ConfigError(f"s2_sink_tokens must be >= 0 (0: no sinks), got "
                              f"{self.s2_sink_tokens}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 disables LoRA), got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for target in self.lora_targets:
            _check_choice("lora target", target, BLOCK_LORA_TARGETS[self.block])
        for module in self.quantize_skip:
            _check_choice("quantize_skip module", module, BLOCK_LORA_TARGETS[self.block])
        self._validate_family()

    def _validate_family(self) -> None:
        """The family-specific fields: each only where its family has it."""
        kind = self.model_type
        _check_choice("hidden_act", self.hidden_act, HIDDEN_ACTS[self.block])
        window = self.sliding_window
        if window is not None and (kind != "mistral" or window <= 0):
            raise ConfigError(f"sliding_window={window}: only mistral has one (a positive "
                              f"number of tokens), not {kind}")
        if self.attention_bias != (kind == "qwen2") and kind != "gpt_neox":
            have = "always has" if kind == "qwen2" else "has no"
            raise ConfigError(f"attention_bias={self.attention_bias}: {kind} {have} q/k/v "
                              "biases")
        if kind != "gpt_neox" and (self.partial_rotary_factor != 1.0
                                   or self.use_parallel_residual):
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} / "
                              f"use_parallel_residual={self.use_parallel_residual} are GPT-NeoX "
                              f"fields; {kind} has full rotary and a sequential residual")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim < 2 or (
                self.rotary_dim % 2):
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives "
                              f"{self.rotary_dim} rotary dims of head_dim={self.head_dim}; "
                              "need an even number >= 2")
        if kind == "gpt_neox" and (self.num_key_value_heads != self.num_attention_heads
                                   or self.head_dim * self.num_attention_heads
                                   != self.hidden_size):
            raise ConfigError(
                f"gpt_neox has no GQA and head_dim = hidden_size / heads: got "
                f"num_key_value_heads={self.num_key_value_heads}, head_dim={self.head_dim} for "
                f"{self.num_attention_heads} heads of hidden_size={self.hidden_size}")

    # ----------------------------------------------------------------------------- derived

    @property
    def block(self) -> str:
        """The decoder block: "llama" (llama, mistral, qwen2) or "gpt_neox"."""
        return block_of(self.model_type)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones): D * partial_rotary_factor."""
        return int(self.head_dim * self.partial_rotary_factor)

    def projections(self) -> dict[str, tuple[int, int]]:
        """{HF module name: (in, out)} of one layer's projections (the LoRA-able matmuls)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        hq, hkv = self.num_attention_heads, self.num_key_value_heads
        if self.block == "gpt_neox":
            return {"query_key_value": (e, 3 * hq * d), "dense": (hq * d, e),
                    "dense_h_to_4h": (e, f), "dense_4h_to_h": (f, e)}
        return {"q_proj": (e, hq * d), "k_proj": (e, hkv * d), "v_proj": (e, hkv * d),
                "o_proj": (hq * d, e), "gate_proj": (e, f), "up_proj": (e, f),
                "down_proj": (f, e)}

    @property
    def num_query_groups(self) -> int:
        """Query heads per kv head (Hq // Hkv)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def context_length(self) -> int:
        """Longest context the (scaled) positions are meant for."""
        return self.max_position_embeddings

    @property
    def context_window(self) -> int:
        """Tokens the scaled positions cover: what evaluation may use without extrapolating.

        default: max_position_embeddings; linear (PI) and dynamic (NTK):
        max_position_embeddings * factor; yarn and llama3 (HF: max_position_embeddings is
        already the extended length when original_max_position_embeddings is set): the larger
        of max_position_embeddings and original_max_position_embeddings * factor.
        """
        rs = self.rope_scaling
        if rs.rope_type == "default":
            return self.max_position_embeddings
        if rs.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * rs.factor)
        original = rs.original_max_position_embeddings or self.max_position_embeddings
        return max(self.max_position_embeddings, int(original * rs.factor))

    def s2_group(self, seq_len: int) -> int:
        """S2-Attn group size G for a sequence of `seq_len` tokens (explicit size or ratio*N)."""
        if self.s2_group_size is not None:
            return self.s2_group_size
        group = round(seq_len * self.s2_group_size_ratio)
        return max(2, group - group % 2)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def with_rope(self, scaling: RopeScaling | None) -> LlamaConfig:
        """This config with its RoPE scaling replaced (None keeps it; see `parse_rope`).

        YaRN without an original context takes `max_position_embeddings` as the original.
        """
        if scaling is None:
            return self
        if scaling.rope_type == "yarn" and scaling.original_max_position_embeddings is None:
            scaling = dataclasses.replace(
                scaling, original_max_position_embeddings=self.max_position_embeddings)
        return self.replace(rope_scaling=scaling)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (a run's metadata keeps its model this way)."""
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling.to_hf()
        return out

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> LlamaConfig:
        """The inverse of `to_dict`; ConfigError for a field this version does not know."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"model config fields {unknown} are unknown to this version")
        return cls(**fields)

    def num_params(self) -> int:
        """Base-model parameter count (LoRA factors excluded)."""
        e, v = self.hidden_size, self.vocab_size
        projections = self.projections()
        layer = sum(i * o for i, o in projections.values())
        norm = 2 * e if self.block == "gpt_neox" else e  # LayerNorm: weight + bias
        if self.block == "gpt_neox":  # biases on the MLP always, on attention if attention_bias
            layer += sum(o for name, (_, o) in projections.items()
                         if name.startswith("dense_") or self.attention_bias)
        elif self.attention_bias:  # qwen2: q, k, v
            layer += sum(projections[name][1] for name in ("q_proj", "k_proj", "v_proj"))
        head = 0 if self.tie_word_embeddings else v * e
        return self.num_hidden_layers * (layer + 2 * norm) + v * e + head + norm

    # ----------------------------------------------------------------------------- HF I/O

    @classmethod
    def from_hf(
        cls, source: Mapping[str, Any] | str | os.PathLike, **overrides: Any
    ) -> LlamaConfig:
        """Reads an HF config.json dict, file or checkpoint directory.

        The family is the config's `model_type` (one of `MODEL_TYPES`; anything else is a
        one-line ConfigError). Accepts the transformers-4 spelling (`rope_theta` +
        `rope_scaling`; GPT-NeoX's `rotary_pct` / `rotary_emb_base`) and the transformers-5
        spelling (`rope_parameters` carrying `rope_theta`). `overrides` set non-architecture
        fields (dtype, LoRA, S2-Attn, ...).
        """
        hf = _read_hf_dict(source)
        if isinstance(source, Mapping):
            _check_hf_dict(hf, "the model config")
        model_type = hf.get("model_type", "llama")
        _check_model_type(model_type)
        rope_block = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope_block.get("rope_theta", hf.get("rope_theta", 10000.0))
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=RopeScaling.from_hf(rope_block),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
            hidden_act=hf.get("hidden_act"),
        )
        fields.update(_FROM_HF[block_of(model_type)](hf, rope_block))
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict (for `model_type`'s HF class) that transformers 4 and 5 load
        with the same rope scaling."""
        rope = self.rope_scaling.to_hf()
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            # transformers >= 5 reads this block ...
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            # ... transformers 4 reads these two.
            "rope_theta": self.rope_theta,
            "rope_scaling": self._legacy_rope_scaling(),
            "torch_dtype": self.param_dtype,
        }
        return _family_to_hf(self, out)

    def _legacy_rope_scaling(self) -> dict[str, Any] | None:
        """config.json's `rope_scaling` for transformers 4 readers: linear and dynamic as
        {"type", "factor"}, the only form transformers 4.34 (the official LongLoRA pin)
        accepts and one transformers 5 still reads; scalings 4.34 never knew (yarn, llama3)
        in the newer spelling, which old readers cannot use anyway."""
        rs = self.rope_scaling
        if rs.rope_type == "default":
            return None
        if rs.rope_type in ("linear", "dynamic"):
            return {"type": rs.rope_type, "factor": float(rs.factor)}
        return rs.to_hf()

    # ----------------------------------------------------------------------------- presets

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named architecture (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(MODEL_TYPES)}")


def block_of(model_type: str) -> str:
    """The decoder block of an HF model_type: "gpt_neox", or "llama" for the LLaMA family."""
    return "gpt_neox" if model_type == "gpt_neox" else "llama"


def _llama_from_hf(hf: Mapping[str, Any], rope_block: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a llama / mistral / qwen2 config.json that differ by family."""
    kind = hf.get("model_type", "llama")
    if kind == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{flag}=True is not supported (LLaMA decoders have no biases)")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError(
            f"qwen2 use_sliding_window=True (sliding_window={hf.get('sliding_window')} on layers "
            f">= max_window_layers={hf.get('max_window_layers')}) is not supported; released "
            "Qwen2/2.5 checkpoints use full attention (use_sliding_window=false)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported; {kind} uses 'silu'")
    return {"sliding_window": hf.get("sliding_window") if kind == "mistral" else None}


def _gpt_neox_from_hf(hf: Mapping[str, Any], rope_block: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-NeoX's own config.json spellings (transformers 4: rotary_pct, rotary_emb_base)."""
    return {
        "num_key_value_heads": None, "head_dim": None,
        "rms_norm_eps": hf.get("layer_norm_eps", 1e-5),
        "rope_theta": float(rope_block.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
        "partial_rotary_factor": float(
            rope_block.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
        "use_parallel_residual": bool(hf.get("use_parallel_residual", True)),
        "attention_bias": bool(hf.get("attention_bias", True)),
        "hidden_act": hf.get("hidden_act", "gelu"),
    }


_FROM_HF = {"llama": _llama_from_hf, "gpt_neox": _gpt_neox_from_hf}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


def _family_to_hf(cfg: LlamaConfig, out: dict[str, Any]) -> dict[str, Any]:
    """The LLaMA config.json `out` turned into `cfg.model_type`'s own."""
    out.update(architectures=[_ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
               hidden_act=cfg.hidden_act)
    if cfg.model_type == "llama":
        return out
    del out["mlp_bias"], out["attention_bias"]
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.model_type == "qwen2":  # q/k/v biases are built in; the window is off
        out.update(use_sliding_window=False, sliding_window=None)
    else:  # GPT-NeoX: its own names (transformers 4 reads rotary_*, 5 rope_parameters)
        for name in ("rms_norm_eps", "num_key_value_heads", "head_dim"):
            del out[name]
        out.update(layer_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias,
                   use_parallel_residual=cfg.use_parallel_residual,
                   rotary_pct=cfg.partial_rotary_factor, rotary_emb_base=cfg.rope_theta)
        out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    return out


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} {value!r} is not one of: {', '.join(valid)}")


def _read_hf_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json at {path!r}: an HF checkpoint directory needs one")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid UTF-8 JSON ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    _check_hf_dict(hf, path)
    return hf


_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_HF_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_ROPE_NUMBERS = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}


def _check_hf_dict(hf: Any, where: str) -> None:
    """ConfigError (one line) for a config whose architecture fields have the wrong types:
    sizes that are not positive integers, numbers that are not finite numbers, a rope block
    that is not an object of numbers, token ids that are not integers."""
    def bad(key: str, value: Any, what: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={value!r:.60} must be {what}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return ((is_int(value) or isinstance(value, float)) and math.isfinite(value))

    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: a model config is a JSON object, not a {type(hf).__name__}")
    for key in _HF_SIZES + _HF_OPTIONAL_SIZES:
        value = hf.get(key)
        if (value is not None or key in _HF_SIZES) and not (is_int(value) and value > 0):
            raise bad(key, value, "a positive integer")
    for key, value in hf.items():
        if key in ("rope_parameters", "rope_scaling") and value is not None:
            if not isinstance(value, dict):
                raise bad(key, value, "an object")
            for name, item in value.items():
                if name in _ROPE_NUMBERS and item is not None and not is_number(item):
                    raise bad(f"{key}.{name}", item, "a number")
        elif key.endswith(("_eps", "_theta", "_base", "_range", "_pct", "_factor")):
            if value is not None and not is_number(value):
                raise bad(key, value, "a number")
        elif key.endswith("token_id") and value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(is_int(i) for i in ids):
                raise bad(key, value, "an integer or a list of integers")
        elif key == "model_type" and not isinstance(value, str):
            raise bad(key, value, "a string")


def linear_pi_factor(seq_len: int, original_context: int) -> float:
    """Position-interpolation factor the official recipe uses: ceil(seq_len / original)."""
    return float(max(1, math.ceil(seq_len / original_context)))


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    ),
    "llama2-13b": dict(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
    ),
    "llama2-70b": dict(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
    ),
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001,
    ),
    # The other families: a tiny one each (CPU configs, tests) and a paper-sized member.
    "tiny-mistral": dict(
        model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, rms_norm_eps=1e-6, sliding_window=48,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "tiny-gpt-neox": dict(
        model_type="gpt_neox", vocab_size=512, hidden_size=64, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
        rms_norm_eps=1e-5, partial_rotary_factor=0.25, use_parallel_residual=True,
        hidden_act="gelu", bos_token_id=0, eos_token_id=0,
    ),
    "mistral-7b": dict(  # Mistral-7B-v0.1
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, sliding_window=4096,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "pythia-6.9b": dict(
        model_type="gpt_neox", vocab_size=50432, hidden_size=4096, intermediate_size=16384,
        num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
        partial_rotary_factor=0.25, use_parallel_residual=True, hidden_act="gelu",
        bos_token_id=0, eos_token_id=0,
    ),
}
