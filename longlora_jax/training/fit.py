"""Will a run fit? The fit report behind `python -m longlora_jax.aot`.

`fit_report(config)` compiles the exact training step of a config for a TPU slice from any
host (libtpu installed, no TPU needed; like MaxText's `train_compile`) and reports whether it
fits:

- per-chip memory from the compiler (arguments, outputs, temporaries, code; total) against
  the HBM XLA:TPU lets a program use (v4: 30.75 of 32 GiB), and `fits`;
- compile seconds; the attention kernels in the compiled step (TPU splash custom calls, and
  softmax ops of the XLA reference, which must be absent on TPU);
- FLOPs: the compiler's cost analysis (`xla_flops`; XLA counts a while-loop body once, so
  scanned layers and accumulation steps appear once, and Pallas kernels not at all) and the
  step's model FLOPs per chip (`model_flops`, counted from the architecture), whose time at
  the chip's peak bf16 rate is `est_step_seconds` (a lower bound: 100% utilisation).

Nothing is allocated: the step is built from abstract shapes (`build_setup` +
`TrainSetup.lower`). The mesh is the config's `mesh.*`, which must match the slice's chips.
`attention.impl=auto` means splash attention on a TPU target. `not_fitting_message` names
the biggest contributors of a step that does not fit. `aot.compare_full` also compiles the
same run with full causal attention, reported under `full_attention`; `report_table` turns
saved reports into the README's markdown table.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from longlora_jax.errors import ConfigError, first_line
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.parallel.mesh import MESH_AXES, SEQUENCE, TENSOR, make_mesh, resolve_mesh_shape
from longlora_jax.parallel.topology import GIB, TpuSlice, parse_topology, topology_devices
from longlora_jax.training.config import build_setup


def check_mesh(config: ml_collections.ConfigDict, tpu: TpuSlice) -> dict[str, int]:
    """The config's mesh sizes on the slice; ConfigError if they do not multiply to its chips."""
    try:
        return resolve_mesh_shape(dict(config.mesh), tpu.chips)
    except ConfigError as err:
        raise ConfigError(
            f"config mesh {dict(config.mesh)} does not match {tpu.name} ({tpu.chips} chips): "
            f"{err}"
        ) from None


def for_tpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the TPU attention kernel: impl auto -> splash."""
    config = ml_collections.ConfigDict(config.to_dict())
    impl = config.attention.impl
    if impl == "cudnn":
        raise ConfigError("attention.impl='cudnn' is GPU-only; use auto, splash or xla for TPU")
    if impl == "auto":
        config.attention.impl = "splash"
    return config


# ----------------------------------------------------------------------------- FLOPs


def model_flops(cfg: LlamaConfig, *, tokens: int, seq_len: int, mode: str,
                attention_copies: int = 1, recompute: bool = True) -> float:
    """FLOPs of one training step over `tokens` tokens of sequences of `seq_len`.

    Matmuls: forward 2·M·T, activation gradients 2·M·T (every weight, frozen ones too),
    weight gradients 2·M_trainable·T, and with remat "full" the layers' forward once more.
    M counts the decoder layers' projections (the family's: `cfg.projections()`) and the LM
    head's weights (+ LoRA factors); biases and norms are elementwise, not counted. Attention
    per layer and query: 4·Hq·D·k FLOPs forward (scores and values) over the k keys it sees
    (k ≈ G/2 in causal groups of G, G = N for full attention; fewer under a sliding window),
    2.5x that backward (flash style: scores recomputed), and once more under remat "full".
    recompute=False counts what the step needs rather than what it executes (MaxText's MFU:
    no remat forward, attention backward 2x its forward).
    attention_copies: how many devices each compute the same attention (full attention over a
    gathered sequence split S ways: S), so the result is the FLOPs executed rather than the
    useful ones.
    """
    v, e, layers = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    dims = cfg.projections()
    layer_w = sum(a * b for a, b in dims.values())
    lora_w = sum(cfg.lora_rank * (a + b) for name, (a, b) in dims.items()
                 if name in cfg.lora_targets) if cfg.lora_rank else 0
    dense = layers * (layer_w + lora_w) + v * e
    trainable = dense if mode == "full" else layers * lora_w
    rematted = layers * (layer_w + lora_w) if recompute and cfg.remat_policy == "full" else 0
    matmul = 2 * tokens * (2 * dense + trainable + rematted)
    return float(matmul + attention_copies * attention_flops(
        cfg, tokens=tokens, seq_len=seq_len, recompute=recompute))


def attention_flops(cfg: LlamaConfig, *, tokens: int, seq_len: int,
                    recompute: bool = True) -> float:
    """The training attention's FLOPs in one step (see `model_flops`): per layer and query
    4·Hq·D·k forward over the k keys it sees (`keys_per_query`: ~G/2 in causal groups of G,
    G = N for full attention, fewer under a sliding window), x (1 + 2.5 backward + 1 under
    remat "full"); without `recompute`, x (1 + 2)."""
    sparse = cfg.attention_train in ("s2", "short")
    group = cfg.s2_group(seq_len) if sparse else seq_len
    forward = (4 * cfg.num_attention_heads * cfg.head_dim * tokens
               * keys_per_query(group, cfg.sliding_window))
    if not recompute:
        return float(forward * cfg.num_hidden_layers * 3)
    return float(forward * cfg.num_hidden_layers
                 * (1 + 2.5 + (1 if cfg.remat_policy == "full" else 0)))


def keys_per_query(group: int, window: int | None = None) -> float:
    """Mean keys a query sees in causal groups of G: (G + 1) / 2; with a sliding window W < G
    the first W positions see 1..W keys and the other G - W see W."""
    if window is None or window >= group:
        return (group + 1) / 2
    return (window * (window + 1) / 2 + (group - window) * window) / group


# ----------------------------------------------------------------------------- compile


def attention_kernels(hlo_text: str) -> dict[str, int]:
    """What computes attention in an optimised HLO module.

    splash: TPU splash-attention custom calls (forward and backward kernels);
    xla_softmax: exponentials inside the attention layers (`self_attn`; GPT-NeoX's
    `attention`): the XLA reference kernels' softmax, which a step on the splash path must not
    contain.
    """
    splash = len(re.findall(r"%splash_mha\S* = .*custom_call_target=\"tpu_custom_call\"",
                            hlo_text))
    softmax = len(re.findall(r" exponential\(.*op_name=\"[^\"]*/(?:self_attn|attention)/",
                             hlo_text))
    return {"splash": splash, "xla_softmax": softmax}


def _tree_bytes_per_chip(tree: Any) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (int4: two a byte)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype)
               // 8 for x in jax.tree.leaves(tree))


_OOM = re.compile(
    r"(?:required for HLO temporaries \((?P<temp>[\d.]+)(?P<tu>[KMGT])\) exceeds available "
    r"HBM \((?P<avail>[\d.]+)(?P<au>[KMGT])\))|(?:Used (?P<used>[\d.]+)(?P<uu>[KMGT]) of "
    r"(?P<cap>[\d.]+)(?P<cu>[KMGT]) hbm)"
)
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _oom_bytes(message: str) -> dict[str, int] | None:
    """{"temp": ...} or {"used": ...} from XLA:TPU's out-of-memory message, else None."""
    match = _OOM.search(message)
    if match is None:
        return None
    if match.group("temp"):
        return {"temp": int(float(match.group("temp")) * _UNITS[match.group("tu")])}
    return {"used": int(float(match.group("used")) * _UNITS[match.group("uu")])}


def compile_step(config: ml_collections.ConfigDict, tpu: TpuSlice,
                 devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Compiles `config`'s train step for `tpu` and returns the report (see module doc)."""
    config = for_tpu(config)
    devices = topology_devices(tpu) if devices is None else devices
    check_mesh(config, tpu)
    mesh = make_mesh(dict(config.mesh), devices=devices)
    setup, _, global_batch = build_setup(config, mesh)
    cfg = setup.model.cfg
    args = {
        "frozen_weights": _tree_bytes_per_chip(setup.abstract_frozen),
        "trainable_state": _tree_bytes_per_chip(setup.abstract_state),
        "batch": _tree_bytes_per_chip(setup.abstract_batch(global_batch, config.seq_len)),
    }
    micro = config.batch.micro_batch or global_batch
    # Attention runs per device on whole heads (a tensor split of heads is gathered), and
    # fused full attention on the whole sequence (a sequence split is gathered: no ring).
    copies = 1
    if cfg.attention_train == "s2" or cfg.attention_impl != "xla":
        copies = mesh.shape[TENSOR]
        if cfg.attention_train == "full":
            copies *= mesh.shape[SEQUENCE]
    flops = model_flops(cfg, tokens=global_batch * config.seq_len, seq_len=config.seq_len,
                        mode=config.lora.mode, attention_copies=copies) / tpu.chips
    report: dict[str, Any] = {
        "topology": tpu.name, "accelerator_type": tpu.accelerator_type,
        "topology_name": tpu.topology_name, "chips": tpu.chips,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "seq_len": config.seq_len, "global_batch": global_batch, "micro_batch": micro,
        "accum_steps": global_batch // micro, "attention": cfg.attention_train,
        "attention_impl": cfg.attention_impl,
        "s2_group": cfg.s2_group(config.seq_len) if cfg.attention_train == "s2" else None,
        "lora_mode": config.lora.mode, "remat": cfg.remat_policy, "dtype": cfg.dtype,
        "frozen_dtype": config.model.frozen_dtype, "quantize": cfg.quantize,
        "params": cfg.num_params(),
        "hbm_bytes": tpu.spec.hbm_bytes, "usable_hbm_bytes": tpu.spec.usable_hbm_bytes,
        "arguments_bytes": args,
        "model_flops": flops, "est_step_seconds": flops / tpu.spec.peak_flops,
    }
    start = time.perf_counter()
    try:
        compiled = setup.lower(global_batch, config.seq_len).compile()
    except jax.errors.JaxRuntimeError as err:
        needed = _oom_bytes(str(err))
        if needed is None:
            raise
        report["compile_seconds"] = time.perf_counter() - start
        total = needed.get("used") or needed["temp"] + sum(args.values())
        report.update(fits=False, per_chip_bytes=total, compiler_error=str(err).splitlines()[0],
                      per_chip={"temp": needed.get("temp"), **args})
        return report
    report["compile_seconds"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_chip = {
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
    }
    total = (per_chip["arguments"] + per_chip["outputs"] - per_chip["aliased"]
             + per_chip["temp"] + per_chip["code"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.update(
        per_chip=per_chip, per_chip_bytes=total, fits=total <= tpu.spec.usable_hbm_bytes,
        xla_flops=float(cost.get("flops", 0.0)), kernels=attention_kernels(compiled.as_text()),
    )
    return report


def not_fitting_message(report: dict[str, Any]) -> str:
    """"does not fit: X GiB > Y GiB per chip on T (biggest: ...)" for a report that does not."""
    parts = dict(report["arguments_bytes"])
    temp = report["per_chip"].get("temp")
    if temp:
        parts["activations/temporaries"] = temp
    biggest = ", ".join(f"{name.replace('_', ' ')} {size / GIB:.1f} GiB"
                        for name, size in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    return (f"does not fit: {report['per_chip_bytes'] / GIB:.1f} GiB > "
            f"{report['usable_hbm_bytes'] / GIB:.2f} GiB per chip on {report['topology']} "
            f"(usable of {report['hbm_bytes'] / GIB:.0f} GiB HBM; biggest: {biggest}; "
            f"mesh {report['mesh']})")


# ----------------------------------------------------------------------------- output


def summary_line(report: dict[str, Any]) -> str:
    """One human-readable line of a report."""
    per_chip = report["per_chip"]
    mem = (f"{report['per_chip_bytes'] / GIB:.2f} GiB/chip of "
           f"{report['usable_hbm_bytes'] / GIB:.2f} usable"
           + (f" (args {per_chip['arguments'] / GIB:.2f}, temp {per_chip['temp'] / GIB:.2f})"
              if "arguments" in per_chip else ""))
    kernels = report.get("kernels")
    return (f"{report['attention']}/{report['attention_impl']}: "
            f"{'fits' if report['fits'] else 'DOES NOT FIT'} | {mem} | compile "
            f"{report['compile_seconds']:.1f} s | {report['model_flops'] / 1e12:.1f} TFLOP/chip"
            f" -> >= {report['est_step_seconds']:.2f} s/step"
            + (f" | splash kernels {kernels['splash']}, XLA softmax ops "
               f"{kernels['xla_softmax']}" if kernels else ""))


def markdown_table(reports: Sequence[dict[str, Any]]) -> str:
    """S2 vs full attention, side by side, one row per saved report (with `full_attention`)."""

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "n/a"
        if "error" in r:
            return f"compile failed ({r['error'][:60]})"
        verdict = "fits" if r["fits"] else "**does not fit**"
        return (f"{r['per_chip_bytes'] / GIB:.1f} GiB, {verdict}, "
                f"≥{r['est_step_seconds']:.1f} s")

    lines = [
        "| config | slice (chips) | mesh d/f/s/t | N | global batch (micro) | params "
        "| S2 (LongLoRA): GiB/chip, fit, ideal step | full attention: same | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        mesh = "/".join(str(r["mesh"][a]) for a in MESH_AXES)
        full = r.get("full_attention")
        lines.append(
            f"| {r.get('config', '?')} | {r['topology']} ({r['chips']}) | {mesh} | {r['seq_len']}"
            f" | {r['global_batch']} ({r['micro_batch']}) | {r['params'] / 1e9:.1f}B"
            f" | {cell(r)} | {cell(full)} | {r['compile_seconds']:.0f}"
            + (f" / {full['compile_seconds']:.0f}" if full and "error" not in full else "")
            + " |"
        )
    return "\n".join(lines)


def report_table(directory: str | pathlib.Path) -> str:
    """The markdown table of every report JSON (`aot.json`) in `directory`, sorted by name."""
    paths = sorted(pathlib.Path(directory).glob("*.json"))
    if not paths:
        raise ConfigError(f"aot.table={str(directory)!r} holds no report .json files (write "
                          "them with --json)")
    reports = []
    for path in paths:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not {"mesh", "chips", "fits"} <= report.keys():
            raise ConfigError(f"aot.table: {path} is not an aot report (written by --json); "
                              "keep only reports in the directory")
        reports.append(report)
    return markdown_table(reports)


def fit_report(config: ml_collections.ConfigDict, *, config_name: str = "") -> dict[str, Any]:
    """Compiles `config`'s step for `config.aot.topology`, prints the summary line(s), writes
    `config.aot.json` if set, and returns the report (`report["fits"]` says whether it fits).

    With `config.aot.compare_full` the same run with full causal attention is compiled too;
    a failure of that comparison is recorded in the report, not raised.
    """
    if not config.aot.topology:
        raise ConfigError("aot.topology is required (e.g. --topology v4-8)")
    tpu = parse_topology(config.aot.topology)
    check_mesh(for_tpu(config), tpu)
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # this host's own devices play no part
    devices = topology_devices(tpu)
    report = {"config": config_name, **compile_step(config, tpu, devices)}
    print(summary_line(report), flush=True)
    if config.aot.compare_full:
        full = ml_collections.ConfigDict(config.to_dict())
        full.attention.train = "full"
        try:
            report["full_attention"] = compile_step(full, tpu, devices)
            print(summary_line(report["full_attention"]), flush=True)
        except (NotImplementedError, ValueError, jax.errors.JaxRuntimeError) as err:
            # The comparison is informative; its failure is reported, not fatal.
            report["full_attention"] = {"error": f"{type(err).__name__}: {first_line(err)}"}
            print(f"full attention: compile failed: {first_line(err)}", flush=True)
    if config.aot.json:
        path = pathlib.Path(config.aot.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report
