"""The paper in miniature, where context matters: does S2-Attn + LoRA+ extend a context window?

`run_miniature(out, scale)` runs the whole experiment with the library's own machinery:

1. **Base.** A small LLaMA (byte tokenizer) is pretrained from scratch by `training.loop.train`
   on the offline books and essays (*Persuasion* and five essays held out) in two stages:
   rows of `short_context` tokens dense with single needles (among few keys the retrieval
   circuit is found fast), then rows of its window, most carrying long-range tasks
   (`data.long_range`: needle retrieval with and without distractors, a repeated passage,
   variable tracking) at distances up to that window, so it has the skill inside its window.
   Trained at its window alone, it never found retrieval (1500 steps at chance; the page
   says so). Each stage is exported as an HF checkpoint, cached in the workdir under a hash
   of the settings.
2. **Extension** to `factor` x the window with linear position interpolation (PI).
3. **Variants**, each fine-tuned from the base on the same mixture with distances up to the
   target, the same steps, schedule and learning rate, for every seed: full fine-tuning with
   full attention / S2; LoRA and LoRA+ with S2; LoRA+ with full attention, short attention
   (no shift), S2 with the paper's wrap-around, S2 with attention sinks, and S2 with the last
   quarter of the steps in full attention (a resume of the same run with
   `attention.train=full`); LoRA at a large rank. Every run is measured after `finetune_steps`
   and after `long_factor` x as many (the same run, checkpointed on the way; the
   full-attention-tail variant is one run per length, its tail being the last quarter).
   Two reference rows are not fine-tuned: the base as it is and the base with PI.
4. **Measures** (`measure`), with full causal attention unless a column says S2: held-out
   text perplexity at the base window, the target and twice the target; retrieval accuracy
   (niah_single, niah_multikey, vt: exact greedy answer) and repeated-passage perplexity by
   distance bucket (< G, G-2G, > 2G with G = target / 4) in rows of the target length; the
   same text perplexity and niah_single/repeat with the variant's S2 attention (its training
   attention, or plain S2 for a variant trained with full attention): the train/test gap.
   The base is also measured at its own window. Cost per variant from its compiled step.
5. **Report** (`experiments.miniature_report`): results.json, results.md with the claims
   decided against the seeds' spread, plots.

Quality numbers are deterministic for given seeds (CPU XLA); seconds per step are a
measurement of the machine. `MINIATURE` is the reported setting, `QUICK` the same code at toy
sizes for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from longlora_jax.data import long_range
from longlora_jax.data.eval_data import eval_documents, window_starts
from longlora_jax.data.tokenizer import ByteTokenizer, encoder
from longlora_jax.evaluation.long_range import by_bucket, score_rows
from longlora_jax.evaluation.perplexity import make_eval_fn, perplexity
from longlora_jax.experiments.miniature_report import write_report
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
    short_context: int  # the base's first stage: rows this long, single needles only
    short_steps: int
    short_batch: int
    pretrain_steps: int  # the second stage, at the base window, all tasks
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int  # "1x"; every variant is also measured at `long_factor` x as many
    long_factor: int
    finetune_batch: int
    finetune_lr: float
    rank: int
    big_rank: int
    sink_tokens: int
    task_fraction: float  # share of training rows carrying long-range tasks
    tasks_per_row: int  # how many tasks such a row carries (as many as fit)
    answer_weight: float  # loss weight of the tasks' answer tokens in training rows
    eval_tokens: int  # scored text tokens per length and model (non-overlapping windows)
    task_rows: int  # evaluation rows per task and distance bucket (repeat, niah: 2x)
    seeds: tuple[int, ...]

    @property
    def target(self) -> int:
        return self.base_context * self.factor

    @property
    def group(self) -> int:
        return self.target // 4


MINIATURE = Scale(layers=4, hidden=128, heads=4, mlp=512, base_context=256, factor=4,
                  short_context=64, short_steps=450, short_batch=64,
                  pretrain_steps=1200, pretrain_batch=16, pretrain_lr=2e-3,
                  finetune_steps=25, long_factor=4, finetune_batch=2, finetune_lr=1e-3,
                  rank=8, big_rank=64, sink_tokens=4, task_fraction=0.75, tasks_per_row=2,
                  answer_weight=8.0,
                  eval_tokens=8192, task_rows=6, seeds=(0, 1))
QUICK = Scale(layers=2, hidden=32, heads=2, mlp=64, base_context=64, factor=2,
              short_context=32, short_steps=2, short_batch=4,
              pretrain_steps=4, pretrain_batch=2, pretrain_lr=2e-3, finetune_steps=1,
              long_factor=2, finetune_batch=1, finetune_lr=5e-4, rank=4, big_rank=8,
              sink_tokens=2, task_fraction=0.5, tasks_per_row=2, answer_weight=8.0,
              eval_tokens=256, task_rows=1,
              seeds=(0,))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: how (and whether) the base is fine-tuned for the long context."""

    name: str
    mode: str | None  # "full" | "lora" | "lora_plus"; None: not fine-tuned
    attention: str  # training attention: "full" | "s2" | "short"
    pi: bool = True  # linear position interpolation by the scale's factor
    big_rank: bool = False
    wrap: bool = False  # S2 with the paper's Algorithm 1 wrap-around
    sinks: bool = False  # S2 with attention sinks (the scale's sink_tokens)
    full_tail: bool = False  # the last quarter of the steps with full attention

    @property
    def eval_sparse(self) -> str:
        """The sparse attention the train/test gap is measured with."""
        return "short" if self.attention == "short" else "s2"


FULL_FT = "full FT, full attention"
LONGLORA = "LoRA+, S2-Attn (LongLoRA)"
VARIANTS = (
    Variant("base, no PI (no fine-tuning)", None, "full", pi=False),
    Variant("base + PI (no fine-tuning)", None, "full"),
    Variant(FULL_FT, "full", "full"),
    Variant("full FT, S2-Attn", "full", "s2"),
    Variant("LoRA, S2-Attn", "lora", "s2"),
    Variant(LONGLORA, "lora_plus", "s2"),
    Variant("LoRA+, full attention", "lora_plus", "full"),
    Variant("LoRA+, short attention (no shift)", "lora_plus", "short"),
    Variant("LoRA+, S2-Attn, wrap (Algorithm 1)", "lora_plus", "s2", wrap=True),
    Variant("LoRA+, S2-Attn + sinks", "lora_plus", "s2", sinks=True),
    Variant("LoRA+, S2-Attn, last 1/4 full attention", "lora_plus", "s2", full_tail=True),
    Variant("LoRA large rank, S2-Attn", "lora", "s2", big_rank=True),
)
WARMUP_STEPS = 5  # fixed, so the 1x checkpoint of a long run is the 1x run


def buckets(scale: Scale) -> list[tuple[int, int]]:
    """Distance buckets [lo, hi) in tokens: < G, G-2G, > 2G (up to what fits in the target)."""
    g = scale.group
    return [(16, g), (g, 2 * g), (2 * g, scale.target - 24)]


# ----------------------------------------------------------------------------- configs


def _common(scale: Scale, seed: int) -> ml_collections.ConfigDict:
    c = training_config.default_config()
    c.model.tokenizer = "bytes"
    c.model.dtype = "float32"
    c.model.frozen_dtype = "float32"
    c.model.remat = "none"
    c.model.scan = True
    c.data.source = "offline_all"  # Persuasion and five essays held out by default
    c.data.tasks = long_range.TASKS
    c.data.task_fraction = scale.task_fraction
    c.data.tasks_per_row = scale.tasks_per_row
    c.data.task_answer_weight = scale.answer_weight
    c.data.prefetch = 0
    c.optim.schedule = "constant_with_warmup"
    c.optim.weight_decay = 0.0
    c.eval.before = c.eval.after = False
    c.checkpoint.async_save = False
    c.mesh.data = 1
    c.log_every = 1
    c.seed = seed
    return c


def pretrain_config(scale: Scale, stage: str = "window") -> ml_collections.ConfigDict:
    """Full training of the experiment's base, one stage of it (module docstring, step 1):
    "short" from a random LLaMA at `short_context` tokens, single needles only; "window" at
    the base context with all tasks (its `model.base`, the short stage's export, is set by
    `pretrained_base`)."""
    c = _common(scale, seed=0)
    c.model.base = "preset:tiny"
    c.model.overrides = ml_collections.ConfigDict(dict(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=scale.hidden,
        intermediate_size=scale.mlp, num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads, num_key_value_heads=scale.heads,
        max_position_embeddings=scale.base_context))
    c.rope.scaling = "base"
    c.attention.train = "full"
    c.lora.mode = "full"
    c.optim.lr = scale.pretrain_lr
    if stage == "short":
        c.seq_len, c.batch.global_batch, steps = (scale.short_context, scale.short_batch,
                                                  scale.short_steps)
        c.data.tasks, c.data.task_fraction = ("niah_single",), 1.0
        c.optim.warmup_steps = max(1, steps // 10)
    else:
        c.seq_len, c.batch.global_batch, steps = (scale.base_context, scale.pretrain_batch,
                                                  scale.pretrain_steps)
        c.optim.schedule = "cosine"
        c.optim.warmup_steps = max(1, steps // 20)
        c.optim.min_lr_ratio = 0.1
    c.max_steps = steps
    c.checkpoint.every = max(1, steps // 5)
    c.checkpoint.keep = 5
    c.loss_chunk = c.seq_len
    return c


def finetune_config(scale: Scale, variant: Variant, base_dir: pathlib.Path, seed: int,
                    steps: int, *, attention: str | None = None) -> ml_collections.ConfigDict:
    """The variant's context extension: PI x factor, its trainable mode and attention, the
    mixture with distances up to the target, `steps` steps (checkpointed at every 1x)."""
    c = _common(scale, seed)
    c.model.base = f"hf:{base_dir}"
    c.seq_len = scale.target
    c.rope.scaling = f"linear:{scale.factor:g}"
    c.attention.train = attention or variant.attention
    c.attention.group_size_ratio = 0.25
    c.attention.wrap = variant.wrap
    c.attention.sink_tokens = scale.sink_tokens if variant.sinks else 0
    c.lora.mode = variant.mode
    c.lora.rank = scale.big_rank if variant.big_rank else scale.rank
    c.lora.alpha = 2.0 * c.lora.rank
    c.optim.lr = scale.finetune_lr
    c.optim.warmup_steps = WARMUP_STEPS
    c.batch.global_batch = scale.finetune_batch
    c.max_steps = steps
    c.checkpoint.every = scale.finetune_steps
    c.checkpoint.keep = scale.long_factor + 1
    c.loss_chunk = 1024
    return c


def _digest(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- steps


def pretrained_base(scale: Scale, workdir: pathlib.Path,
                    log: Callable[[str], None]) -> tuple[pathlib.Path, float]:
    """The base as an HF directory, pretrained once per setting (cached in `workdir`), and
    the seconds its two stages of pretraining took (when they ran, cached or not)."""
    stages = {name: pretrain_config(scale, name) for name in ("short", "window")}
    run_dir = workdir / f"base-{_digest(ml_collections.ConfigDict(stages))}"
    seconds = 0.0
    for name, config in stages.items():
        stage_dir = run_dir / name
        hf_dir = stage_dir / "hf"
        if name == "window":  # continues from the short stage's weights
            config.model.base = f"hf:{run_dir / 'short' / 'hf'}"
            config.model.overrides = ml_collections.ConfigDict()
        if (hf_dir / "config.json").is_file():
            log(f"base, {name} stage: cached in {hf_dir}")
        else:
            start = time.perf_counter()
            summary = train(config, stage_dir / "run")
            run = load_run(stage_dir / "run")
            export_merged(run.cfg, run.variables, hf_dir, overwrite=True)
            log(f"base, {name} stage: {config.max_steps} steps at {config.seq_len} tokens in "
                f"{time.perf_counter() - start:.0f} s (final loss "
                f"{summary['last_metrics']['loss']:.3f}) -> {hf_dir}")
        seconds += json.loads((stage_dir / "run" / "summary.json").read_text())["train_seconds"]
    return hf_dir, seconds


@dataclasses.dataclass
class EvalSet:
    """What every model is measured on (built once per run of the experiment)."""

    docs: list  # held-out documents, tokenized
    target_rows: dict[str, list]  # task -> rows of target + 1 tokens
    window_rows: dict[str, list]  # task -> rows of base_context + 1 tokens
    buckets: list[tuple[int, int]]


def eval_set(scale: Scale) -> EvalSet:
    """Held-out text and task rows over the held-out documents (never trained on)."""
    config = _common(scale, 0)
    docs = eval_documents(config.data, ByteTokenizer())
    tokens = [np.asarray(d.tokens) for d in docs]
    encode = encoder(ByteTokenizer())
    counts = {"niah_single": 2 * scale.task_rows, "niah_multikey": scale.task_rows,
              "vt": scale.task_rows, "repeat": 2 * scale.task_rows}
    target = {task: long_range.eval_rows(1, tokens, scale.target + 1, task, buckets(scale),
                                         count, encode)
              for task, count in counts.items()}
    window = {task: long_range.eval_rows(2, tokens, scale.base_context + 1, task,
                                         [(16, scale.base_context - 16)], count, encode)
              for task, count in counts.items()}
    return EvalSet(docs, target, window, buckets(scale))


def _text_ppl(cfg: LlamaConfig, variables: dict, docs: Sequence, scale: Scale, n: int,
              attention: str = "full") -> float:
    mesh = single_device_mesh()
    eval_fn = make_eval_fn(LlamaForCausalLM(cfg), mesh, loss_chunk=1024, attention=attention)
    usable = [d for d in docs if len(window_starts(len(d.tokens), n, protocol="nonoverlap"))]
    windows = max(1, scale.eval_tokens // n)
    batch = max(1, min(windows, 8 * scale.base_context // n))
    return perplexity(eval_fn, variables, usable, seq_len=n, protocol="nonoverlap",
                      batch_size=batch, max_windows=windows)["ppl"]


def _tasks(cfg, variables, rows_by_task: dict[str, list], bucket_list, *, attention: str,
           only: Sequence[str] | None = None) -> dict[str, Any]:
    rows = [(task, row) for task, rows in rows_by_task.items() if only is None or task in only
            for _, row in rows]
    results = score_rows(cfg, variables, [row for _, row in rows], attention=attention)
    return by_bucket(results, bucket_list)


def measure(cfg: LlamaConfig, variables: dict, ev: EvalSet, scale: Scale, *,
            sparse: str = "s2", at_window: bool = False) -> dict[str, Any]:
    """Every quality number of one model (module docstring, step 4)."""
    ppl = {str(n): _text_ppl(cfg, variables, ev.docs, scale, n)
           for n in (scale.base_context, scale.target, 2 * scale.target)}
    out = {"ppl": ppl, "tasks": _tasks(cfg, variables, ev.target_rows, ev.buckets,
                                       attention="full")}
    sparse_cfg = cfg if cfg.attention_train == sparse else cfg.replace(attention_train=sparse)
    out["sparse"] = {
        "attention": sparse,
        "ppl": {str(scale.target): _text_ppl(sparse_cfg, variables, ev.docs, scale,
                                             scale.target, attention=sparse)},
        "tasks": _tasks(sparse_cfg, variables, ev.target_rows, ev.buckets, attention=sparse,
                        only=("niah_single", "repeat")),
    }
    if at_window:
        base_cfg = cfg.with_rope(None)
        out["at_window"] = _tasks(base_cfg, variables, ev.window_rows,
                                  [(16, scale.base_context - 16)], attention="full")
    return out


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


def _finetune(scale: Scale, variant: Variant, base_dir: pathlib.Path, seed: int, steps: int,
              workdir: pathlib.Path) -> tuple[pathlib.Path, ml_collections.ConfigDict, float]:
    """Trains the variant to `steps` (cached by config); its run dir, config and seconds.
    The full-attention tail: S2 to 3/4 of the steps, then the same run resumed with full
    attention to the end."""
    config = finetune_config(scale, variant, base_dir, seed, steps)
    if not variant.full_tail:
        run_dir = workdir / _digest(config)
        return run_dir, config, train(config, run_dir)["train_seconds"]
    run_dir = workdir / f"{_digest(config)}-full-tail"  # its S2 part has the S2 row's config
    train(_with_steps(config, steps * 3 // 4), run_dir)
    tail = finetune_config(scale, variant, base_dir, seed, steps, attention="full")
    return run_dir, config, train(tail, run_dir)["train_seconds"]


def _with_steps(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.max_steps = steps
    return config


def default_config() -> ml_collections.ConfigDict:
    """The miniature command's settings: out (report directory), workdir (runs; the pretrained
    base is cached there), quick (toy sizes, the same code end to end), report_only (render
    OUT/results.json's measurements again, training and measuring nothing)."""
    return ml_collections.ConfigDict(dict(out="docs/miniature", workdir="runs/miniature",
                                          quick=False, report_only=False))


def run_miniature(out: str | pathlib.Path, scale: Scale = MINIATURE, *,
                  workdir: str | pathlib.Path = "runs/miniature",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the experiment (module docstring) and writes the report to `out`."""
    out, workdir = pathlib.Path(out), pathlib.Path(workdir)
    started = time.perf_counter()
    base_dir, pretrain_seconds = pretrained_base(scale, workdir, log)
    ev = eval_set(scale)
    base_cfg, base_params = load_pretrained(base_dir, config_overrides={"scan_layers": True})
    lengths = {"1x": scale.finetune_steps, f"{scale.long_factor}x":
               scale.finetune_steps * scale.long_factor}
    rows = []
    for variant in VARIANTS:
        row: dict[str, Any] = {"variant": variant.name, "mode": variant.mode,
                               "attention": variant.attention, "results": {}}
        t0 = time.perf_counter()
        if variant.mode is None:
            cfg = base_cfg.with_rope(RopeScaling("linear", factor=float(scale.factor))
                                     if variant.pi else None)
            result = measure(cfg, {"params": base_params}, ev, scale, at_window=not variant.pi)
            row["results"] = {"0": {"-": result}}
            row["trainable_params"] = 0
        for seed in () if variant.mode is None else scale.seeds:
            per_seed = row["results"].setdefault(str(seed), {})
            if variant.full_tail:  # one run per length: its tail is the last quarter
                runs = [(name, steps, steps) for name, steps in lengths.items()]
            else:  # one long run, measured at every length's checkpoint
                longest = max(lengths.values())
                runs = [(name, longest, steps) for name, steps in lengths.items()]
            for name, run_steps, at_step in runs:
                run_dir, config, seconds = _finetune(scale, variant, base_dir, seed, run_steps,
                                                     workdir)
                row.setdefault("train_seconds", {})[f"{seed}/{name}"] = seconds
                run = load_run(run_dir, step=at_step)
                per_seed[name] = measure(run.cfg, run.variables, ev, scale,
                                         sparse=variant.eval_sparse)
                if seed == scale.seeds[0] and name == "1x":
                    row["trainable_params"] = _trainable(config)
                    row["cost"] = step_cost(config, run_dir)
        log(f"{variant.name}: {time.perf_counter() - t0:.0f} s")
        rows.append(row)
    report = {"scale": dataclasses.asdict(scale), "buckets": ev.buckets,
              "lengths": lengths, "variants": rows, "pretrain_seconds": pretrain_seconds,
              "seconds": time.perf_counter() - started}
    write_report(out, report)
    return report
