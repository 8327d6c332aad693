"""The paper in miniature: does S2-Attn + LoRA+ extend a context window as full fine-tuning does?

`run_miniature(out, scale)` runs the whole experiment with the library's own machinery:

1. **Base.** A small LLaMA (byte tokenizer) is pretrained from scratch by `training.loop.train`
   at a short context on the offline books and essays, with *Persuasion* and five essays held
   out (never trained on), and exported as an HF checkpoint (`io.export`). Cached in the
   workdir under a hash of its settings: rerunning reuses it.
2. **Extension** to `factor` x the context with linear position interpolation.
3. **Variants**, each fine-tuned from the base with the same data, steps, schedule and
   learning rate, for every seed: full fine-tuning with full attention / S2; LoRA (q, k, v, o)
   with S2; LoRA+ (LoRA + embeddings + norms: LongLoRA) with S2, with full attention and with
   short attention (S2 without the shift); LoRA at a much larger rank with S2; full
   fine-tuning with short attention (does the shift matter where the model learns most?).
   Two reference rows are not fine-tuned: the base as it is, and the base with PI. Check
   rows (first seed only) change one setting of a LoRA row, the learning rate or the number
   of steps, to tell a shortfall of the method from one of the setup.
4. **Measures.** Held-out perplexity with full attention at the base's window, the target
   length and twice the target (non-overlapping windows, the same token budget per length);
   passkey retrieval at the target length; and per variant the cost side from its own
   compiled step: seconds per step (measured, median), compiled temporary memory and the
   attention FLOPs of a step (counted as `training.fit.attention_flops`).
5. **Report.** `OUT/results.json` (every number, every seed), `OUT/results.md` (mean ± spread
   over seeds) and two plots: perplexity vs length, cost vs quality.

Quality numbers are deterministic for given seeds (CPU XLA); seconds per step are a
measurement of the machine. `MINIATURE` is the reported setting, `QUICK` the same code at toy
sizes for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from longlora_jax.data.eval_data import eval_documents, window_starts
from longlora_jax.data.tokenizer import ByteTokenizer
from longlora_jax.evaluation.passkey import passkey_accuracy
from longlora_jax.evaluation.perplexity import make_eval_fn, perplexity
from longlora_jax.evaluation.plots import line_plot, scatter_plot
from longlora_jax.io.export import export_merged
from longlora_jax.io.hf import load_pretrained
from longlora_jax.io.run import load_run
from longlora_jax.modeling.config import LlamaConfig, RopeScaling
from longlora_jax.modeling.llama import LlamaForCausalLM
from longlora_jax.modeling.lora import trainable_labels, trainable_summary
from longlora_jax.parallel.mesh import single_device_mesh
from longlora_jax.training import config as training_config
from longlora_jax.training.config import build_setup, model_config
from longlora_jax.training.fit import attention_flops
from longlora_jax.training.loop import train


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one run of the experiment (model, data, steps, evaluation)."""

    layers: int
    hidden: int
    heads: int
    mlp: int
    base_context: int
    factor: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    rank: int
    big_rank: int
    eval_tokens: int  # scored tokens per length and model (non-overlapping windows)
    passkey_trials: int
    seeds: tuple[int, ...]

    @property
    def target(self) -> int:
        return self.base_context * self.factor


MINIATURE = Scale(layers=4, hidden=256, heads=4, mlp=768, base_context=256, factor=8,
                  pretrain_steps=600, pretrain_batch=16, pretrain_lr=2e-3,
                  finetune_steps=60, finetune_batch=1, finetune_lr=5e-4, rank=8, big_rank=64,
                  eval_tokens=32768, passkey_trials=10, seeds=(0, 1))
QUICK = Scale(layers=2, hidden=32, heads=2, mlp=64, base_context=32, factor=8,
              pretrain_steps=8, pretrain_batch=4, pretrain_lr=2e-3, finetune_steps=2,
              finetune_batch=1, finetune_lr=5e-4, rank=4, big_rank=8, eval_tokens=512,
              passkey_trials=0, seeds=(0,))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: how (and whether) the base is fine-tuned for the long context."""

    name: str
    mode: str | None  # "full" | "lora" | "lora_plus"; None: not fine-tuned
    attention: str  # training attention: "full" | "s2" | "short"
    pi: bool = True  # linear position interpolation by the scale's factor
    big_rank: bool = False
    # setup checks (is a shortfall the setup's fault?): first seed only, the learning rate
    # or the number of steps scaled; not a like-for-like row of the comparison
    lr_scale: float = 1.0
    steps_scale: int = 1

    @property
    def check(self) -> bool:
        return self.lr_scale != 1.0 or self.steps_scale != 1


VARIANTS = (
    Variant("base, no PI (no fine-tuning)", None, "full", pi=False),
    Variant("base + PI (no fine-tuning)", None, "full"),
    Variant("full FT, full attention", "full", "full"),
    Variant("full FT, S2-Attn", "full", "s2"),
    Variant("LoRA, S2-Attn", "lora", "s2"),
    Variant("LoRA+, S2-Attn (LongLoRA)", "lora_plus", "s2"),
    Variant("LoRA+, full attention", "lora_plus", "full"),
    Variant("LoRA+, short attention (no shift)", "lora_plus", "short"),
    Variant("LoRA large rank, S2-Attn", "lora", "s2", big_rank=True),
    Variant("full FT, short attention (no shift)", "full", "short"),
    Variant("check: LoRA, S2-Attn, lr x4", "lora", "s2", lr_scale=4.0),
    Variant("check: LoRA+, S2-Attn, lr x4", "lora_plus", "s2", lr_scale=4.0),
    Variant("check: LoRA+, S2-Attn, 4x steps", "lora_plus", "s2", steps_scale=4),
)


# ----------------------------------------------------------------------------- configs


def _common(scale: Scale, seed: int) -> ml_collections.ConfigDict:
    c = training_config.default_config()
    c.model.tokenizer = "bytes"
    c.model.dtype = "float32"
    c.model.frozen_dtype = "float32"
    c.model.remat = "none"
    c.model.scan = True
    c.data.source = "offline_all"  # Persuasion and five essays held out by default
    c.data.prefetch = 0
    c.optim.schedule = "constant_with_warmup"
    c.optim.weight_decay = 0.0
    c.eval.before = c.eval.after = False
    c.checkpoint.async_save = False
    c.mesh.data = 1
    c.log_every = 1
    c.seed = seed
    return c


def pretrain_config(scale: Scale) -> ml_collections.ConfigDict:
    """Full training of a random LLaMA at the base context (the experiment's base model)."""
    c = _common(scale, seed=0)
    c.model.base = "preset:tiny"
    c.model.overrides = ml_collections.ConfigDict(dict(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=scale.hidden,
        intermediate_size=scale.mlp, num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads, num_key_value_heads=scale.heads,
        max_position_embeddings=scale.base_context))
    c.seq_len = scale.base_context
    c.rope.scaling = "base"
    c.attention.train = "full"
    c.lora.mode = "full"
    c.optim.lr = scale.pretrain_lr
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = max(1, scale.pretrain_steps // 20)
    c.optim.min_lr_ratio = 0.1
    c.batch.global_batch = scale.pretrain_batch
    c.max_steps = scale.pretrain_steps
    c.checkpoint.every = 0
    c.loss_chunk = scale.base_context
    return c


def finetune_config(scale: Scale, variant: Variant, base_dir: pathlib.Path,
                    seed: int) -> ml_collections.ConfigDict:
    """The variant's context extension: PI x factor, its trainable mode and attention."""
    c = _common(scale, seed)
    c.model.base = f"hf:{base_dir}"
    c.seq_len = scale.target
    c.rope.scaling = f"linear:{scale.factor:g}"
    c.attention.train = variant.attention
    c.attention.group_size_ratio = 0.25
    c.lora.mode = variant.mode
    c.lora.rank = scale.big_rank if variant.big_rank else scale.rank
    c.lora.alpha = 2.0 * c.lora.rank
    c.optim.lr = scale.finetune_lr * variant.lr_scale
    steps = scale.finetune_steps * variant.steps_scale
    c.optim.warmup_steps = max(1, steps // 10)
    c.batch.global_batch = scale.finetune_batch
    c.max_steps = steps
    c.checkpoint.every = 0
    c.loss_chunk = 1024
    return c


def _digest(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- steps


def pretrained_base(scale: Scale, workdir: pathlib.Path,
                    log: Callable[[str], None]) -> tuple[pathlib.Path, float]:
    """The base as an HF directory, pretrained once per setting (cached in `workdir`), and
    the seconds its pretraining took (when it ran, cached or not)."""
    config = pretrain_config(scale)
    run_dir = workdir / f"base-{_digest(config)}"
    hf_dir = run_dir / "hf"
    if (hf_dir / "config.json").is_file():
        log(f"base: cached in {hf_dir}")
    else:
        start = time.perf_counter()
        summary = train(config, run_dir / "run")
        run = load_run(run_dir / "run")
        export_merged(run.cfg, run.variables, hf_dir, overwrite=True)
        loss = summary["last_metrics"]["loss"]
        log(f"base: pretrained {scale.pretrain_steps} steps in "
            f"{time.perf_counter() - start:.0f} s (final loss {loss:.3f}) -> {hf_dir}")
    summary = json.loads((run_dir / "run" / "summary.json").read_text())
    return hf_dir, summary["train_seconds"]


def _eval_docs(scale: Scale) -> list:
    config = _common(scale, 0)
    return eval_documents(config.data, ByteTokenizer())


def measure(cfg: LlamaConfig, variables: dict, docs: Sequence, scale: Scale) -> dict[str, Any]:
    """Held-out perplexity (full attention) at base, target and 2x target; passkey at target."""
    mesh = single_device_mesh()
    eval_fn = make_eval_fn(LlamaForCausalLM(cfg), mesh, loss_chunk=1024)
    ppl = {}
    for n in (scale.base_context, scale.target, 2 * scale.target):
        usable = [d for d in docs if len(window_starts(len(d.tokens), n, protocol="nonoverlap"))]
        windows = max(1, scale.eval_tokens // n)
        batch = max(1, min(windows, 16 * scale.base_context // n))
        result = perplexity(eval_fn, variables, usable, seq_len=n, protocol="nonoverlap",
                            batch_size=batch, max_windows=windows)
        ppl[str(n)] = result["ppl"]
    if not scale.passkey_trials:
        return {"ppl": ppl, "passkey": None}
    passkey = passkey_accuracy(cfg, variables, ByteTokenizer(), scale.target,
                               trials=scale.passkey_trials, add_bos=True, prefill_chunk=0)
    return {"ppl": ppl, "passkey": passkey["accuracy"]}


def step_cost(config: ml_collections.ConfigDict, run_dir: pathlib.Path | None) -> dict[str, Any]:
    """The cost side of a variant from its compiled step: temp memory, attention FLOPs per
    step (counted), and the run's measured seconds per step (median after the first)."""
    setup, _, global_batch = build_setup(config, single_device_mesh())
    compiled = setup.lower(global_batch, config.seq_len).compile()
    cfg = setup.model.cfg
    out = {"temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
           "attention_gflop": attention_flops(cfg, tokens=global_batch * config.seq_len,
                                              seq_len=config.seq_len) / 1e9}
    if run_dir is not None:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        times = [json.loads(line)["step_time"] for line in lines if "step_time" in line]
        out["seconds_per_step"] = statistics.median(times[1:] or times)
    return out


def _trainable(config: ml_collections.ConfigDict) -> int:
    cfg, _ = model_config(config)
    model = LlamaForCausalLM(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
    return trainable_summary(abstract, trainable_labels(abstract, config.lora.mode))[1]


# ----------------------------------------------------------------------------- the experiment


def default_config() -> ml_collections.ConfigDict:
    """The miniature command's settings: out (report directory), workdir (runs; the pretrained
    base is cached there), quick (toy sizes, the same code end to end)."""
    return ml_collections.ConfigDict(dict(out="docs/miniature", workdir="runs/miniature",
                                          quick=False))


def run_miniature(out: str | pathlib.Path, scale: Scale = MINIATURE, *,
                  workdir: str | pathlib.Path = "runs/miniature",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the experiment (module docstring) and writes the report to `out`."""
    out, workdir = pathlib.Path(out), pathlib.Path(workdir)
    started = time.perf_counter()
    base_dir, pretrain_seconds = pretrained_base(scale, workdir, log)
    docs = _eval_docs(scale)
    base_cfg, base_params = load_pretrained(base_dir, config_overrides={"scan_layers": True})
    rows = []
    for variant in VARIANTS:
        row: dict[str, Any] = {"variant": variant.name, "mode": variant.mode,
                               "attention": variant.attention, "check": variant.check,
                               "seeds": {}}
        if variant.mode is None:
            cfg = base_cfg.with_rope(RopeScaling("linear", factor=float(scale.factor))
                                     if variant.pi else None)
            row["seeds"]["-"] = measure(cfg, {"params": base_params}, docs, scale)
            row["trainable_params"] = 0
        seeds = scale.seeds[:1] if variant.check else scale.seeds
        for seed in () if variant.mode is None else seeds:
            config = finetune_config(scale, variant, base_dir, seed)
            run_dir = workdir / f"{_digest(config)}"
            t0 = time.perf_counter()
            summary = train(config, run_dir)
            row.setdefault("train_seconds", {})[str(seed)] = summary["train_seconds"]
            run = load_run(run_dir)
            row["seeds"][str(seed)] = measure(run.cfg, run.variables, docs, scale)
            row["trainable_params"] = _trainable(config)
            if seed == scale.seeds[0]:
                row["cost"] = step_cost(config, run_dir)
            log(f"{variant.name} | seed {seed} | ppl {row['seeds'][str(seed)]['ppl']} | "
                f"{time.perf_counter() - t0:.0f} s")
        rows.append(_summarise(row, scale))
    report = {"scale": dataclasses.asdict(scale), "variants": rows,
              "train_seconds": sum(sum(row.get("train_seconds", {}).values()) for row in rows),
              "seconds": time.perf_counter() - started, "pretrain_seconds": pretrain_seconds}
    write_report(out, report, scale)
    return report


def _summarise(row: dict[str, Any], scale: Scale) -> dict[str, Any]:
    """Mean and spread (max - min) over seeds of every perplexity and the passkey accuracy."""
    seeds = list(row["seeds"].values())
    lengths = list(seeds[0]["ppl"])
    row["ppl_mean"] = {n: statistics.fmean(s["ppl"][n] for s in seeds) for n in lengths}
    row["ppl_spread"] = {n: max(s["ppl"][n] for s in seeds) - min(s["ppl"][n] for s in seeds)
                         for n in lengths}
    passkeys = [s["passkey"] for s in seeds if s["passkey"] is not None]
    row["passkey_mean"] = statistics.fmean(passkeys) if passkeys else None
    return row


# ----------------------------------------------------------------------------- the report


def markdown(report: dict[str, Any], scale: Scale) -> str:
    """results.md: one row per variant, perplexity mean ± spread over seeds, and costs."""
    lengths = [str(n) for n in (scale.base_context, scale.target, 2 * scale.target)]
    head = ("| variant | trainable params | " + " | ".join(f"ppl @{n}" for n in lengths)
            + f" | passkey @{scale.target} | s/step | temp MiB | attention GFLOP/step |")
    lines = [head, "|---|---:|" + "---:|" * (len(lengths) + 4)]

    def cell(row, n):
        mean, spread = row["ppl_mean"][n], row["ppl_spread"][n]
        return f"{mean:.2f}" + (f" ± {spread / 2:.2f}" if len(row["seeds"]) > 1 else "")

    for row in report["variants"]:
        cost = row.get("cost", {})
        lines.append(
            f"| {row['variant']} | {row['trainable_params']:,} | "
            + " | ".join(cell(row, n) for n in lengths)
            + (f" | {row['passkey_mean']:.2f} | " if row["passkey_mean"] is not None else " | - | ")
            + (f"{cost['seconds_per_step']:.2f} | {cost['temp_mib']:.0f} | "
               f"{cost['attention_gflop']:.1f} |" if cost else "- | - | - |"))
    seeds = ", ".join(map(str, scale.seeds))
    lines += ["", f"Base window {scale.base_context} tokens (bytes), extended {scale.factor}x "
              f"to {scale.target} with linear position interpolation; perplexity with full "
              f"attention on held-out text (Persuasion and five essays), mean ± half the "
              f"spread over seeds {seeds} (the check rows: seed {scale.seeds[0]} only, one "
              f"setting changed, to test whether a shortfall is the setup's). Pretraining the "
              f"base took {math.ceil(report['pretrain_seconds'] / 60)} min (cached between "
              f"runs), the fine-tuning steps {math.ceil(report['train_seconds'] / 60)} min; this "
              f"invocation {math.ceil(report['seconds'] / 60)} min."]
    return "\n".join(lines) + "\n"


def write_report(out: pathlib.Path, report: dict[str, Any], scale: Scale) -> None:
    """results.json, results.md, ppl_vs_length.png, cost_vs_quality.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report, scale))
    series = {row["variant"]: {int(n): v for n, v in row["ppl_mean"].items()}
              for row in report["variants"]}
    line_plot(series, out / "ppl_vs_length.png", title="The paper in miniature: held-out "
              "perplexity vs length", ylabel="perplexity (full attention)", log_y=True,
              windows={"window": scale.base_context, "target": scale.target})
    tuned = [row for row in report["variants"] if "cost" in row and not row["check"]]
    scatter_plot({row["variant"]: (row["cost"]["seconds_per_step"],
                                   row["ppl_mean"][str(scale.target)]) for row in tuned},
                 out / "cost_vs_quality.png", title="Cost vs quality of the fine-tuned variants",
                 xlabel="seconds per training step (this CPU)",
                 ylabel=f"held-out perplexity @{scale.target}", log_x=True)
