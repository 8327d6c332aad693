"""Export a trained run: a merged HF checkpoint, a PEFT LoRA adapter (+ LoRA+ weights), GGUF.

`export_run(workdir, out, format=...)` is what `python -m longlora_jax.export` calls:

- merged: an HF directory (config.json with the training rope scaling + safetensors) with
  every adapter folded into its kernel; `transformers.AutoModelForCausalLM` loads it. A
  quantized base (QLoRA) is dequantized into the dtype it was quantized from (the run's
  `model.frozen_dtype`) before the adapters are folded in: the merged model is the one the
  run trained and evaluated.
- peft: `adapter_config.json` + `adapter_model.safetensors` for
  `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), O)`. LoRA+
  embeddings and norms travel as PEFT `modules_to_save` (full copies that replace the base's);
  with tied embeddings the embedding/LM-head matrix is saved under both names and the config
  sets `ensure_weight_tying`, so PEFT keeps them one matrix.

- gguf: `O/model.gguf` for llama.cpp (and transformers' GGUF loader): the merged model as
  f32, f16 or q8_0 (`gguf.type`), training rope scaling and tokenizer included (a GGUF base's
  tokenizer keys are copied from its file); see `io.gguf_export` for what is written.

The adapter's `base_model_name_or_path` is the base the run was trained on *with the training
rope scaling*: the HF base directory itself when its config.json already has that scaling;
otherwise `O/base`, an HF directory holding the base weights (hard links to the HF base's
files where possible) and a config.json carrying the training rope scaling. A base that is
not an HF directory (the GGUF asset, a random init) is always written to `O/base`. A
quantized run's adapter goes on the full-precision base, as QLoRA adapters do (a random-init
base is written dequantized, the only form it had). So
`AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])` always
runs at the trained context length.

The run's HF tokenizer (if it has one) is saved with either export. `export_run` takes the
trainable mode from the checkpoint, so a full fine-tune is never cut down to an adapter.

Outputs are built in a temporary sibling directory and renamed into place; a non-empty `O`
is only replaced with `overwrite=True`. The HF tensor names come from
`io.hf`'s one name table.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from longlora_jax.errors import ConfigError
from longlora_jax.io.base import BaseSpec, is_base_spec, load_base_params, load_tokenizer
from longlora_jax.io.gguf_export import check_exportable, write_gguf
from longlora_jax.io.hf import lookup_path, output_projection, save_pretrained
from longlora_jax.io.run import load_model, load_run
from longlora_jax.modeling import quant
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.lora import (
    LORA_COLLECTION,
    TRAINABLE,
    merge_lora,
    param_kind,
    trainable_labels,
)

FORMATS = ("merged", "peft", "gguf")
GGUF_FILE = "model.gguf"
PEFT_MODES = ("lora", "lora_plus")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT matches modules_to_save by name suffix: these cover the embedding and every norm, with
# each family's HF module names (LLaMA block; GPT-NeoX, whose LayerNorms carry biases too).
LORA_PLUS_MODULES = ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm")
GPT_NEOX_LORA_PLUS_MODULES = ("embed_in", "input_layernorm", "post_attention_layernorm",
                              "final_layer_norm")
# (GPT-NeoX's transformers-4 names too: transformers 5 reads them when rope_scaling is set.)
_ROPE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings",
              "rotary_pct", "rotary_emb_base")


# ------------------------------------------------------------------------------ merged


def export_merged(
    cfg: LlamaConfig,
    variables: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: Any = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes an HF checkpoint of the trained model, adapters merged (see module docstring).

    variables: {"params": ..., "lora": ...} (a run without LoRA, i.e. full fine-tuning, is
    exported as is). tokenizer: an HF tokenizer to save alongside (`save_pretrained`).
    dtype: storage dtype (default: that of the frozen kernels, e.g. bf16).
    """
    cfg, params = merged_params(cfg, variables)
    with _atomic_dir(out_dir, overwrite) as tmp:
        save_pretrained(cfg, params, tmp, dtype=dtype or _kernel_dtype(params))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return pathlib.Path(out_dir)


def merged_params(cfg: LlamaConfig, variables: Mapping[str, Any]) -> tuple[LlamaConfig, Any]:
    """(config without LoRA, params with every adapter folded in)."""
    if variables.get(LORA_COLLECTION):
        return merge_lora(cfg, variables)
    return cfg.replace(lora_rank=0), nn.unbox(variables["params"])


# ------------------------------------------------------------------------------ GGUF


def export_gguf(
    cfg: LlamaConfig,
    variables: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    tokenizer: Any = None,
    source_gguf: str | os.PathLike | None = None,
    name: str = "",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `out_dir/model.gguf`, the merged model as `gguf_type` (see `io.gguf_export`).

    tokenizer: the run's tokenizer (HF or bytes); source_gguf: the GGUF file of the base,
    whose tokenizer keys are copied instead. ConfigError, before anything is written, for a
    family, type or rope scaling GGUF cannot carry. Returns the file's path.
    """
    check_exportable(cfg, gguf_type)
    cfg, params = merged_params(cfg, variables)
    with _atomic_dir(out_dir, overwrite) as tmp:
        write_gguf(cfg, params, tmp / GGUF_FILE, gguf_type=gguf_type, tokenizer=tokenizer,
                   source_gguf=source_gguf, name=name)
    return pathlib.Path(out_dir) / GGUF_FILE


# ------------------------------------------------------------------------------ PEFT


def export_peft(
    cfg: LlamaConfig,
    variables: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    mode: str = "lora_plus",
    base_dir: str | os.PathLike | None = None,
    base_params: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a PEFT LoRA adapter directory for the run (see module docstring).

    mode: what trained ("lora" or "lora_plus"); "lora_plus" also saves the token embeddings
      and every RMSNorm weight as `modules_to_save`.
    base_dir: the HF directory of the frozen base the run started from, or None for a
      non-HF base (GGUF asset, random init), which is then written to `out_dir/base`.
    base_params: the pretrained params written to `out_dir/base` (non-HF base only);
      default `variables["params"]`, whose frozen leaves are the base's. For "lora_plus" its
      embeddings/norms are then the trained ones: PEFT(base + adapter) is unchanged, but
      `disable_adapter()` would not bring back the pretrained embeddings/norms.
    tokenizer: an HF tokenizer saved with the adapter (and into `out_dir/base` when written).
    Raises `ConfigError` for a run without LoRA factors or a mode PEFT cannot express.
    """
    if not variables.get(LORA_COLLECTION) or not cfg.lora_rank:
        raise ConfigError(
            f"the run has no LoRA adapters (lora_rank={cfg.lora_rank}), so there is no PEFT "
            "adapter to export; use --format merged"
        )
    if mode not in PEFT_MODES:
        raise ConfigError(
            f"mode {mode!r} cannot be a PEFT adapter; valid: {', '.join(PEFT_MODES)} "
            "(a full fine-tune exports with --format merged)"
        )
    tensors = _peft_tensors(cfg, variables, mode)
    with _atomic_dir(out_dir, overwrite) as tmp:
        base = _write_base(cfg, variables, tmp, pathlib.Path(out_dir), base_dir, base_params)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        adapter = _adapter_config(cfg, mode, base)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            if (tmp / "base").is_dir() and base_dir is None:
                tokenizer.save_pretrained(tmp / "base")
    return pathlib.Path(out_dir)


def _adapter_config(cfg: LlamaConfig, mode: str, base: str) -> dict[str, Any]:
    """The LoraConfig fields PEFT reads (the rest take PEFT's defaults)."""
    tied = mode == "lora_plus" and cfg.tie_word_embeddings
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_targets),
        "modules_to_save": list(lora_plus_modules(cfg)) if mode == "lora_plus" else None,
        "ensure_weight_tying": tied,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def lora_plus_modules(cfg: LlamaConfig) -> tuple[str, ...]:
    """The HF module names of what LoRA+ trains besides the adapters (PEFT modules_to_save)."""
    return GPT_NEOX_LORA_PLUS_MODULES if cfg.block == "gpt_neox" else LORA_PLUS_MODULES


def _peft_tensors(cfg: LlamaConfig, variables: Mapping[str, Any], mode: str) -> dict:
    """{PEFT state-dict key: fp32 numpy tensor} for the adapters (and LoRA+ weights)."""
    labels = traverse_util.flatten_dict(trainable_labels(variables, mode))
    out: dict[str, np.ndarray] = {}
    for path, leaf in traverse_util.flatten_dict(nn.unbox(dict(variables))).items():
        if labels[path] != TRAINABLE:
            continue
        collection, sub = path[0], path[1:]
        array = np.asarray(leaf, np.float32)
        stacked = cfg.scan_layers and sub[0] == "layers"
        for layer in range(array.shape[0]) if stacked else (None,):
            block = array[layer] if stacked else array
            if collection == LORA_COLLECTION:
                module = lookup_path((*sub[:-1], "kernel"), layer, cfg=cfg).hf
                module = module.removesuffix(".weight")
                factor = {"a": "lora_A", "b": "lora_B"}[sub[-1]]
                out[f"{PEFT_PREFIX}{module}.{factor}.weight"] = block.T
            else:
                name = lookup_path(sub, layer, cfg=cfg).hf
                out[PEFT_PREFIX + name] = block
                if param_kind(path) == "embedding" and cfg.tie_word_embeddings:
                    out[PEFT_PREFIX + output_projection(cfg)] = block
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _write_base(cfg, variables, tmp: pathlib.Path, out: pathlib.Path, base_dir,
                base_params) -> str:
    """Where the adapter's base lives (absolute path), writing `tmp/base` when needed."""
    base_cfg = cfg.replace(lora_rank=0)
    if base_dir is not None:
        base_dir = pathlib.Path(base_dir).absolute()
        hf_config = json.loads((base_dir / "config.json").read_text())
        if _same_rope(LlamaConfig.from_hf(hf_config), base_cfg):
            return str(base_dir)
        # Same weights, training rope scaling: link the files, rewrite config.json.
        shutil.copytree(base_dir, tmp / "base", copy_function=_link_or_copy)
        trained = base_cfg.to_hf()
        hf_config.update({k: trained[k] for k in _ROPE_KEYS if k in trained})
        (tmp / "base" / "config.json").unlink()
        (tmp / "base" / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    else:  # (a quantized preset base is written dequantized: what the adapter trained on)
        params = nn.unbox(base_params if base_params is not None else variables["params"])
        params = quant.dequantize_tree(params, cfg.quantize)
        save_pretrained(base_cfg, params, tmp / "base", dtype=_kernel_dtype(params))
    return str(out.absolute() / "base")


def _same_rope(a: LlamaConfig, b: LlamaConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in
               ("rope_theta", "rope_scaling", "max_position_embeddings"))


# ------------------------------------------------------------------------------ helpers


def _kernel_dtype(params: Mapping[str, Any]) -> Any:
    """The storage dtype of the projection kernels (what the frozen base is kept in)."""
    for path, leaf in traverse_util.flatten_dict(params).items():
        if param_kind(("params", *path)) == "kernel":
            return jnp.dtype(leaf.dtype)
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[pathlib.Path]:
    """A fresh temporary sibling of `out_dir`, renamed to `out_dir` if the body succeeds."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; set overwrite (--overwrite) to "
                          "replace it")
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{tag}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ------------------------------------------------------------------------------ a run


def default_config() -> ml_collections.ConfigDict:
    """The export command's settings: workdir, out, format ("merged" | "peft" | "gguf"), step
    (-1 = newest), mode (peft: what trained, "" = the run's own), dtype (merged: storage
    dtype, "" = the frozen kernels'), gguf.type (gguf: f32 | f16 | q8_0), overwrite (replace
    a non-empty out)."""
    return ml_collections.ConfigDict(dict(workdir="", out="", format="merged", step=-1, mode="",
                                          dtype="", gguf=dict(type="f16"), overwrite=False))


def export_run(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, format: str,
               step: int | None = None, mode: str | None = None, dtype: str | None = None,
               gguf_type: str = "f16", overwrite: bool = False) -> pathlib.Path:
    """Exports checkpoint `step` (default: newest) of a training workdir as `format`.

    workdir may also name a base model (smollm2 | hf:DIR | gguf:FILE | preset:NAME, as
    `io.run.load_model` takes) for the merged and gguf formats: e.g. SmolLM2 as GGUF.
    mode (peft only): what trained, default the run's own. dtype (merged only): storage
    dtype, default the frozen kernels'. gguf_type (gguf only): f32 | f16 | q8_0. The run's HF
    tokenizer is saved alongside (embedded in the GGUF file).
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}; valid: {', '.join(FORMATS)}")
    if is_base_spec(str(workdir)):
        return _export_base(str(workdir), out_dir, format=format, dtype=dtype,
                            gguf_type=gguf_type, overwrite=overwrite)
    run = load_run(workdir, step=step)
    tokenizer = load_tokenizer(run.meta["tokenizer"], run.base)
    if format == "gguf":
        own = run.base.kind in ("asset", "gguf") and run.meta["tokenizer"] == "auto"
        return export_gguf(run.cfg, run.variables, out_dir, gguf_type=gguf_type,
                           tokenizer=tokenizer, source_gguf=run.base.gguf_path() if own else None,
                           name=pathlib.Path(workdir).name, overwrite=overwrite)
    tokenizer = tokenizer if hasattr(tokenizer, "save_pretrained") else None  # HF ones only
    if format == "merged":
        return export_merged(run.cfg, run.variables, out_dir, tokenizer=tokenizer, dtype=dtype,
                             overwrite=overwrite)
    base = run.base
    base_params = None
    if base.kind in ("asset", "gguf"):  # the pristine base for O/base
        base_params = load_base_params(base, run.cfg.replace(lora_rank=0, quantize="none"),
                                       seed=run.meta["seed"], dtype="float32", shardings=None)
    return export_peft(run.cfg, run.variables, out_dir, mode=mode or run.mode,
                       base_dir=base.location if base.is_hf else None,
                       base_params=base_params, tokenizer=tokenizer, overwrite=overwrite)


def _export_base(source: str, out_dir: str | os.PathLike, *, format: str, dtype: str | None,
                 gguf_type: str, overwrite: bool) -> pathlib.Path:
    """A base model (and its adapter, with BASE+ADAPTER) exported as merged or gguf."""
    if format == "peft":
        raise ConfigError(f"{source!r} is a base model: there is no trained adapter to export "
                          "as peft; use --format merged or gguf, or a training workdir")
    model = load_model(source)
    if format == "merged":
        tokenizer = model.tokenizer if hasattr(model.tokenizer, "save_pretrained") else None
        return export_merged(model.cfg, model.variables, out_dir, tokenizer=tokenizer,
                             dtype=dtype, overwrite=overwrite)
    spec = BaseSpec.parse(source.partition("+")[0])
    return export_gguf(model.cfg, model.variables, out_dir, gguf_type=gguf_type,
                       tokenizer=model.tokenizer,
                       source_gguf=spec.gguf_path() if spec.kind in ("asset", "gguf") else None,
                       name=model.name, overwrite=overwrite)
