"""HF safetensors checkpoints <-> params, converted tensor by tensor.

Layout of the params pytree (see `longlora_jax.modeling.llama`): names mirror HF's, kernels
are stored [in, out] (HF's `weight` transposed), and the decoder layers are either
`layers_{i}/...` or, with `cfg.scan_layers`, one `layers/...` stack with a leading axis L.
`TensorName` / `tensor_names` / `lookup_hf` / `lookup_path` are the ONE name table (one per
model family, chosen by the config: LLaMA and Mistral, Qwen2 with its q/k/v biases,
GPT-NeoX), used by loading, saving, GGUF import and adapter export.

Loading never holds two full copies of the model in host memory: every parameter (a
scanned stack included) is built by `jax.make_array_from_callback`, whose callback
preallocates the block a device needs and fills it layer by layer from memory-mapped
safetensors. With target shardings each process only reads the slices of its own devices.
A quantized base (`cfg.quantize`) is quantized here, one tensor at a time, as it is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from longlora_jax.errors import CheckpointError, first_line
from longlora_jax.modeling import quant
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.families import build_model

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
# Tensors some checkpoints carry that the model recomputes: RoPE tables, and old GPT-NeoX
# checkpoints' causal-mask buffers.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")

# ------------------------------------------------------------------------------ name table

# (path in params, HF tensor name, HF stores the transpose of our array)
_Entry = tuple[tuple[str, ...], str, bool]


@dataclasses.dataclass(frozen=True)
class _Table:
    """A family's HF names. Top level: the token embedding, the final norm's tensors and the
    untied output projection; `layer`: paths inside one decoder layer and the HF names after
    `prefix` + "{i}."."""

    embed: _Entry
    norms: tuple[_Entry, ...]
    head: _Entry
    layer: tuple[_Entry, ...]
    prefix: str

    @property
    def top(self) -> tuple[_Entry, ...]:
        return (self.embed, *self.norms, self.head)


def _projection(module: str, name: str, bias: bool) -> tuple[_Entry, ...]:
    """A linear layer's kernel (transposed: HF stores [out, in]) and optionally its bias."""
    weight = ((module, name, "kernel"), f"{module}.{name}.weight", True)
    return (weight, ((module, name, "bias"), f"{module}.{name}.bias", False))[:1 + bias]


def _norm(name: str, bias: bool) -> tuple[_Entry, ...]:
    return (((name, "weight"), f"{name}.weight", False),
            ((name, "bias"), f"{name}.bias", False))[:1 + bias]


def _llama_table(qkv_bias: bool) -> _Table:
    """LLaMA and Mistral; Qwen2 (`qkv_bias`) adds q/k/v biases."""
    return _Table(
        embed=(("embed_tokens", "embedding"), "model.embed_tokens.weight", False),
        norms=((("norm", "weight"), "model.norm.weight", False),),
        head=(("lm_head", "kernel"), "lm_head.weight", True),
        layer=(*_norm("input_layernorm", False),
               *(e for p in ("q_proj", "k_proj", "v_proj")
                 for e in _projection("self_attn", p, qkv_bias)),
               *_projection("self_attn", "o_proj", False),
               *_norm("post_attention_layernorm", False),
               *(e for p in ("gate_proj", "up_proj", "down_proj")
                 for e in _projection("mlp", p, False))),
        prefix="model.layers.",
    )


def _gpt_neox_table(attention_bias: bool) -> _Table:
    """GPT-NeoX: LayerNorms with bias, biased MLP, attention biased per `attention_bias`."""
    return _Table(
        embed=(("embed_in", "embedding"), "gpt_neox.embed_in.weight", False),
        norms=tuple((path, f"gpt_neox.{name}", t)
                    for path, name, t in _norm("final_layer_norm", True)),
        head=(("embed_out", "kernel"), "embed_out.weight", True),
        layer=(*_norm("input_layernorm", True), *_norm("post_attention_layernorm", True),
               *_projection("attention", "query_key_value", attention_bias),
               *_projection("attention", "dense", attention_bias),
               *_projection("mlp", "dense_h_to_4h", True),
               *_projection("mlp", "dense_4h_to_h", True)),
        prefix="gpt_neox.layers.",
    )


def _table(cfg: LlamaConfig | None) -> _Table:
    """The name table of `cfg`'s family (None: a LLaMA decoder)."""
    if cfg is None or cfg.block == "llama":
        return _llama_table(cfg is not None and cfg.attention_bias)
    return _gpt_neox_table(cfg.attention_bias)


SCANNED_LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class TensorName:
    """One HF tensor and where it lives in the params pytree.

    hf: e.g. "model.layers.3.self_attn.q_proj.weight".
    path: e.g. ("layers_3", "self_attn", "q_proj", "kernel"), or ("layers", ...) when scanned.
    layer: index into the leading L axis of a scanned stack (None otherwise).
    transpose: HF stores [out, in], we store [in, out].
    """

    hf: str
    path: tuple[str, ...]
    layer: int | None
    transpose: bool


def _layer_entry(table: _Table, layer: int, sub: tuple[str, ...], hf_suffix: str,
                 transpose: bool, scan_layers: bool) -> TensorName:
    path = (SCANNED_LAYERS, *sub) if scan_layers else (f"layers_{layer}", *sub)
    return TensorName(f"{table.prefix}{layer}.{hf_suffix}", path,
                      layer if scan_layers else None, transpose)


def tensor_names(cfg: LlamaConfig) -> list[TensorName]:
    """Every tensor of a checkpoint for `cfg`, in HF order (params layout per cfg.scan_layers)."""
    table = _table(cfg)
    names = [TensorName(table.embed[1], table.embed[0], None, table.embed[2])]
    for layer in range(cfg.num_hidden_layers):
        names += [_layer_entry(table, layer, sub, hf, t, cfg.scan_layers)
                  for sub, hf, t in table.layer]
    names += [TensorName(name, path, None, t) for path, name, t in table.norms]
    if not cfg.tie_word_embeddings:
        names.append(TensorName(table.head[1], table.head[0], None, table.head[2]))
    return names


def output_projection(cfg: LlamaConfig) -> str:
    """The HF name of `cfg`'s output projection ("lm_head.weight", GPT-NeoX "embed_out.weight"),
    which a tied model shares with its token embedding."""
    return _table(cfg).head[1]


def lookup_hf(hf: str, *, scan_layers: bool = False,
              cfg: LlamaConfig | None = None) -> TensorName:
    """The table entry for an HF tensor name in `cfg`'s family (None: LLaMA);
    `CheckpointError` if the model has no such tensor."""
    table = _table(cfg)
    for path, name, transpose in table.top:
        if hf == name:
            return TensorName(hf, path, None, transpose)
    if hf.startswith(table.prefix):
        index, _, suffix = hf[len(table.prefix):].partition(".")
        for sub, name, transpose in table.layer:
            if suffix == name and index.isdigit():
                return _layer_entry(table, int(index), sub, name, transpose, scan_layers)
    family = "LLaMA" if cfg is None else cfg.model_type
    raise CheckpointError(f"tensor {hf!r} is not part of a {family} decoder checkpoint")


def lookup_path(path: tuple[str, ...], layer: int | None = None, *,
                cfg: LlamaConfig | None = None) -> TensorName:
    """The table entry for a params path (`layer` indexes a scanned `layers` stack) in
    `cfg`'s family (None: LLaMA)."""
    table = _table(cfg)
    path = tuple(path)
    for top, name, transpose in table.top:
        if path == top:
            return TensorName(name, path, None, transpose)
    head, sub = path[0], path[1:]
    if head == SCANNED_LAYERS and layer is None:
        raise CheckpointError(f"params path {'/'.join(path)} is a scanned stack: give `layer`")
    if head == SCANNED_LAYERS or (head.startswith("layers_") and head[7:].isdigit()):
        index = layer if head == SCANNED_LAYERS else int(head[7:])
        for layer_sub, name, transpose in table.layer:
            if sub == layer_sub:
                return _layer_entry(table, index, sub, name, transpose, head == SCANNED_LAYERS)
    raise CheckpointError(f"params path {'/'.join(path)} has no HF tensor name")


# ------------------------------------------------------------------------------ assembling


def param_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {params path: shape} of `build_model(cfg)` (abstract init, no memory)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(build_model(cfg).init, jax.random.key(0), ids)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _index_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(size)[s]) for size, s in zip(shape, index, strict=True))


def assemble_params(
    cfg: LlamaConfig,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str, tuple[slice, ...]], np.ndarray],
    *,
    dtype: Any,
    shardings: Any = None,
    source: str = "checkpoint",
) -> dict:
    """Builds the params pytree from HF-layout tensors, one parameter at a time.

    shapes: {HF name: HF shape} of every tensor the source has.
    read(name, index): the block `tensor[index]` (HF layout) as a numpy array.
    dtype: storage dtype of the result. shardings: None (default device), one Sharding for
    every leaf, or a pytree of Shardings matching the params.
    Raises `CheckpointError` for a missing or mis-shaped tensor (one line, naming it).
    """
    expected = param_shapes(cfg)
    by_path: dict[tuple[str, ...], list[TensorName]] = {}
    for name in tensor_names(cfg):
        by_path.setdefault(name.path, []).append(name)
    _check_tensors(cfg, shapes, expected, by_path, source)
    unexpected = sorted(
        set(shapes) - {n.hf for names in by_path.values() for n in names}
        - {n for n in shapes if n.endswith(_IGNORED_SUFFIXES)}
    )
    if unexpected:
        log.warning("%s: ignoring %d tensors the model does not use: %s", source,
                    len(unexpected), ", ".join(unexpected[:8]))
    flat_shardings = _flat_shardings(shardings, expected)
    dtype = jnp.dtype(dtype)
    out = {}
    for path, shape in expected.items():
        if quant.is_group_leaf(path):
            continue  # built with its kernel
        if (*path[:-1], quant.SCALE) in expected:
            stored = quant.leaves(shape, (None,) * len(shape), cfg.quantize, dtype)
            built = _quantized_leaves(by_path[path], read, dtype, cfg.quantize, {
                name: (leaf.shape, leaf.dtype, flat_shardings[(*path[:-1], name)])
                for name, leaf in stored.items()})
            out.update({(*path[:-1], name): array for name, array in built.items()})
            continue
        out[path] = jax.make_array_from_callback(
            shape, flat_shardings[path], _block_reader(by_path[path], shape, read, dtype)
        )
    return traverse_util.unflatten_dict(out)


def _check_tensors(cfg, shapes, expected, by_path, source) -> None:
    table = _table(cfg)
    embed = table.embed[1]
    if embed in shapes and shapes[embed][0] != cfg.vocab_size:
        raise CheckpointError(
            f"{source}: vocab_size={cfg.vocab_size} in the config but {embed} has "
            f"{shapes[embed][0]} rows; make config vocab_size match the embedding"
        )
    for path, names in by_path.items():
        one = expected[path][1:] if names[0].layer is not None else expected[path]
        want = tuple(reversed(one)) if names[0].transpose else one
        for name in names:
            if name.hf not in shapes:
                hint = " (tie_word_embeddings is false)" if name.hf == table.head[1] else ""
                raise CheckpointError(
                    f"{source}: missing tensor {name.hf} (expected shape {list(want)}){hint}"
                )
            if tuple(shapes[name.hf]) != want:
                raise CheckpointError(
                    f"{source}: tensor {name.hf} has shape {list(shapes[name.hf])}, "
                    f"expected {list(want)} from the config"
                )


def _flat_shardings(shardings, expected) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(expected, shardings)
    flat = traverse_util.flatten_dict(nn.meta.unbox(shardings))
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) ^ set(flat))
        raise CheckpointError(f"shardings do not match the params; differing paths: {missing[:4]}")
    return flat


def _quantized_leaves(names: list[TensorName], read, dtype, scheme: str,
                      leaves: dict[str, tuple[tuple[int, ...], Any, jax.sharding.Sharding]]
                      ) -> dict[str, jax.Array]:
    """The stored leaves (`quant.leaves`) of one quantized kernel (a scanned stack: one tensor
    per layer), by name.

    `leaves`: {name: (shape, dtype, sharding)} of the codes and the group parameters. Each HF
    tensor is read whole once (an int8 scale needs every input row of its column), cast to
    the storage `dtype`, quantized, and its parts copied into the blocks this process's
    devices hold; so the host holds one layer's tensor in float at a time, plus the quantized
    blocks.
    """
    stacked = names[0].layer is not None
    blocks = {}  # per leaf: (shape, {block key: (index, numpy block, [devices])})
    for name, (shape, leaf_dtype, sharding) in leaves.items():
        unique: dict[tuple, tuple] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in unique:
                unique[key] = (index, np.empty(_index_shape(shape, index), leaf_dtype), [])
            unique[key][2].append(device)
        blocks[name] = (shape, unique)
    for layer, name in enumerate(names):
        block = read(name.hf, (slice(None), slice(None)))
        w_io = (block.T if name.transpose else block).astype(dtype)
        quantized = quant.quantize(w_io, scheme, dtype)
        for leaf, (shape, unique) in blocks.items():
            array = quantized[leaf]
            for index, out, _ in unique.values():
                if not stacked:
                    out[...] = array[index]
                elif layer in (rows := range(shape[0])[index[0]]):
                    out[rows.index(layer)] = array[index[1:]]
    return {leaf: jax.make_array_from_single_device_arrays(shape, leaves[leaf][2], [
                jax.device_put(out, device) for _, out, devices in unique.values()
                for device in devices])
            for leaf, (shape, unique) in blocks.items()}


def _block_reader(names: list[TensorName], shape, read, dtype):
    """Callback for make_array_from_callback: index (our layout) -> numpy block."""
    stacked = names[0].layer is not None

    def one(name: TensorName, index: tuple[slice, ...]) -> np.ndarray:
        block = read(name.hf, index[::-1] if name.transpose else index)
        return (block.T if name.transpose else block).astype(dtype, copy=False)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not stacked:
            return np.ascontiguousarray(one(names[0], index))
        out = np.empty(_index_shape(shape, index), dtype)
        for row, layer in enumerate(range(shape[0])[index[0]]):
            out[row] = one(names[layer], index[1:])
        return out

    return callback


# ------------------------------------------------------------------------------ loading


def find_weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint dir (sharded index or single file).

    Raises `CheckpointError` for a missing directory, or a pickle-only checkpoint.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if (path / SAFE_INDEX).is_file():
        weight_map = json.loads((path / SAFE_INDEX).read_text()).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{path / SAFE_INDEX} has no weight_map")
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if pickles:
        raise CheckpointError(
            f"{str(path)!r} has only pickle weights ({', '.join(pickles[:3])}), which are never "
            "loaded; convert once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {str(path)!r}")


def open_safetensors(files: list[pathlib.Path], stack: ExitStack) -> dict[str, Any]:
    """{tensor name: lazy slice} of safetensors `files`, kept open by `stack`.

    The safetensors library checks each header against its file (its length, every tensor's
    byte range inside the data, dtype sizes) before anything is read; a file that fails is
    one CheckpointError line naming it, never a partial read.
    """
    slices = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{SAFE_INDEX} names {file.name}, which is missing")
        try:
            handle = stack.enter_context(safe_open(file, framework="numpy"))
            names = handle.keys()  # a safe_open handle is not iterable
            slices.update({name: handle.get_slice(name) for name in names})
        except SafetensorError as err:
            raise CheckpointError(f"{file}: not a readable safetensors file "
                                  f"({first_line(err)})") from None
    return slices


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    shardings: Any = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> tuple[LlamaConfig, dict]:
    """Reads an HF checkpoint dir (config.json + safetensors) -> (config, params).

    Any supported family (`config.json`'s model_type: llama, mistral, qwen2, gpt_neox);
    `build_model(config)` is its module.

    dtype: storage dtype of the params (default: `param_dtype` in config_overrides, else the
      checkpoint's); the returned config's `param_dtype` says which.
    shardings: None (default device), a Sharding for every leaf, or a pytree of Shardings
      matching the params (e.g. `sharding.tree_shardings`); each process reads only its shards.
    config_overrides: LlamaConfig fields to set (scan_layers, dtype, LoRA, ...).
    Never loads pickles and never runs checkpoint code.
    """
    path = pathlib.Path(path)
    files = find_weight_files(path)
    overrides = dict(config_overrides or {})
    cfg = LlamaConfig.from_hf(path, **overrides)
    with ExitStack() as stack:
        slices = open_safetensors(files, stack)
        shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        if dtype is None:
            dtype = overrides.get("param_dtype") or _checkpoint_dtype(slices, cfg)
        dtype = jnp.dtype(dtype)
        cfg = cfg.replace(param_dtype=dtype.name)
        params = assemble_params(
            cfg, shapes, lambda name, index: slices[name][index], dtype=dtype,
            shardings=shardings, source=str(path),
        )
    return cfg, params


def _checkpoint_dtype(slices, cfg: LlamaConfig) -> str:
    embed = slices.get(_table(cfg).embed[1])
    kind = embed.get_dtype() if embed is not None else "F32"
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(kind, "float32")


# ------------------------------------------------------------------------------ saving


def _to_host(x) -> np.ndarray:
    """A (possibly sharded, multi-host) array as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def hf_tensors(cfg: LlamaConfig, params, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF-layout numpy tensor) for every weight, one parameter gathered at a time."""
    if "params" in params and _table(cfg).embed[0][0] not in params:
        raise CheckpointError("pass the params tree itself, not {'params': ...} variables")
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    by_path: dict[tuple[str, ...], list[TensorName]] = {}
    for name in tensor_names(cfg):
        by_path.setdefault(name.path, []).append(name)
    if set(flat) != set(by_path):
        extra = sorted("/".join(p) for p in set(flat) - set(by_path))
        missing = sorted("/".join(p) for p in set(by_path) - set(flat))
        raise CheckpointError(
            f"params do not match the config (scan_layers={cfg.scan_layers}, tied="
            f"{cfg.tie_word_embeddings}): missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for path, names in by_path.items():
        host = _to_host(flat[path])
        if dtype is not None:
            host = host.astype(dtype)
        for name in names:
            array = host[name.layer] if name.layer is not None else host
            yield name.hf, np.ascontiguousarray(array.T if name.transpose else array)


def save_pretrained(
    cfg: LlamaConfig,
    params: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> pathlib.Path:
    """Writes an HF checkpoint: config.json + safetensors (sharded with an index if large).

    params: scanned or unscanned, plain or flax-boxed, host or (multi-host) sharded arrays;
      gathered to the host one parameter at a time. dtype: cast on write (default: as stored).
    The files are written to a temporary directory first and moved into `out_dir` with the
    entry file (index or model.safetensors) last, so a crash never leaves a checkpoint that
    looks complete. In a multi-process run every process must call this; process 0 writes.
    Returns `out_dir`.
    """
    out_dir = pathlib.Path(out_dir)
    writer = jax.process_index() == 0
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    if writer:
        tmp.mkdir(parents=True)
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str], int]] = []  # (temp file, tensor names, bytes)

    def flush():
        file = f"part-{len(written):05d}.safetensors"
        if writer:
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            (tmp / file).chmod(_file_mode())  # safetensors writes 0600
        written.append((file, list(shard), sum(a.nbytes for a in shard.values())))
        shard.clear()

    try:
        saved_dtype, shard_bytes = None, 0
        for name, array in hf_tensors(cfg, params, dtype):
            saved_dtype = array.dtype if saved_dtype is None else saved_dtype
            if shard and shard_bytes + array.nbytes > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[name] = array
            shard_bytes += array.nbytes
        flush()
        if writer:
            _finish(cfg, tmp, out_dir, written, saved_dtype)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _file_mode() -> int:
    """0666 minus the process umask: what an ordinary file write would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _finish(cfg, tmp: pathlib.Path, out_dir: pathlib.Path, written, saved_dtype) -> None:
    """Names the shards, writes config.json and the index, and moves them into `out_dir`."""
    hf_config = cfg.to_hf()
    hf_config["torch_dtype"] = np.dtype(saved_dtype).name
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    order = ["config.json"]
    if len(written) == 1:
        (tmp / written[0][0]).rename(tmp / SAFE_SINGLE)
        order.append(SAFE_SINGLE)
    else:
        weight_map, total = {}, 0
        for k, (file, names, nbytes) in enumerate(written):
            final = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            (tmp / file).rename(tmp / final)
            weight_map.update(dict.fromkeys(names, final))
            order.append(final)
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        order.append(SAFE_INDEX)
    if not out_dir.exists():
        tmp.rename(out_dir)  # atomic: the checkpoint appears complete or not at all
        return
    # Replace in place: drop the old entry file first, move the new one in last.
    for old in [out_dir / SAFE_INDEX, out_dir / SAFE_SINGLE, *out_dir.glob("model-*.safetensors")]:
        old.unlink(missing_ok=True)
    for file in order:
        os.replace(tmp / file, out_dir / file)
