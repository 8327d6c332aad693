"""Evaluation with full attention: perplexity at context lengths, passkey retrieval, plots.

`make_eval_fn` + `perplexity` are what training uses for its before/after and periodic
evaluation; the CLI evaluates one or more models at several context lengths:

    python -m longlora_jax.evaluate --model smollm2 --model runs/demo \\
        --lengths 2048,4096,8192 --data offline_books --max-windows 4 --passkey 10 --out eval/

--model      a training workdir (base + trained LoRA factors applied on the fly) | smollm2 |
             hf:DIR | gguf:FILE | preset:NAME; repeat it to compare models (one line each).
--rope-factor  comma list of RoPE variants each model is evaluated with: own (as loaded) |
             none | F (linear position interpolation by F; 1 = none) | linear:F | dynamic:F |
             yarn:F. E.g. `--rope-factor own,2` shows the base with and without PI x2.
--protocol   official (windows every --stride tokens, the official eval.py) | nonoverlap.
--data       offline_books | offline_essays | offline_all (held-out documents) | text_files |
             jsonl | tfds (e.g. pg19, split test) | token_file (uint16/uint32 .bin), with
             --data-paths / --tfds-name / --tfds-split / --token-dtype as the source needs.
--passkey N  N passkey-retrieval trials per length (`longlora_jax.passkey`).
--out DIR    results.json, results.md (markdown tables) and ppl_vs_length.png,
             passkey_vs_length.png.

Every length must fit the evaluated model's context window (`LlamaConfig.context_window`:
the scaled window) unless --allow-beyond-context, which is how the degradation of an
unextended model is shown. Attention is always full causal.

Long windows on small memory: `prefill_chunk` (CLI --prefill-chunk, default 2048) runs a
window through the KV-cache path `prefill_chunk` tokens at a time, whose flash-style
attention (`modeling.kv_cache.cached_attention`) holds [chunk, 256] scores per head and
skips the future key blocks: exact full attention in O(N) memory. SmolLM2 at 16k tokens
compiles to 1.5 GB of temporaries this way against 28 GB for the plain forward's dense
[N, N] scores, and runs ~2-10x faster on CPU. Dynamic NTK RoPE ignores it (its frequencies
depend on the longest position of a forward, as in transformers' single forward).

Sequence-sharded evaluation (mesh axis "sequence", e.g. `--mesh sequence=8`; the CLI then
runs the plain forward, prefill_chunk 0): activations are split along the tokens and full
attention all-gathers each layer's keys and values along the sequence (GSPMD, from the
model's length constraints; no hand-written collective). Per device: activations and queries
scale with N/S, the gathered k/v of a layer with N (2 N Hkv D values), the dense XLA scores
with (N/S) x N x Hq. SmolLM2 at 16k tokens on 8 (fake CPU) devices compiles to 3.6 GB of
temporaries per device (28 GB on one device), of which the gathered k/v are 25 MB per layer
and the [2k, 16k] x 9-head scores ~1.2 GB: with GQA the all-gather is cheap next to the
scores. A ring (shard_map + ppermute of k/v blocks with an online softmax) would keep k/v at
N/S and bound the scores to (N/S)^2; it is not implemented.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from longlora_jax import sharding
from longlora_jax.data.config import DataError, default_data_config
from longlora_jax.data.eval_data import PROTOCOLS, TokenDocument, perplexity_windows, window_starts
from longlora_jax.loss import chunked_cross_entropy
from longlora_jax.modeling.config import ConfigError, LlamaConfig
from longlora_jax.modeling.kv_cache import CACHE_COLLECTION, init_cache
from longlora_jax.modeling.llama import LlamaForCausalLM

EvalFn = Callable[[Any, np.ndarray, np.ndarray, np.ndarray], tuple[jax.Array, jax.Array]]


def make_eval_fn(model: LlamaForCausalLM, mesh: Mesh, *, loss_chunk: int = 1024,
                 prefill_chunk: int = 0) -> EvalFn:
    """A jitted (variables, inputs_bn, targets_bn, mask_bn) -> (NLL sum, token count).

    Full causal attention (`train=False`) whatever the training attention is; batches are
    split over the mesh's batch axes. prefill_chunk > 0: windows go through the KV-cache
    path min(prefill_chunk, N) tokens at a time (see the module docstring).
    """
    batch_sharding = sharding.logical_sharding(mesh, ("act_batch", "act_length"))
    if model.cfg.rope_scaling.rope_type == "dynamic":
        prefill_chunk = 0

    def project(variables, h):
        return model.apply(variables, h, method=LlamaForCausalLM.project)

    def full_nll(variables, inputs_bn, targets_bn, mask_bn):
        h_bne = model.apply(variables, inputs_bn, return_hidden=True)
        return chunked_cross_entropy(functools.partial(project, variables), h_bne, targets_bn,
                                     mask_bn, chunk=loss_chunk)

    def chunked_nll(variables, inputs_bn, targets_bn, mask_bn):
        b, n = inputs_bn.shape
        chunk = min(prefill_chunk, n)
        pad = -n % chunk
        num = (n + pad) // chunk
        positions_bn = jnp.broadcast_to(jnp.arange(n + pad, dtype=jnp.int32), (b, n + pad))

        def chunks(x_bn):
            x_bn = jnp.pad(x_bn, ((0, 0), (0, pad)))
            return x_bn.reshape(b, num, chunk).swapaxes(0, 1)

        def body(carry, xs):
            cache, nll, count = carry
            ids_bc, positions_bc, targets_bc, mask_bc = xs
            h_bce, updated = model.apply({**variables, CACHE_COLLECTION: cache}, ids_bc,
                                         positions_bc, decode=True, return_hidden=True,
                                         mutable=[CACHE_COLLECTION])
            chunk_nll, chunk_count = chunked_cross_entropy(
                functools.partial(project, variables), h_bce, targets_bc, mask_bc,
                chunk=loss_chunk)
            return (updated[CACHE_COLLECTION], nll + chunk_nll, count + chunk_count), None

        cache = nn.unbox(init_cache(model, b, n + pad))
        zero = jnp.zeros((), jnp.float32)
        xs = (chunks(inputs_bn), chunks(positions_bn), chunks(targets_bn), chunks(mask_bn))
        (_, nll, count), _ = jax.lax.scan(body, (cache, zero, zero), xs)
        return nll, count

    @functools.partial(jax.jit, in_shardings=(None, batch_sharding, batch_sharding, batch_sharding))
    def nll(variables, inputs_bn, targets_bn, mask_bn):
        if prefill_chunk:
            return chunked_nll(variables, inputs_bn, targets_bn, mask_bn)
        return full_nll(variables, inputs_bn, targets_bn, mask_bn)

    def run(variables, inputs_bn, targets_bn, mask_bn):
        with sharding.activate(mesh):
            return nll(variables, inputs_bn, targets_bn, mask_bn)

    def lower(variables, inputs_bn, targets_bn, mask_bn):
        with sharding.activate(mesh):
            return nll.lower(variables, inputs_bn, targets_bn, mask_bn)

    run.lower = lower  # abstract arguments -> jax Lowered (compile() for memory/HLO)
    return run


def perplexity(
    eval_fn: EvalFn,
    variables: Any,
    docs: Sequence[TokenDocument],
    *,
    seq_len: int,
    protocol: str = "nonoverlap",
    stride: int = 256,
    batch_size: int = 1,
    max_windows: int = 0,
) -> dict[str, float]:
    """exp(mean NLL) over every scored token of the documents' windows.

    protocol/stride: see `data.eval_data` ("official": windows every `stride` tokens, or
    "nonoverlap"). max_windows > 0 stops after that many windows (over all documents).
    Returns {"ppl", "nll", "tokens", "windows"}.
    """
    nll_sum, count, windows = 0.0, 0.0, 0
    for doc in docs:
        for inputs_bn, targets_bn, mask_bn in perplexity_windows(
            doc.tokens, seq_len, protocol=protocol, stride=stride, batch_size=batch_size,
            pad_batches=True,
        ):
            real = int((mask_bn.sum(axis=1) > 0).sum())
            if max_windows and windows + real > max_windows:
                keep = max_windows - windows
                mask_bn = mask_bn * (np.arange(len(mask_bn)) < keep)[:, None]
                real = keep
            batch_nll, batch_count = eval_fn(variables, inputs_bn, targets_bn, mask_bn)
            nll_sum += float(batch_nll)
            count += float(batch_count)
            windows += real
            if max_windows and windows >= max_windows:
                break
        if max_windows and windows >= max_windows:
            break
    if count == 0:
        raise ValueError(f"no window of {seq_len} tokens in {len(docs)} documents")
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": windows}


# ------------------------------------------------------------------------------ the CLI's parts


def parse_lengths(text: str) -> list[int]:
    """"2048,4096" -> [2048, 4096] (sorted, unique); ConfigError for anything else."""
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] < 2:
        raise ConfigError(f"--lengths {text!r}: need a comma list of integers >= 2, e.g. 2048,4096")
    return lengths


def check_lengths(cfg: LlamaConfig, lengths: Sequence[int], name: str, *, allow: bool) -> None:
    """ConfigError when a length exceeds the model's context window (unless `allow`)."""
    beyond = [n for n in lengths if n > cfg.context_window]
    if beyond and not allow:
        raise ConfigError(
            f"lengths {beyond} exceed the context window {cfg.context_window} of {name}; "
            "evaluate with a larger --rope-factor or pass --allow-beyond-context")


def documents_for(docs: Sequence[TokenDocument], seq_len: int, protocol: str, stride: int
                  ) -> list[TokenDocument]:
    """The documents long enough for one window; DataError when none is."""
    if not docs:
        raise DataError("the evaluation document set is empty")
    usable = [d for d in docs if len(window_starts(len(d.tokens), seq_len, protocol=protocol,
                                                   stride=stride))]
    if not usable:
        longest = max(len(d.tokens) for d in docs)
        raise DataError(f"no document is long enough for one {protocol} window of {seq_len} "
                        f"tokens (longest: {longest} tokens in {len(docs)} documents)")
    return usable


def data_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The data section for the CLI's --data flags (held-out split for offline sources)."""
    cfg = default_data_config()
    cfg.source = args.data
    cfg.paths = tuple(p for p in (args.data_paths or "").split(",") if p)
    cfg.tfds_name, cfg.tfds_split = args.tfds_name, args.tfds_split
    cfg.text_field, cfg.token_dtype, cfg.add_bos = args.text_field, args.token_dtype, args.add_bos
    if args.tfds_data_dir:
        cfg.tfds_data_dir = args.tfds_data_dir
    return cfg


def parse_mesh(text: str) -> dict[str, int]:
    """"sequence=8,data=1" -> {"sequence": 8, "data": 1}."""
    shape = {}
    for part in filter(None, text.split(",")):
        axis, _, size = part.partition("=")
        try:
            shape[axis.strip()] = int(size)
        except ValueError:
            raise ConfigError(f"--mesh {text!r}: need axis=size pairs, e.g. sequence=8") from None
    return shape


@dataclasses.dataclass
class ModelResult:
    """One evaluated (model, RoPE variant): its perplexity and passkey results by length, and
    the evaluation documents as [name, tokens]."""

    name: str
    source: str
    rope: str
    context_window: int
    documents: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    perplexity: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    passkey: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def markdown(results: Sequence[ModelResult], lengths: Sequence[int], settings: dict) -> str:
    """results.md: a perplexity and a passkey table (those that ran), lengths as columns."""
    head = ["| model | rope | window | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|---|---:|" + "---:|" * len(lengths)]

    def rows(cell: Callable[[ModelResult, int], str]) -> list[str]:
        return [f"| {r.name} | {r.rope} | {r.context_window} | "
                + " | ".join(cell(r, n) for n in lengths) + " |" for r in results]

    def ppl_cell(r: ModelResult, n: int) -> str:
        if n not in r.perplexity:
            return ""
        return _fmt(r.perplexity[n]["ppl"]) + ("*" if n > r.context_window else "")

    def passkey_cell(r: ModelResult, n: int) -> str:
        return f"{r.passkey[n]['accuracy']:.2f}" if n in r.passkey else ""

    sections = []
    if any(r.perplexity for r in results):
        counts = {n: int(p["windows"]) for r in results for n, p in r.perplexity.items()}
        beyond = any(n > r.context_window for r in results for n in r.perplexity)
        sections.append([
            f"## Perplexity ({settings['protocol']} windows, data {settings['data']})", "",
            *head, *rows(ppl_cell), "",
            ("\\* beyond the model's context window. " if beyond else "")
            + "Windows per length: "
            + ", ".join(f"{n}: {counts[n]}" for n in lengths if n in counts) + "."])
    if any(r.passkey for r in results):
        sections.append([f"## Passkey retrieval ({settings['passkey']} trials per length)", "",
                         *head, *rows(passkey_cell)])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def write_outputs(out: pathlib.Path, results: Sequence[ModelResult], lengths: Sequence[int],
                  settings: dict) -> None:
    """results.json, results.md, ppl_vs_length.png and (with passkey) passkey_vs_length.png."""
    from longlora_jax import plots

    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "models": [dataclasses.asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results, lengths, settings))
    windows = {r.name: r.context_window for r in results}
    if any(r.perplexity for r in results):
        plots.perplexity_plot({r.name: {n: p["ppl"] for n, p in r.perplexity.items()}
                               for r in results}, out / "ppl_vs_length.png", windows=windows,
                              title=f"Perplexity vs context length ({settings['data']})")
    if any(r.passkey for r in results):
        plots.passkey_plot({r.name: {n: p["accuracy"] for n, p in r.passkey.items()}
                            for r in results}, out / "passkey_vs_length.png", windows=windows,
                           title="Passkey retrieval vs context length")


def evaluate_models(args: argparse.Namespace, log: Callable[[str], None]) -> list[ModelResult]:
    """Runs every (model, RoPE variant) over the lengths; what `main` writes out."""
    from longlora_jax.data.eval_data import eval_documents
    from longlora_jax.loading import load_model, parse_rope, place_variables, rope_label, with_rope
    from longlora_jax.passkey import passkey_accuracy

    lengths = parse_lengths(args.lengths)
    if args.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {args.protocol!r}; valid: {', '.join(PROTOCOLS)}")
    ropes = [parse_rope(text) for text in args.rope_factor.split(",") if text]
    mesh = sharding.make_mesh(parse_mesh(args.mesh))
    prefill_chunk = 0 if mesh.shape["sequence"] > 1 else args.prefill_chunk
    results = []
    for source in args.model:
        base = load_model(source, dtype=args.dtype)
        variants = []
        for rope in ropes:
            cfg = with_rope(base.cfg, rope)
            if any(cfg.rope_scaling == seen.rope_scaling for seen, _ in variants):
                continue  # e.g. "4" on a run trained with PI x4: the same model as "own"
            name = base.name if rope is None else f"{base.name} ({rope_label(cfg)})"
            check_lengths(cfg, lengths, name, allow=args.allow_beyond_context)
            variants.append((cfg, name))
        all_docs = [] if args.skip_perplexity else eval_documents(
            data_config(args), base.tokenizer, max_docs=args.max_docs)
        for cfg, name in variants:
            result = ModelResult(name, source, rope_label(cfg).removeprefix("rope "),
                                 cfg.context_window, [(d.name, len(d.tokens)) for d in all_docs])
            variables = place_variables(cfg, base.variables, mesh)
            eval_fn = make_eval_fn(LlamaForCausalLM(cfg), mesh, loss_chunk=args.loss_chunk,
                                   prefill_chunk=prefill_chunk)
            for n in lengths:
                if not args.skip_perplexity:
                    docs = documents_for(all_docs, n, args.protocol, args.stride)
                    start = time.perf_counter()
                    ppl = perplexity(eval_fn, variables, docs, seq_len=n, protocol=args.protocol,
                                     stride=args.stride, batch_size=args.batch,
                                     max_windows=args.max_windows)
                    ppl["seconds"] = time.perf_counter() - start
                    result.perplexity[n] = ppl
                    log(f"{name} | {n} tokens | ppl {ppl['ppl']:.3f} over {ppl['windows']} "
                        f"windows ({ppl['seconds']:.0f}s)")
                if args.passkey:
                    pk = passkey_accuracy(cfg, variables, base.tokenizer, n, trials=args.passkey,
                                          seed=args.seed, batch=args.batch, add_bos=args.add_bos,
                                          prefill_chunk=prefill_chunk)
                    result.passkey[n] = pk
                    log(f"{name} | {n} tokens | passkey {pk['correct']}/{pk['trials']}")
            results.append(result)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m longlora_jax.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True,
                   help="training workdir | smollm2 | hf:DIR | gguf:FILE | preset:NAME "
                        "(repeatable)")
    p.add_argument("--lengths", default="2048,4096,8192", help="comma list of context lengths")
    p.add_argument("--protocol", default="nonoverlap", help="official | nonoverlap")
    p.add_argument("--stride", type=int, default=256, help="official protocol: window stride")
    p.add_argument("--max-windows", type=int, default=4, help="windows per length (0 = all)")
    p.add_argument("--skip-perplexity", action="store_true", help="only run --passkey")
    p.add_argument("--batch", type=int, default=1, help="windows (passkey prompts) per forward")
    p.add_argument("--rope-factor", default="own",
                   help="comma list: own | none | F (linear PI) | linear:F | dynamic:F | yarn:F")
    p.add_argument("--allow-beyond-context", action="store_true",
                   help="evaluate lengths beyond a model's (scaled) context window")
    p.add_argument("--passkey", type=int, default=0, help="passkey trials per length (0 = none)")
    p.add_argument("--data", default="offline_books",
                   help="offline_books | offline_essays | offline_all | text_files | jsonl | "
                        "tfds | token_file")
    p.add_argument("--data-paths", default="", help="comma list of files/dirs/globs")
    p.add_argument("--max-docs", type=int, default=0, help="first N documents (0 = all)")
    p.add_argument("--tfds-name", default="pg19")
    p.add_argument("--tfds-split", default="test")
    p.add_argument("--tfds-data-dir", default="")
    p.add_argument("--text-field", default="text", help="jsonl / tfds text key (pg19: book_text)")
    p.add_argument("--token-dtype", default="uint16", help="token_file element type")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to documents and prompts")
    p.add_argument("--dtype", default="float32", help="weights and compute dtype")
    p.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. sequence=8")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="tokens per KV-cache chunk for long windows (0 = one forward)")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="passkey keys and depths")
    p.add_argument("--out", default="", help="directory for results.json/.md and PNG plots")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from longlora_jax import cli

    args = parser().parse_args(argv)

    def run() -> int:
        def log(line: str) -> None:
            print(line, flush=True)

        results = evaluate_models(args, log)
        settings = {k: getattr(args, k) for k in (
            "lengths", "protocol", "stride", "max_windows", "batch", "data", "data_paths",
            "rope_factor", "passkey", "prefill_chunk", "dtype", "mesh", "seed", "add_bos")}
        lengths = parse_lengths(args.lengths)
        print(markdown(results, lengths, settings))
        if args.out:
            write_outputs(pathlib.Path(args.out), results, lengths, settings)
            print(f"wrote {args.out}/results.json, results.md and plots")
        return 0

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
