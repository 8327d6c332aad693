"""The training configuration: every field, its default, and how it becomes a LlamaConfig.

Configs under `configs/` start from `default_config()` and change what they need; any field
can be overridden on the command line (`--config.lora.rank=16`). Nothing here changes the
config it is given.
"""

from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import Mesh

from longlora_jax.cli.renames import Renamed
from longlora_jax.data.config import default_data_config, resolved_packing
from longlora_jax.data.pipeline import rows_per_epoch
from longlora_jax.errors import ConfigError
from longlora_jax.io.base import BaseSpec, base_config
from longlora_jax.modeling.config import (
    ROPE_EXTENSIONS,
    ROPE_GRAMMAR,
    LlamaConfig,
    RopeScaling,
    linear_pi_factor,
    parse_rope,
)
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.quant import SCHEMES
from longlora_jax.parallel.mesh import BATCH_AXES, DATA, MESH_AXES
from longlora_jax.training.optim import default_optim_config
from longlora_jax.training.step import StepOptions, TrainSetup, build_train_setup


def _rope_with_kind(scaling: str, kind) -> str:
    """`rope.scaling` after the retired `rope.type=kind` ("none" was the old "base")."""
    kind = "base" if str(kind) == "none" else str(kind)
    _, colon, factor = scaling.partition(":")
    return f"{kind}:{factor}" if colon and kind in ROPE_EXTENSIONS else kind


def _rope_with_factor(scaling: str, factor) -> str:
    """`rope.scaling` after the retired `rope.factor=factor` (0 = from seq_len)."""
    kind = scaling.partition(":")[0]
    value = float(factor)
    return f"{kind}:{value:g}" if value and kind in ROPE_EXTENSIONS else kind


# Retired spellings, accepted (with a warning) until the next release.
RENAMED = (
    Renamed("rope.type", "rope.scaling", _rope_with_kind),
    Renamed("rope.factor", "rope.scaling", _rope_with_factor),
)
# Short flag names of the training commands (`--rope linear:8`).
ALIASES = {"rope": "rope.scaling"}


def default_config() -> ml_collections.ConfigDict:
    """All training fields.

    model.base          where the frozen base comes from: "smollm2" | "hf:DIR" | "gguf:FILE" |
                        "preset:NAME" (random init; see `longlora_jax.io.base`).
    model.tokenizer     "auto" (the base's own; bytes for a random preset) | "bytes" | "hf:DIR"
                        | "standin-sp32k" (a stand-in vocabulary for random-init runs; see
                        `longlora_jax.io.base`).
    model.overrides     LlamaConfig architecture fields for a "preset:" base (e.g. layers).
    model.dtype         compute dtype ("bfloat16" on accelerators, "float32" on CPU).
    model.frozen_dtype  storage dtype of frozen weights; trainable leaves are always fp32.
    model.quantize      "none" | "int8" | "int4" | "nf4" | "hqq4", a 4-bit one + "+dq"
                        (e.g. "nf4+dq": double-quantized scales): store the frozen decoder
                        projections quantized (QLoRA; int8 per output channel, the 4-bit
                        schemes in groups of 64 input rows, quantized from frozen_dtype as
                        they load; see `modeling.quant`); lora.mode "lora" or "lora_plus"
                        only.
    model.quantize_skip projections kept in floating point under model.quantize, e.g.
                        "down_proj" (HF module names, as lora.targets).
    model.remat         "none" | "full" | "dots" | "dots_no_batch".
    model.scan          run the layers under nn.scan (faster compiles, one layer's memory).
    seq_len             training context length N.
    rope.scaling        context extension, in the project's RoPE grammar (`--rope` for
                        short): "linear:F" (position interpolation by F, the paper) |
                        "dynamic:F" | "yarn:F" | "base" (keep the base's own scaling) |
                        "default" (plain RoPE); "linear" etc. without ":F" take
                        F = ceil(seq_len / rope.original_context). (The retired rope.type +
                        rope.factor still work for one release, with a warning.)
    rope.original_context  the base's trained context; 0 = its max_position_embeddings.
    attention.train     "s2" (shifted sparse attention) | "full" | "short" (S2 without the
                        shift, the paper's ablation).
    attention.group_size_ratio / attention.group_size  S2 group G (size > 0 wins).
    attention.group_rule  "fixed" (that G for every row) | "longlora_sft" (each row's G from
                        its example's length, as the official SFT code; needs one example
                        per row: data.packing "pad", and mesh.sequence 1).
    attention.wrap      the paper's Algorithm 1 wrap-around for the last shifted group.
    attention.sink_tokens  S > 0: the first S tokens visible to every S2 group (attention
                        sinks, SinkLoRA's fix of the S2 train/test gap; xla or splash).
    attention.impl      "auto" | "xla" | "splash" | "cudnn".
    attention.mask_documents  keep packed documents from attending to each other.
    lora.mode           "lora" | "lora_plus" (LongLoRA: + embeddings and norms) | "full".
    lora.rank / alpha / dropout / targets   the adapters (rank ignored for mode "full");
                        targets are the family's HF module names (GPT-NeoX:
                        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h").
    optim.*             see `training.optim.default_optim_config`; total_steps 0 = max_steps.
    batch.global_batch  sequences per optimizer step (over all devices and processes).
    batch.micro_batch   sequences per forward pass; global/micro = gradient accumulation.
    max_steps           optimizer steps of the whole run (a resumed run continues to it).
    epochs              > 0: max_steps = ceil(epochs x rows per epoch / batch.global_batch)
                        instead, for one example per row (data.packing "pad", e.g. SFT).
    log_every           steps between metric lines (metrics.jsonl, TensorBoard).
    eval.every          steps between held-out evaluations (0 = never during training).
    eval.before / eval.after  evaluate before the first and after the last step.
    eval.seq_len        evaluation window (0 = seq_len); eval.protocol "nonoverlap" | "official".
    eval.max_windows    windows per evaluation (0 = all); eval.batch windows per forward.
    checkpoint.every / keep / async_save   orbax checkpoint cadence and retention.
    mesh.data / fsdp / sequence / tensor   device mesh; one axis may be -1 (the rest).
    data.*              see `longlora_jax.data.config.default_data_config`.
    loss_chunk          tokens per chunk of the chunked cross-entropy.
    seed                initialisation, dropout and data order.
    workdir             the run directory (checkpoints, metrics); `--workdir DIR` sets it.
    aot.topology        the TPU slice `python -m longlora_jax.aot` compiles for (v4-8, ...).
    aot.json / compare_full / table   the fit report's JSON file, a second compile with
                        full attention, and a directory of reports to tabulate instead.
    """
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        base="preset:tiny", tokenizer="auto", overrides=ml_collections.ConfigDict(),
        dtype="float32", frozen_dtype="bfloat16", remat="full", scan=True, quantize="none",
        quantize_skip=(),
    ))
    c.seq_len = 2048
    c.rope = ml_collections.ConfigDict(dict(scaling="linear", original_context=0))
    c.attention = ml_collections.ConfigDict(dict(
        train="s2", group_size_ratio=0.25, group_size=0, group_rule="fixed", wrap=False,
        sink_tokens=0, impl="auto", mask_documents=False,
    ))
    c.lora = ml_collections.ConfigDict(dict(
        mode="lora_plus", rank=8, alpha=16.0, dropout=0.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    ))
    c.optim = default_optim_config()
    c.optim.total_steps = 0
    c.batch = ml_collections.ConfigDict(dict(global_batch=8, micro_batch=0))
    c.max_steps = 1000
    c.epochs = 0.0
    c.log_every = 10
    c.eval = ml_collections.ConfigDict(dict(
        every=0, before=True, after=True, seq_len=0, protocol="nonoverlap", max_windows=16,
        batch=1,
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True))
    c.mesh = ml_collections.ConfigDict({**dict.fromkeys(MESH_AXES, 1), DATA: -1})
    c.data = default_data_config()
    c.loss_chunk = 1024
    c.seed = 0
    c.workdir = ""
    c.aot = ml_collections.ConfigDict(dict(topology="", json="", compare_full=False, table=""))
    return c


def rope_scaling(config: ml_collections.ConfigDict, base: LlamaConfig) -> RopeScaling:
    """The context-extension scaling `config.rope.scaling` for `config.seq_len` on `base`."""
    text = config.rope.scaling.strip()
    kind, colon, _ = text.partition(":")
    if kind in ROPE_EXTENSIONS and not colon:
        original = config.rope.original_context or base.max_position_embeddings
        text = f"{kind}:{linear_pi_factor(config.seq_len, original):g}"
    try:
        scaling = parse_rope(text)
    except ConfigError:
        raise ConfigError(f"rope.scaling={config.rope.scaling!r}; valid: {ROPE_GRAMMAR} (F >= 1;"
                          " without :F, F = seq_len / rope.original_context)") from None
    if scaling is None or (scaling.rope_type in ROPE_EXTENSIONS and scaling.factor <= 1.0):
        return base.rope_scaling  # the base's own, or its window already covers seq_len
    if kind == "yarn":
        original = config.rope.original_context or base.max_position_embeddings
        return RopeScaling("yarn", factor=scaling.factor, original_max_position_embeddings=original)
    return scaling


def model_config(config: ml_collections.ConfigDict) -> tuple[LlamaConfig, BaseSpec]:
    """The run's LlamaConfig (base architecture + extension + S2 + LoRA + numerics)."""
    spec = BaseSpec.parse(config.model.base)
    overrides = dict(config.model.overrides)
    if overrides and spec.kind != "preset":
        raise ConfigError(
            f"model.overrides {sorted(overrides)} only apply to a preset base, not {spec}"
        )
    base = base_config(spec, overrides)
    lora_on = config.lora.mode in ("lora", "lora_plus")
    if config.model.quantize not in SCHEMES:
        raise ConfigError(f"model.quantize={config.model.quantize!r}; valid: "
                          f"{', '.join(SCHEMES)}")
    if config.model.quantize != "none" and not lora_on:
        raise ConfigError(f"model.quantize={config.model.quantize!r} keeps the base frozen, "
                          f"but lora.mode={config.lora.mode!r} trains it; use lora.mode "
                          "'lora' or 'lora_plus', or model.quantize='none'")
    cfg = base.replace(
        rope_scaling=rope_scaling(config, base),
        dtype=config.model.dtype,
        param_dtype="float32",
        remat_policy=config.model.remat,
        scan_layers=config.model.scan,
        quantize=config.model.quantize,
        quantize_skip=tuple(config.model.quantize_skip),
        attention_train=config.attention.train,
        attention_impl=config.attention.impl,
        s2_group_size=config.attention.group_size or None,
        s2_group_size_ratio=config.attention.group_size_ratio,
        s2_wrap=config.attention.wrap,
        s2_group_rule=config.attention.group_rule,
        s2_sink_tokens=config.attention.sink_tokens,
        lora_rank=config.lora.rank if lora_on else 0,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        lora_targets=tuple(config.lora.targets),
    )
    if lora_on and cfg.lora_rank <= 0:
        raise ConfigError(f"lora.rank={config.lora.rank} must be > 0 for mode {config.lora.mode!r}")
    if cfg.s2_group_rule == "longlora_sft":
        if resolved_packing(config.data) != "pad":
            raise ConfigError("attention.group_rule='longlora_sft' needs one example per row "
                              "(data.packing 'pad', the default for sft_json)")
        if config.mesh.sequence != 1:
            raise ConfigError("attention.group_rule='longlora_sft' needs mesh.sequence=1 (each "
                              "row's whole sequence on one device)")
        return cfg, spec
    check_seq_len(cfg, config.seq_len, config.mesh.sequence)
    return cfg, spec


def check_seq_len(cfg: LlamaConfig, seq_len: int, sequence_shards: int) -> None:
    """Raises ConfigError when S2-Attn (or the sequence split) cannot use `seq_len`."""
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be >= 2")
    if sequence_shards > 1 and seq_len % sequence_shards:
        raise ConfigError(f"seq_len={seq_len} is not divisible by mesh.sequence={sequence_shards}")
    if cfg.attention_train == "full":
        return
    group = cfg.s2_group(seq_len)
    if group > seq_len or seq_len % group:
        raise ConfigError(
            f"S2-Attn group size {group} does not divide seq_len={seq_len}; pick a seq_len that "
            f"is a multiple of it or set attention.group_size (even, dividing seq_len)"
        )
    if sequence_shards > 1 and (seq_len // sequence_shards) % group:
        raise ConfigError(
            f"seq_len/mesh.sequence = {seq_len // sequence_shards} is not a multiple of the S2 "
            f"group {group}; S2 stays shard-local only when each shard holds whole groups"
        )


def batch_sizes(config: ml_collections.ConfigDict, mesh) -> tuple[int, int]:
    """(global batch, gradient-accumulation steps), checked against the mesh."""
    global_batch = config.batch.global_batch
    micro = config.batch.micro_batch or global_batch
    if global_batch <= 0 or micro <= 0 or global_batch % micro:
        raise ConfigError(
            f"batch.global_batch={global_batch} must be a positive multiple of "
            f"batch.micro_batch={micro}"
        )
    data_ways = mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]
    if micro % data_ways:
        raise ConfigError(
            f"batch.micro_batch={micro} must be a multiple of mesh data*fsdp={data_ways}"
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"batch.global_batch={global_batch} must be a multiple of the process count "
            f"{jax.process_count()}"
        )
    return global_batch, global_batch // micro


def with_epochs_resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` itself when `epochs` is 0, else a copy whose max_steps counts those epochs."""
    if config.epochs <= 0:
        return config
    rows = rows_per_epoch(config.data)
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.max_steps = math.ceil(config.epochs * rows / config.batch.global_batch)
    return resolved


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config.optim` with `total_steps` 0 resolved to `max_steps`."""
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    if optim.total_steps <= 0:
        optim.total_steps = config.max_steps
    return optim


def build_setup(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainSetup, BaseSpec, int]:
    """(TrainSetup, base spec, global batch) of a training config on `mesh`; abstract only.

    Shared by training and ahead-of-time compilation.
    """
    cfg, spec = model_config(config)
    global_batch, accum = batch_sizes(config, mesh)
    setup = build_train_setup(
        build_model(cfg), mesh, mode=config.lora.mode, optim_cfg=optim_config(config),
        options=StepOptions(accum_steps=accum, loss_chunk=config.loss_chunk,
                            mask_documents=config.attention.mask_documents),
        frozen_dtype=config.model.frozen_dtype,
    )
    return setup, spec, global_batch
