"""Benchmarks, side by side in one process: `python -m longlora_jax.bench <subcommand>`.

Subcommands (each a function taking the parsed arguments; add one with `_SUBCOMMANDS`):
  attention   S2-Attn vs full causal attention vs PyTorch's fused SDPA, fwd+bwd, on CPU/any
              backend: wall time, compiled XLA FLOPs (cost analysis) and temp memory.
  train       tokens/s of our LongLoRA train step (S2 + LoRA+) vs transformers + PEFT
              (LoRA+, gradient checkpointing, SDPA) on a SmolLM2-shaped model.

Results print as a markdown table; `--json PATH` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from longlora_jax.modeling import attention, kernels

# --------------------------------------------------------------------------- shared helpers


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """rows -> a GitHub markdown table with the given column order (None prints as "-")."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _report(rows: list[dict[str, Any]], columns: Sequence[str], json_path: str | None,
            meta: dict[str, Any]) -> None:
    print(markdown_table(rows, columns))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def _machine() -> dict[str, Any]:
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "jax": jax.__version__}


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --------------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True)
class HeadShape:
    """Hq query heads of dim D reading Hkv kv heads, parsed from "HqxD" or "HqxD/Hkv"."""

    hq: int
    d: int
    hkv: int

    @classmethod
    def parse(cls, text: str) -> HeadShape:
        try:
            heads, _, kv = text.partition("/")
            hq, d = (int(x) for x in heads.split("x"))
            return cls(hq, d, int(kv) if kv else hq)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"heads {text!r} must look like 9x64/3 (Hq x head_dim / Hkv) or 32x128"
            ) from None

    def __str__(self):
        return f"{self.hq}x{self.d}" + (f"/{self.hkv}" if self.hkv != self.hq else "")


@dataclasses.dataclass
class _Variant:
    """One attention implementation's fwd+bwd, ready to time."""

    name: str
    run: Callable[[], Any] | None  # None: not timed (see `skipped`)
    flops: float | None = None
    temp_bytes: int | None = None
    skipped: str | None = None
    seconds: list[float] = dataclasses.field(default_factory=list)


def _jax_variant(name, attn, inputs, budget: int, cost_attn=None) -> _Variant:
    """Compiles q, k, v, dout -> (dq, dk, dv) for `attn`; FLOPs from `cost_attn` (unrolled)."""

    def fwd_bwd(fn):
        def run(q, k, v, dout):
            return jax.vjp(fn, q, k, v)[1](dout)

        return jax.jit(run)

    compiled = fwd_bwd(attn).lower(*inputs).compile()
    with mock.patch.object(kernels, "SCORES_PER_STEP", 1 << 62):  # one step: loops unrolled
        costed = fwd_bwd(cost_attn or attn).lower(*inputs).compile()
    variant = _Variant(name, None, flops=costed.cost_analysis().get("flops"),
                       temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
    if variant.temp_bytes > budget:
        variant.skipped = f"needs {variant.temp_bytes / 2**30:.0f} GiB temp"
    else:
        variant.run = lambda: jax.block_until_ready(compiled(*inputs))
    return variant


def _torch_variant(inputs, hs: HeadShape) -> _Variant:
    import torch  # the peer; imported only when asked for

    q, k, v, dout = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous()
                     for x in inputs)  # [B, H, N, D]
    for x in (q, k, v):
        x.requires_grad_(True)

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=hs.hkv != hs.hq)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    return _Variant("torch", run)


def _time_round_robin(variants: list[_Variant], args) -> None:
    """Warm-up run(s), then `repeats` rounds over all variants (machine-load drift hits all
    alike); after its first timed run, a variant whose runs took `--max-seconds` sits the
    remaining rounds out."""

    def timed_run(v: _Variant) -> float:
        start = time.perf_counter()
        v.run()
        return time.perf_counter() - start

    warm = {v.name: [timed_run(v) for _ in range(args.warmup)] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            if sum(v.seconds) + sum(warm[v.name]) < args.max_seconds or not v.seconds:
                v.seconds.append(timed_run(v))


def _timing_arguments(parser: argparse.ArgumentParser, *, max_seconds: float, peer: str) -> None:
    """The options every side-by-side timing shares (see `_time_round_robin`)."""
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (min is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=max_seconds,
                        help="stop repeating a variant once its runs took this long")
    parser.add_argument("--no-torch", action="store_true", help=f"skip {peer}")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def _attention_case(n: int, hs: HeadShape, args) -> dict[str, Any]:
    group = max(2, round(n * args.group_ratio) // 2 * 2)
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.standard_normal((args.batch, n, h, hs.d)), jnp.float32)
              for h in (hs.hq, hs.hkv, hs.hkv, hs.hq)]
    budget = int(args.memory_budget_gb * 2**30)
    variants = [
        _jax_variant("s2", lambda q, k, v: attention.s2_attention(q, k, v, group_size=group),
                     inputs, budget),
        _jax_variant("full", lambda q, k, v: attention.causal_attention(q, k, v), inputs, budget),
    ]
    if not args.no_torch:
        variants.append(_torch_variant(inputs, hs))
    _time_round_robin([v for v in variants if v.run is not None], args)
    by_name = {v.name: v for v in variants}
    row: dict[str, Any] = {"N": n, "heads": str(hs), "G": group}
    for v in variants:
        row[f"{v.name} s"] = min(v.seconds) if v.seconds else v.skipped
        if v.flops is not None:
            row[f"{v.name} GFLOP"] = v.flops / 1e9
        if v.temp_bytes is not None:
            row[f"{v.name} temp MiB"] = v.temp_bytes / 2**20
    s2 = by_name["s2"]

    def ratio(a, b):
        return a / b if a and b else None

    for other in ("full", "torch"):
        if other in by_name and s2.seconds and by_name[other].seconds:
            row[f"S2 speedup vs {other}"] = min(by_name[other].seconds) / min(s2.seconds)
    row["FLOPs S2/full"] = ratio(s2.flops, by_name["full"].flops)
    row["temp S2/full"] = ratio(s2.temp_bytes, by_name["full"].temp_bytes)
    return row


_ATTENTION_COLUMNS = (
    "N", "heads", "G", "s2 s", "full s", "torch s", "S2 speedup vs full", "S2 speedup vs torch",
    "FLOPs S2/full", "temp S2/full", "s2 GFLOP", "full GFLOP", "s2 temp MiB", "full temp MiB",
)


def attention_command(args) -> list[dict[str, Any]]:
    """S2 vs full vs torch SDPA, fwd+bwd, fp32, for each length x head shape."""
    if args.quick:
        args.lengths, args.heads, args.repeats = [2048, 8192], [HeadShape(9, 64, 3)], 2
    rows = []
    for hs in args.heads:
        for n in args.lengths:
            rows.append(_attention_case(n, hs, args))
            print(f"done N={n} heads={hs}", flush=True)
    meta = {**_machine(), "command": "attention", "group_ratio": args.group_ratio,
            "batch": args.batch, "repeats": args.repeats, "dtype": "float32",
            "timing": "min wall seconds of forward+backward, variants interleaved"}
    _report(rows, _ATTENTION_COLUMNS, args.json, meta)
    return rows


def _attention_parser(parser: argparse.ArgumentParser) -> None:
    def ints(text):
        return [int(x) for x in text.split(",")]

    parser.add_argument("--lengths", type=ints, default=[2048, 8192, 16384],
                        help="comma-separated sequence lengths (default 2048,8192,16384)")
    parser.add_argument("--heads", type=lambda t: [HeadShape.parse(x) for x in t.split(",")],
                        default=[HeadShape(9, 64, 3), HeadShape(32, 128, 32)],
                        help="comma-separated HqxD[/Hkv] (default 9x64/3 (SmolLM2),32x128)")
    parser.add_argument("--group-ratio", type=float, default=0.25, help="S2 group G / N")
    parser.add_argument("--batch", type=int, default=1)
    _timing_arguments(parser, max_seconds=60.0, peer="the PyTorch SDPA peer")
    parser.add_argument("--quick", action="store_true",
                        help="N=2048,8192 and heads 9x64/3 only, 2 repeats")
    parser.add_argument("--memory-budget-gb", type=float,
                        default=0.4 * _physical_memory_bytes() / 2**30,
                        help="skip timing variants whose compiled temp memory exceeds this")


# --------------------------------------------------------------------------- train


def _train_step_variant(n: int, args) -> _Variant:
    """Our jitted LongLoRA step (S2 + LoRA+, chunked loss, AdamW) on a random SmolLM2 shape."""
    from longlora_jax import sharding
    from longlora_jax.modeling.config import LlamaConfig
    from longlora_jax.modeling.llama import LlamaForCausalLM
    from longlora_jax.optim import default_optim_config
    from longlora_jax.train_step import StepOptions, build_train_setup, init_state, init_variables

    cfg = LlamaConfig.preset(
        "smollm2-135m", num_hidden_layers=args.layers, scan_layers=True,
        remat_policy=args.remat, attention_train="s2", s2_group_size_ratio=args.group_ratio,
        lora_rank=8, lora_alpha=16.0, max_position_embeddings=max(n, 8192),
    )
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = build_train_setup(
        LlamaForCausalLM(cfg), mesh, mode="lora_plus", optim_cfg=default_optim_config(),
        options=StepOptions(loss_chunk=args.loss_chunk), seq_len=n, frozen_dtype="float32",
    )
    state, frozen = init_state(setup, init_variables(setup, jax.random.key(0), n),
                               jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, n + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((1, n), np.float32), "segment_ids": np.ones((1, n), np.int32),
             "positions": np.arange(n, dtype=np.int32)[None]}
    holder = {"state": state}

    def run():
        with sharding.activate(mesh):
            holder["state"], metrics = setup.step_fn(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    return _Variant("longlora_jax", run)


def _hf_peft_variant(n: int, args) -> _Variant:
    """transformers LLaMA (SDPA) + PEFT LoRA with trainable embeddings and norms (the
    official LongLoRA recipe), gradient checkpointing, torch AdamW: the PyTorch peer."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from longlora_jax.modeling.config import LlamaConfig

    torch.manual_seed(0)
    hf_cfg = LlamaConfig.preset("smollm2-135m", num_hidden_layers=args.layers,
                                max_position_embeddings=max(n, 8192)).to_hf()
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
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

    return _Variant("hf_peft", run)


def train_command(args) -> list[dict[str, Any]]:
    """Training-step throughput: our LongLoRA step vs transformers + PEFT, same shapes."""
    rows = []
    for n in args.lengths:
        variants = [_train_step_variant(n, args)]
        if not args.no_torch:
            variants.append(_hf_peft_variant(n, args))
        _time_round_robin(variants, args)
        row: dict[str, Any] = {"N": n, "layers": args.layers, "remat": args.remat}
        for v in variants:
            row[f"{v.name} s/step"] = min(v.seconds)
            row[f"{v.name} tokens/s"] = n / min(v.seconds)
        if len(variants) == 2:
            row["speedup"] = min(variants[1].seconds) / min(variants[0].seconds)
        rows.append(row)
        print(f"done N={n}", flush=True)
    meta = {**_machine(), "command": "train", "model": "SmolLM2-135M shape", "batch": 1,
            "mode": "lora_plus r=8", "attention": f"S2 G=N*{args.group_ratio} vs HF SDPA full",
            "timing": "min wall seconds of a full optimizer step, variants interleaved"}
    _report(rows, _TRAIN_COLUMNS, args.json, meta)
    return rows


_TRAIN_COLUMNS = ("N", "layers", "remat", "longlora_jax s/step", "hf_peft s/step",
                  "longlora_jax tokens/s", "hf_peft tokens/s", "speedup")


def _train_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")],
                        default=[2048, 8192], help="sequence lengths (default 2048,8192)")
    parser.add_argument("--layers", type=int, default=4, help="SmolLM2-shaped layers")
    parser.add_argument("--remat", default="none", help="our remat policy; none is the demo's "
                        "(the peer always uses full gradient checkpointing)")
    parser.add_argument("--group-ratio", type=float, default=0.25, help="S2 group G / N")
    parser.add_argument("--loss-chunk", type=int, default=1024)
    _timing_arguments(parser, max_seconds=120.0, peer="the transformers + PEFT peer")


# --------------------------------------------------------------------------- CLI

# name -> (help, add-arguments function, command function)
_SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "attention": ("S2-Attn vs full attention vs torch SDPA (fwd+bwd time, FLOPs, memory)",
                  _attention_parser, attention_command),
    "train": ("LongLoRA train step tokens/s vs transformers + PEFT (LoRA+, checkpointing)",
              _train_parser, train_command),
}


def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m longlora_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, command) in _SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        add_arguments(sub_parser)
        sub_parser.set_defaults(func=command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
