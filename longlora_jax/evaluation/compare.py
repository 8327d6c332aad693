"""Evaluate models side by side at several context lengths: `python -m longlora_jax.evaluate`.

Each model (a training workdir, or a base: smollm2 | hf:DIR | gguf:FILE | preset:NAME) is
evaluated with each RoPE variant of `rope.scaling` (`base` = as loaded or trained; `default` = plain
RoPE; `linear:F`, `dynamic:F`, `yarn:F`) on the held-out documents of `data` (the same data
section as training's; offline sources use their held-out documents) at every length:
perplexity with full attention (`evaluation.perplexity`), with `passkey > 0` passkey
retrieval (`evaluation.passkey`) and with `tasks` RULER's synthetic tasks over the offline
essays (`evaluation.ruler`). Every length must fit the model's (scaled) context window
unless `allow_beyond_context`, which is how an unextended model's degradation is shown.
`out` receives results.json, results.md and the plots (`evaluation.report`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence

import ml_collections

from longlora_jax.cli.renames import Renamed
from longlora_jax.data import assets
from longlora_jax.data.config import EVAL_SOURCES, check_data_config, default_data_config
from longlora_jax.data.eval_data import PROTOCOLS, eval_documents
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.passkey import passkey_accuracy
from longlora_jax.evaluation.perplexity import (
    EVAL_ATTENTIONS,
    documents_for,
    make_eval_fn,
    perplexity,
)
from longlora_jax.evaluation.report import (
    PARTIAL,
    ModelResult,
    markdown,
    read_partial,
    write_outputs,
    write_partial,
)
from longlora_jax.evaluation.ruler import expand_tasks, ruler_scores
from longlora_jax.evaluation.ruler_tasks import Corpus
from longlora_jax.io.base import shard_variables
from longlora_jax.io.run import QUANTIZE, LoadedModel, load_model
from longlora_jax.modeling.config import LlamaConfig, RopeScaling, parse_rope, rope_name
from longlora_jax.modeling.families import build_model
from longlora_jax.parallel.mesh import DATA, MESH_AXES, SEQUENCE, make_mesh

# Retired spellings, accepted (with a warning) until the next release.
RENAMED = (
    Renamed("rope", "rope.scaling"),
    Renamed("attention", "attention.eval"),
    Renamed("group_size_ratio", "attention.group_size_ratio"),
    *(Renamed(key, f"eval.{key}") for key in ("protocol", "stride", "max_windows", "batch")),
)
# Short flag names (`--model a --model b`, `--rope base,linear:4`).
ALIASES = {"model": "models", "data": "data.source", "rope": "rope.scaling"}


def default_config() -> ml_collections.ConfigDict:
    """The evaluation settings.

    models            models to compare (a tuple; `--model a --model b` accumulates)
    rope.scaling      RoPE variants each model is evaluated with (base | default | linear:F |
                      dynamic:F | yarn:F; `--rope` for short); a variant equal to one listed
                      before is skipped
    attention.eval    attentions each model is evaluated with: full (causal: how the model is
                      used) | s2 (S2-Attn, group = attention.group_size_ratio x length) |
                      short (S2 without the shift); s2 and short show what the training
                      approximation itself costs (the paper's Table 1 pilot)
    attention.group_size_ratio  S2 group G / length for the s2 and short attentions
    lengths           context lengths (tokens)
    eval.protocol     "nonoverlap" | "official" (windows every `eval.stride` tokens, as eval.py)
    eval.max_windows  windows per length over all documents (0 = all)
    eval.batch        windows (passkey prompts) per forward
    perplexity        measure perplexity (false: passkey only)
    passkey           passkey-retrieval trials per length (0 = none; full attention only)
    passkey_bos       start passkey prompts with BOS (the official prompt has it)
    tasks             RULER synthetic tasks (niah_single_1..3, niah_multikey_1..3,
                      niah_multivalue, niah_multiquery, vt, cwe, fwe; `ruler` = all), a tuple,
                      e.g. --tasks niah_single_1,vt (full attention only)
    ruler.samples     prompts per task and length
    ruler.template    prompt template (`inference.prompts`): auto = the chat template if the
                      tokenizer has one
    allow_beyond_context  evaluate lengths beyond a model's (scaled) context window
    data.*            the documents (see `data.config.default_data_config`; held-out split)
    max_docs          first N documents (0 = all)
    dtype             weights and compute dtype
    quantize          how each model's base projections are stored, each evaluated in turn
                      (a tuple): auto (a workdir's own, none for a base) | none | int8 |
                      int4 | nf4 | hqq4, or a 4-bit one + dq (see `modeling.quant`); a
                      name gets "(int8)" etc.
    mesh.*            device mesh (sequence > 1: sequence-sharded evaluation)
    prefill_chunk     tokens per KV-cache chunk for long windows (0 = one forward)
    loss_chunk        tokens per chunk of the cross-entropy
    seed              passkey keys and depths; the init of a preset base
    out               directory for results.json/.md and the plots ("" = print only)
    """
    c = ml_collections.ConfigDict()
    c.models = ("smollm2",)
    c.rope = ml_collections.ConfigDict(dict(scaling=("base",)))
    c.attention = ml_collections.ConfigDict(dict(eval=("full",), group_size_ratio=0.25))
    c.lengths = (2048, 4096, 8192)
    c.eval = ml_collections.ConfigDict(dict(protocol="nonoverlap", stride=256, max_windows=4,
                                            batch=1))
    c.perplexity = True
    c.passkey = 0
    c.passkey_bos = True
    c.tasks = ()
    c.ruler = ml_collections.ConfigDict(dict(samples=4, template="auto"))
    c.allow_beyond_context = False
    c.data = default_data_config()
    c.data.source = "offline_books"
    c.data.tfds_split = "test"
    c.max_docs = 0
    c.dtype = "float32"
    c.quantize = ("auto",)
    c.mesh = ml_collections.ConfigDict({**dict.fromkeys(MESH_AXES, 1), DATA: -1})
    c.prefill_chunk = 2048
    c.loss_chunk = 1024
    c.seed = 0
    c.out = ""
    return c


def _check(config: ml_collections.ConfigDict) -> list[int]:
    lengths = sorted(set(config.lengths))
    if not lengths or lengths[0] < 2:
        raise ConfigError(f"lengths {tuple(config.lengths)}: need integers >= 2, e.g. 2048,4096")
    if not config.attention.eval or set(config.attention.eval) - set(EVAL_ATTENTIONS):
        raise ConfigError(f"attention.eval {tuple(config.attention.eval)}; valid: a tuple of "
                          f"{', '.join(EVAL_ATTENTIONS)}")
    if config.eval.protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol={config.eval.protocol!r}; valid: "
                          f"{', '.join(PROTOCOLS)}")
    if not config.models:
        raise ConfigError("models is empty; name at least one (--model smollm2)")
    expand_tasks(config.tasks)
    if not config.perplexity and not config.passkey and not config.tasks:
        raise ConfigError("nothing to evaluate: perplexity is off, passkey is 0 and tasks is "
                          "empty")
    if config.data.source not in EVAL_SOURCES:
        raise ConfigError(f"data.source={config.data.source!r}; valid for evaluation: "
                          f"{', '.join(EVAL_SOURCES)}")
    check_data_config(config.data, for_eval=True)
    return lengths


def check_lengths(cfg: LlamaConfig, lengths: list[int], name: str, *, allow: bool) -> None:
    """ConfigError when a length exceeds the model's context window (unless `allow`)."""
    beyond = [n for n in lengths if n > cfg.context_window]
    if beyond and not allow:
        raise ConfigError(
            f"lengths {beyond} exceed the context window {cfg.context_window} of {name}; "
            "evaluate with a rope variant that covers them or set allow_beyond_context")


def _log(line: str) -> None:
    print(line, flush=True)  # progress reaches a log file as it happens


def evaluate_models(config: ml_collections.ConfigDict,
                    log: Callable[[str], None] = _log,
                    progress: Callable[[list[ModelResult]], None] | None = None,
                    finished: Sequence[ModelResult] = ()) -> list[ModelResult]:
    """Every (model, RoPE variant) over the lengths (see the module docstring). `progress`
    receives the results so far (the current row partly filled) after every length;
    `finished` (a stopped run's rows) are kept, and only their missing lengths measured."""
    lengths = _check(config)
    ropes = [parse_rope(text) for text in config.rope.scaling]
    mesh = make_mesh(dict(config.mesh))
    if not config.quantize:
        raise ConfigError(f"quantize is empty; valid: a tuple of {', '.join(QUANTIZE)}")
    results: list[ModelResult] = []

    def length_done() -> None:
        if progress is not None:
            progress(results)

    for source in config.models:
        for quantize in config.quantize:
            base = load_model(source, dtype=config.dtype, seed=config.seed, quantize=quantize)
            if quantize != "auto":
                base = dataclasses.replace(base, name=f"{base.name} ({quantize})")
            _evaluate_model(config, source, base, ropes, lengths, mesh, log, length_done,
                            results, finished)
    return results


def _evaluate_model(config: ml_collections.ConfigDict, source: str, base: LoadedModel,
                    ropes: list[RopeScaling | None], lengths: list[int], mesh,
                    log: Callable[[str], None], length_done: Callable[[], None],
                    results: list[ModelResult], finished: Sequence[ModelResult]) -> None:
    """One loaded model (from `source`) with each RoPE variant and attention over the
    lengths, its rows appended to `results` as they start (a row of `finished` is continued);
    `length_done` after each length."""
    variants: list[tuple[LlamaConfig, str, str]] = []
    seen: list[RopeScaling] = []
    for rope in ropes:
        cfg = base.cfg.with_rope(rope).replace(
            s2_group_size=None, s2_group_size_ratio=config.attention.group_size_ratio,
            s2_group_rule="fixed")
        if cfg.rope_scaling in seen:
            continue  # e.g. linear:4 on a run trained with PI x4: the same model as base
        seen.append(cfg.rope_scaling)
        label = rope_name(cfg.rope_scaling)
        name = base.name if rope is None else f"{base.name} (rope {label})"
        check_lengths(cfg, lengths, name, allow=config.allow_beyond_context)
        for attention in config.attention.eval:
            variants.append((cfg, name if attention == "full" else f"{name} [{attention}]",
                             attention))
    all_docs = eval_documents(config.data, base.tokenizer, max_docs=config.max_docs) \
        if config.perplexity else []
    tasks = expand_tasks(config.tasks)
    corpus = Corpus.from_texts([d.text for d in assets.essays()]) if tasks else None
    for cfg, name, attention in variants:
        kept = [r for r in finished if (r.name, r.attention) == (name, attention)]
        result = kept[0] if kept else ModelResult(
            name, source, rope_name(cfg.rope_scaling), cfg.context_window,
            [(d.name, len(d.tokens)) for d in all_docs], attention)
        results.append(result)
        variables = shard_variables(cfg, base.variables, mesh)
        eval_fn = make_eval_fn(build_model(cfg), mesh, loss_chunk=config.loss_chunk,
                               prefill_chunk=config.prefill_chunk, attention=attention)
        for n in lengths:
            if kept and _measured(config, result, n, tasks):
                log(f"{name} | {n} tokens | kept from {PARTIAL}")
                continue
            if config.perplexity:
                docs = documents_for(all_docs, n, config.eval.protocol, config.eval.stride)
                start = time.perf_counter()
                ppl = perplexity(eval_fn, variables, docs, seq_len=n,
                                 protocol=config.eval.protocol, stride=config.eval.stride,
                                 batch_size=config.eval.batch,
                                 max_windows=config.eval.max_windows)
                ppl["seconds"] = time.perf_counter() - start
                result.perplexity[n] = ppl
                log(f"{name} | {n} tokens | ppl {ppl['ppl']:.3f} over {ppl['windows']} "
                    f"windows ({ppl['seconds']:.0f}s)")
            if config.passkey and attention == "full":  # decoding is full attention
                prefill = 0 if mesh.shape[SEQUENCE] > 1 else config.prefill_chunk
                pk = passkey_accuracy(cfg, variables, base.tokenizer, n,
                                      trials=config.passkey, seed=config.seed,
                                      batch=config.eval.batch, add_bos=config.passkey_bos,
                                      prefill_chunk=prefill)
                result.passkey[n] = pk
                log(f"{name} | {n} tokens | passkey {pk['correct']}/{pk['trials']}")
            if tasks and attention == "full":
                start = time.perf_counter()
                scores = ruler_scores(cfg, variables, base.tokenizer, corpus, length=n,
                                      tasks=tasks, samples=config.ruler.samples,
                                      seed=config.seed, batch=config.eval.batch,
                                      template=config.ruler.template,
                                      prefill_chunk=0 if mesh.shape[SEQUENCE] > 1
                                      else config.prefill_chunk)
                scores["seconds"] = time.perf_counter() - start
                result.ruler[n] = scores
                log(f"{name} | {n} tokens | RULER average {scores['average']:.1f} "
                    f"({scores['seconds']:.0f}s)")
            length_done()


def _measured(config: ml_collections.ConfigDict, result: ModelResult, n: int,
              tasks: list[str]) -> bool:
    """Whether `result` has every measurement `config` asks for at length `n`."""
    full = result.attention == "full"
    wanted = [(config.perplexity, result.perplexity), (config.passkey and full, result.passkey),
              (tasks and full, result.ruler)]
    return all(n in cells for asked, cells in wanted if asked)


def evaluate(config: ml_collections.ConfigDict) -> list[ModelResult]:
    """`evaluate_models`, its markdown printed and (with `out`) its files written. Until the
    last length of the last model, `out`/partial.json holds what has finished (a stopped run
    keeps it, and the same command resumes from it); the complete run replaces it with
    results.json, results.md and the plots."""
    settings = {**config.to_dict(), "data": config.data.source,
                "data_config": config.data.to_dict()}
    lengths = sorted(set(config.lengths))
    out = pathlib.Path(config.out) if config.out else None
    results = evaluate_models(
        config, progress=None if out is None
        else lambda so_far: write_partial(out, so_far, settings),
        finished=read_partial(out, settings) if out else ())
    print(markdown(results, lengths, settings))
    if out:
        write_outputs(out, results, lengths, settings)
        (out / PARTIAL).unlink(missing_ok=True)
        print(f"wrote {config.out}/results.json, results.md and plots")
    return results
