"""The numbers in README.md and docs/*.md are the numbers in the JSON files under docs/.

Every result table in the docs pages is rendered here from its JSON file and must appear in
its page verbatim; every number in the README's headline table is one cell of `README_CELLS`
(a JSON file, a key path, a format) and must appear there verbatim, and no other number may.
Every relative link in README.md and docs/*.md must point to an existing file.

To regenerate a page's table after a new measurement: `python tests/test_docs_numbers.py`
prints every table with the page it belongs to. Reads JSON only; runs in well under a second.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def load(path):
    return json.loads((ROOT / path).read_text())


def get(path, *keys):
    value = load(path)
    for key in keys:
        value = value[key]
    return value


def by(rows, field, value):
    """The one dict in `rows` whose `field` equals `value`."""
    (row,) = [r for r in rows if r[field] == value]
    return row


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(ratio):
    """A relative change: +0.01% below 1%, +2.7% below 10%, else whole per cents (+53%)."""
    change = 100 * (ratio - 1)
    digits = 2 if abs(change) < 1 else 1 if abs(change) < 10 else 0
    return f"{change:+.{digits}f}%".replace("-", "−")


# ----- the tables of the docs pages, rendered from their JSON files -----

MINI = "docs/miniature_bytes/results.json"


def miniature_table():
    rows = []
    for v in load(MINI)["variants"]:
        seeds = len(v["seeds"])

        def ppl(n, v=v, seeds=seeds):
            mean = f"{v['ppl_mean'][n]:.2f}"
            return f"{mean} ± {v['ppl_spread'][n] / 2:.2f}" if seeds > 1 else mean

        cost = v.get("cost")
        rows.append([
            v["variant"], f"{v['trainable_params']:,}", ppl("256"), ppl("2048"), ppl("4096"),
            f"{v['passkey_mean']:.2f}",
            f"{cost['seconds_per_step']:.2f}" if cost else "-",
            f"{cost['temp_mib']:.0f}" if cost else "-",
            f"{cost['attention_gflop']:.1f}" if cost else "-"])
    return table(["variant", "trainable params", "ppl @256", "ppl @2048", "ppl @4096",
                  "passkey @2048", "s/step", "temp MiB", "attention GFLOP/step"], rows)


def eval_table(path, label="name"):
    """Perplexity (or, with no perplexity, passkey correct/trials) per model and length."""
    data = load(path)
    models = data["models"]
    lengths = sorted({int(n) for m in models for n in (m["perplexity"] or m["passkey"])})
    rows = []
    for m in models:
        cells = []
        for n in lengths:
            if m["perplexity"]:
                star = "*" if n > m["context_window"] else ""
                cells.append(f"{m['perplexity'][str(n)]['ppl']:.2f}{star}")
            else:
                p = m["passkey"][str(n)]
                cells.append(f"{p['correct']}/{p['trials']}")
        rows.append([m[label], m["rope"], m["context_window"], *cells])
    return table([label, "rope", "window", *map(str, lengths)], rows)


def _by_length(cells):
    """A results.json {"length": cell} dict's items, shortest length first."""
    return sorted(cells.items(), key=lambda kv: int(kv[0]))


def ruler_table(path):
    """RULER scores (percent) per model and length: a column per task, then the average."""
    models = load(path)["models"]
    tasks = list(next(iter(models[0]["ruler"].values()))["tasks"])
    rows = [[m["name"], n, *(f"{r['tasks'][t]['score']:.1f}" for t in tasks),
             f"{r['average']:.1f}"]
            for m in models for n, r in _by_length(m["ruler"])]
    return table(["model", "tokens", *tasks, "average"], rows)


def quant_table():
    models = load("docs/quant_smollm2/results.json")["models"]
    ref = by(models, "name", "smollm2 (none)")["perplexity"]["2048"]["ppl"]
    rows = []
    for m in models:
        ppl = m["perplexity"]["2048"]["ppl"]
        rows.append([m["name"], f"{ppl:.2f}", "-" if ppl == ref else pct(ppl / ref)])
    return table(["model (frozen projections)", "ppl @2048", "vs fp32 (dequantized Q4_1)"], rows)


QUALITY = "docs/quant_smollm2/quality.json"
RECOVERY = "docs/qlora/recovery.json"  # QLoRA recovery: the demo on 4-bit and float bases


def _recovery(name, key="gap_after"):
    """A recovery run's relative gap to its float base run, as +23.5%."""
    return f"{100 * by(load(RECOVERY)['runs'], 'name', name)[key]:+.1f}%"


def quality_table():
    rows = [[r["quantize"], f"{r['ppl']:.2f}",
             "-" if r["vs float"] == 1 else pct(r["vs float"]), f"{r['bits / param']:.3f}"]
            for r in load(QUALITY)["rows"]]
    return table(["frozen projections", "ppl @2048", "vs fp32 (dequantized Q4_1)",
                  "bits / parameter (bf16 parameters)"], rows)


def group_size_table():
    data = load("docs/quant_smollm2/group_size.json")
    ref = data["bf16_ppl"]
    rows = [[r["group"], *(f"{r[s]:.2f} ({pct(r[s] / ref)})" for s in ("int4", "nf4"))]
            for r in data["rows"]]
    return table(["input rows per scale", "int4", "nf4"], rows)


def memory_table():
    rows = [[r["quantize"], *(f"{r[k]:.3g}" for k in ("codes MiB", "scales MiB", "float MiB",
                                                       "frozen MiB")),
             f"{r.get('projections / ref', 1):.2f}", f"{r['frozen / ref']:.2f}",
             f"{r['host peak MiB']:.0f}"]
            for r in load("docs/quant_smollm2/memory.json")["rows"]]
    return table(["quantize", "codes MiB", "scales MiB", "float MiB (embeddings, norms)",
                  "frozen MiB", "projections / bf16", "frozen / bf16", "host peak MiB"], rows)


def qlora_speed_table():
    (row,) = load("docs/qlora/train_step.json")["rows"]
    rows = [["bf16", f"{row['longlora_jax s/step']:.1f}", "-"]]
    rows += [[q, f"{row[f'longlora_jax[{q}] s/step']:.1f}", f"{row[f'{q}/plain']:.2f}×"]
             for q in ("int8", "int4", "nf4")]
    return table(["frozen projections", "s/step", "vs bf16"], rows)


TRAIN = ("docs/bench/train_like_for_like.json", "docs/bench/train_like_for_like_16k.json")


def train_rows(paths=TRAIN):
    return [r for path in paths for r in load(path)["rows"]]


def _seconds(row, key):
    return f"{row[key]:.1f}" if key in row else "-"


def _ratio(row, key):
    return f"{row[key]:.2f}×" if key in row else "-"


def train_table(paths=TRAIN):
    rows = [[r["N"], *(_seconds(r, f"{s} s/step") for s in ("longlora_jax", "hf_peft_s2",
                                                             "longlora_jax_full",
                                                             "hf_peft_full")),
             *(_ratio(r, k) for k in ("S2: ours vs official", "full: ours vs HF",
                                      "S2 vs full (ours)", "S2 vs full (HF)")),
             f"{r['model GFLOP/step']:.0f}", f"{r['executed GFLOP/step']:.0f}",
             f"{r['XLA matmul GFLOP/s']:.0f}", f"{r['MFU']:.0%}", f"{r['HFU']:.0%}"]
            for r in train_rows(paths)]
    return table(["N", "S2 ours s/step", "S2 official (HF+PEFT) s/step", "full ours s/step",
                  "full HF+PEFT (SDPA) s/step", "S2: ours vs official", "full: ours vs HF",
                  "S2 vs full (ours)", "S2 vs full (HF)", "model GFLOP/step",
                  "executed GFLOP/step", "XLA matmul GFLOP/s", "MFU", "HFU"], rows)


def attention_table():
    rows = [[r["N"], r["heads"], r["G"], *(f"{r[k]:.3f}" for k in ("s2 s", "torch_s2 s",
                                                                   "full s", "torch s")),
             *(f"{r[k]:.2f}×" for k in ("S2: ours vs torch", "full: ours vs torch",
                                        "S2 vs full (ours)", "S2 vs full (torch)")),
             f"{r['FLOPs S2/full']:.2f}", f"{r['temp S2/full']:.2f}"]
            for r in load("docs/bench/attention.json")["rows"]]
    return table(["N", "heads", "G", "S2 ours s", "S2 official (torch) s", "full ours s",
                  "full torch SDPA s", "S2: ours vs torch", "full: ours vs torch",
                  "S2 vs full (ours)", "S2 vs full (torch)", "FLOPs S2/full",
                  "temp memory S2/full"], rows)


def matmul_table():
    rows = [[r["product"], r["shape"], f"{r['XLA GFLOP/s']:.0f}", f"{r['torch GFLOP/s']:.0f}",
             f"{r['XLA vs torch']:.2f}×"] for r in load("docs/bench/matmul.json")["rows"]]
    return table(["product", "shape", "XLA GFLOP/s", "torch GFLOP/s", "XLA vs torch"], rows)


SETTINGS = "docs/bench/settings_2048.json"


def settings_table(path=SETTINGS):
    """`bench settings`: each setting's step, its speed against the reference, temporaries
    and compile time; fastest first."""
    def step(r):  # seconds, or why the setting did not run
        return r["s/step"] if isinstance(r["s/step"], str) else f"{r['s/step']:.2f}"

    rows = sorted(load(path)["rows"], key=lambda r: min(r["seconds"], default=float("inf")))
    return table(["frozen dtype", "remat", "loss chunk", "s/step", "vs reference",
                  "temporaries GiB", "compile s"],
                 [[r["frozen_dtype"], r["remat"], r["loss_chunk"], step(r),
                   "-" if r["speed vs reference"] is None else f"{r['speed vs reference']:.2f}×",
                   f"{r['temp GiB']:.2f}", f"{r['compile s']:.0f}"] for r in rows])


LONGEST = ("docs/bench/longest_longlora_jax.json", "docs/bench/longest_hf_peft.json",
           "docs/bench/longest_longlora_jax_65536.json")
PROFILE_KINDS = ("matmul", "scatter/gather", "copy/transpose", "reduce", "elementwise")


def profile_table(path):
    """`bench profile`: per length the step, how busy the threads were, and the share of
    each kind of instruction."""
    rows = []
    for r in load(path)["rows"]:
        total = r["op thread-seconds"]
        rows.append([r["N"], f"{r['step s']:.1f}", f"{r['busy']:.0%}",
                     *(f"{r['by_kind'][k] / total:.1%}" for k in PROFILE_KINDS)])
    return table(["N", "step s", "busy", *PROFILE_KINDS], rows)


def _share(n, prefix, matmul=True, path="docs/bench/profile_before_rms_norm.json"):
    """The share of the step at N tokens emitted by places starting with `prefix`."""
    (r,) = [r for r in load(path)["rows"] if r["N"] == n]
    return sum(p["thread-seconds"] for p in r["by_place"] if p["place"].startswith(prefix)
               and (matmul or p["kind"] != "matmul")) / r["op thread-seconds"]


def _kernel_rest(n):
    return _share(n, "modeling/kernels.py", matmul=False)


def profile_places(path, n, top=8):
    """`bench profile` at N tokens: the `top` places (code, kind) by thread time."""
    (r,) = [r for r in load(path)["rows"] if r["N"] == n]
    total = r["op thread-seconds"]
    return table(["place", "kind", "share"],
                 [[f"`{p['place']}`", p["kind"], f"{p['thread-seconds'] / total:.1%}"]
                  for p in r["by_place"][:top]])


def longest_table():
    rows = []
    for path in LONGEST:
        data = load(path)
        for r in data["rows"]:
            for t in r["trials"]:
                rows.append([r["system"], t["N"], "trained" if t["ok"] else "killed",
                             f"{t['peak_gib']:.1f}", f"{t['seconds'] / 60:.1f}",
                             f"{data['meta']['memory_gb']}"])
    return table(["system", "N", "outcome", "peak GiB", "minutes", "budget GiB"], rows)


AOT = ("docs/qlora/aot/llama2_70b_32k_qlora.json", "docs/qlora/aot/llama2_13b_65k_int4.json",
       "docs/qlora/aot/llama2_7b_100k_one_chip.json")


# The one-chip report compiled before splash's backward ran in O(N) memory (commit 17e822d).
AOT_BEFORE_FIX = "docs/qlora/aot/llama2_7b_100k_one_chip_before_splash_fix.json"


def aot_table():
    rows = []
    for path in AOT:
        r = load(path)
        full = r.get("full_attention")
        rows.append([
            Path(path).stem, f"{r['topology']} ({r['chips']})",
            "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "sequence", "tensor")),
            r["seq_len"], r["quantize"], f"{r['params'] / 1e9:.1f}B",
            f"{r['per_chip_bytes'] / GIB:.1f}", "fits" if r["fits"] else "**does not fit**",
            f"{full['per_chip_bytes'] / GIB:.1f}" if full else "-",
            ("fits" if full["fits"] else "**does not fit**") if full else "-",
            f"{r['usable_hbm_bytes'] / GIB:.2f}", f"{r['compile_seconds']:.0f}"])
    return table(["report", "slice (chips)", "mesh d/f/s/t", "N", "quantize", "params",
                  "S2-Attn GiB/chip", "S2-Attn", "full attention GiB/chip", "full attention",
                  "usable GiB/chip", "compile s"], rows)


FUZZ = "docs/reliability/fuzz.json"


def fuzz_table():
    readers = load(FUZZ)["readers"]
    rows = [[name, r["inputs"], r["read"], r["refused"], r["failed"]]
            for name, r in readers.items()]
    rows.append(["all readers", *(sum(r[k] for r in readers.values())
                                  for k in ("inputs", "read", "refused", "failed"))])
    return table(["reader", "inputs tried", "read", "refused in one line", "anything else"],
                 rows)


def _fuzz_total():
    return sum(r["inputs"] for r in load(FUZZ)["readers"].values())


TABLES = {
    "docs/miniature_bytes.md": [miniature_table,
                          lambda: eval_table("docs/miniature_bytes/check_4x_steps_eval_attention/"
                                             "results.json")],
    "docs/speed.md": [train_table,
                      lambda: train_table(["docs/bench/train_like_for_like_8k_again.json"]),
                      matmul_table, attention_table, longest_table,
                      lambda: profile_table("docs/bench/profile_before_rms_norm.json"),
                      lambda: profile_places("docs/bench/profile_before_rms_norm.json", 8192),
                      lambda: profile_places("docs/bench/profile_before_rms_norm.json", 16384),
                      settings_table],
    "docs/qlora.md": [quant_table, quality_table, group_size_table, memory_table,
                      qlora_speed_table,
                      lambda: (ROOT / "docs/qlora/recovery.md").read_text().strip()],
    "docs/fit.md": [aot_table],
    "docs/reliability.md": [fuzz_table],
    "README.md": [quality_table],
    "docs/evaluation.md": [lambda: eval_table("docs/eval_attention_smollm2/results.json"),
                           lambda: eval_table("docs/eval_demo/results.json"),
                           lambda: eval_table("docs/eval_smollm2/results.json"),
                           lambda: eval_table("docs/passkey_smollm2/results.json"),
                           lambda: _md_table("docs/lm_eval/side_by_side.md"),
                           lambda: ruler_table(RULER),
                           lambda: ruler_table("docs/ruler_smollm2_pi4/results.json")],
}


def _md_table(path):
    """The markdown table a docs script wrote (its lines that start with '|')."""
    return "\n".join(ln for ln in (ROOT / path).read_text().splitlines() if ln.startswith("|"))


SIDE = "docs/lm_eval/side_by_side.json"
RULER = "docs/ruler_smollm2/results.json"


def _ruler_averages(name):
    """A model's RULER averages by length, as " / "-joined cells."""
    (model,) = [m for m in load(RULER)["models"] if m["name"] == name]
    return " / ".join(f"{r['average']:.1f}" for _, r in _by_length(model["ruler"]))

# ----- the README's headline table: each number is one of these cells -----


def _mini(variant, n="2048"):
    return by(load(MINI)["variants"], "variant", variant)["ppl_mean"][n]


def _train(n, key):
    return by(train_rows(), "N", n)[key]


def _quant(name):
    models = load("docs/quant_smollm2/results.json")["models"]
    ref = by(models, "name", "smollm2 (none)")["perplexity"]["2048"]["ppl"]
    return by(models, "name", name)["perplexity"]["2048"]["ppl"] / ref


def _quality(name):
    return by(load(QUALITY)["rows"], "quantize", name)["vs float"]


def _hqq_share():
    """The part of nf4's perplexity increase that hqq4 removes."""
    return (_quality("nf4") - _quality("hqq4")) / (_quality("nf4") - 1)


def _aot(*keys):
    return get(AOT[0], *keys)


def _mini_cost(variant):
    return by(load(MINI)["variants"], "variant", variant)["cost"]["attention_gflop"]


def _demo(name, n="8192"):
    return by(load("docs/eval_demo/results.json")["models"], "name", name)["perplexity"][n]["ppl"]


def _passkey_best():
    trials = get(MINI, "scale", "passkey_trials")
    best = max(v["passkey_mean"] for v in load(MINI)["variants"])
    return f"{best * trials:.0f}/{trials}"


LONG = "docs/miniature/results.json"  # the long-range miniature
# LoRA+ with S2, LoRA+ with full attention, full fine-tuning with full attention
LS2, LP, LFULL = "LoRA+, S2-Attn (LongLoRA)", "LoRA+, full attention", "full FT, full attention"


def _long(variant, steps, metric="text_ppl"):
    """A summary mean of the long-range miniature, as its page writes it."""
    return f"{get(LONG, 'summary', variant, steps, metric)[0]:.2f}"


def _long_cost(variant, key):
    return by(load(LONG)["variants"], "variant", variant)["cost"][key]


def _long_window(task, key):
    rows = by(load(LONG)["variants"], "variant", "base, no PI (no fine-tuning)")
    (cell,) = rows["results"]["0"]["-"]["at_window"][task].values()
    return f"{cell[key]:.2f}"


def _long_verdicts(steps, claim):
    (row,) = [c for c in load(LONG)["claims"] if c["steps"] == steps and c["claim"] == claim]
    return row["verdict"]


LONG_PAGE = "docs/miniature.md"
LONG_CELLS = [
    (_long_window("niah_single", "accuracy"), "base at its window: niah accuracy"),
    (_long_window("repeat", "ppl"), "base at its window: repeat ppl"),
    (f"{_long(LS2, '1x')} vs {_long(LP, '1x')}", "LoRA+ S2 vs full, 1x"),
    (f"{_long(LS2, '4x')} vs {_long(LP, '4x')}", "LoRA+ S2 vs full, 4x"),
    (f"{_long('full FT, S2-Attn', '4x')} vs {_long(LFULL, '4x')}", "full FT S2 vs full, 4x"),
    (f"{_long(LS2, '4x', 'text_ppl_2x')} vs {_long(LP, '4x', 'text_ppl_2x')}", "2x target"),
    (f"{_long('full FT, S2-Attn', '4x', 'text_ppl_2x')} vs "
     f"{_long(LFULL, '4x', 'text_ppl_2x')}", "full FT at 2x target"),
    (f"{_long(LS2, '4x', 'text_ppl_s2')} vs {_long(LS2, '4x')}", "S2-eval vs full-eval"),
    (f"{_long('LoRA large rank, S2-Attn', '4x', 'text_ppl_s2')} vs "
     f"{_long('LoRA large rank, S2-Attn', '4x')}", "rank 64: S2-eval vs full-eval"),
    (f"{_long('LoRA+, S2-Attn, last 1/4 full attention', '4x', 'text_ppl_2x')} vs "
     f"{_long(LS2, '4x', 'text_ppl_2x')}", "tail vs S2 at 2x"),
    (f"full attention's {_long(LP, '4x', 'text_ppl_2x')}", "full attention at 2x"),
    (f"to {_long('LoRA+, S2-Attn + sinks', '4x', 'text_ppl_2x')} (holds)", "sinks at 2x"),
    (f"({_long('LoRA+, S2-Attn, last 1/4 full attention', '4x')} and "
     f"{_long('LoRA+, S2-Attn + sinks', '4x')} vs {_long(LS2, '4x')}", "fixes at the target"),
    (f"({_long(LS2, '4x')} vs {_long('LoRA, S2-Attn', '4x')} at 100 steps", "LoRA+ vs LoRA"),
    (f"({_long('LoRA+, S2-Attn, wrap (Algorithm 1)', '4x')} vs {_long(LS2, '4x')})", "wrap"),
    (f"({_long_cost(LS2, 'attention_gflop'):.2f} vs {_long_cost(LP, 'attention_gflop'):.2f} "
     "GFLOP", "attention GFLOP per step"),
    (f"takes {_long_cost(LS2, 'seconds_per_step'):.2f} s against "
     f"{_long_cost(LP, 'seconds_per_step'):.2f} s", "seconds per step"),
    (f"sinks add {_long_cost('LoRA+, S2-Attn + sinks', 'seconds_per_step'):.2f} s", "sinks step"),
    (f"took {get(LONG, 'seconds') / 60:.0f} min", "whole command minutes"),
    (f"{get(LONG, 'pretrain_seconds') / 60:.0f} of them pretraining", "pretraining minutes"),
]
LONG_VERDICTS = [  # (steps, claim, verdict the page states)
    ("4x", "S2-Attn fine-tunes as well as full attention (LoRA+), text", "fails"),
    ("1x", "S2-Attn fine-tunes as well as full attention (LoRA+), text", "not decided"),
    ("4x", "S2-Attn fine-tunes as well as full attention (full FT), text", "fails"),
    ("4x", "S2-Attn as good as full attention (LoRA+), text at twice the target", "fails"),
    ("4x", "S2-Attn as good as full attention (full FT), text at twice the target", "fails"),
    ("4x", "a full-attention tail closes the S2 gap, text at twice the target", "holds"),
    ("4x", "sinks close the S2 gap, text at twice the target", "holds"),
    ("4x", "a full-attention tail closes the S2 gap, text", "holds"),
    ("4x", "sinks close the S2 gap, text", "holds"),
    ("4x", "LoRA+ beats LoRA, text", "fails"),
    ("4x", "wrap (Algorithm 1) vs the official segments, text", "holds"),
    ("4x", "the shift is needed: S2 beats short attention, retrieval beyond one group",
     "not decided"),
]

# (text the README must contain in its headline table, the value it is formatted from)
README_CELLS = [
    (f"base {_ruler_averages('smollm2')}", "RULER: SmolLM2 as released, by length"),
    (f"demo {_ruler_averages('demo')}", "RULER: the demo run, by length"),
    (_recovery("nf4"), "QLoRA recovery: nf4 after 20 steps"),
    (_recovery("nf4", "gap_before"), "QLoRA recovery: nf4 before training"),
    (_recovery("nf4_80"), "QLoRA recovery: nf4 after 80 steps"),
    (_recovery("hqq4"), "QLoRA recovery: hqq4 after 20 steps"),
    (_recovery("float_seed1").lstrip("+"), "QLoRA recovery: float seeds' spread"),
    (f"{_train(2048, 'S2: ours vs official'):.2f}×", "N=2048 S2: ours vs official"),
    (f"{_train(8192, 'S2: ours vs official'):.2f}×", "N=8192 S2: ours vs official"),
    (f"{_train(16384, 'S2: ours vs official'):.2f}×", "N=16384 S2: ours vs official"),
    (f"{_train(8192, 'longlora_jax s/step'):.1f} s", "N=8192 ours s/step"),
    (f"{_train(8192, 'hf_peft_s2 s/step'):.1f} s", "N=8192 official S2 s/step"),
    (f"{_train(8192, 'full: ours vs HF'):.2f}×", "N=8192 full: ours vs HF"),
    (f"{_train(8192, 'S2 vs full (ours)'):.2f}×", "N=8192 S2 vs full (ours)"),
    (f"{_train(8192, 'S2 vs full (HF)'):.2f}×", "N=8192 S2 vs full (HF)"),
    (f"MFU {_train(8192, 'MFU'):.0%}", "N=8192 MFU"),
    (f"HFU {_train(8192, 'HFU'):.0%}", "N=8192 HFU"),
    (f"{get('docs/bench/matmul.json', 'rows', -1, 'XLA vs torch'):.2f}×",
     "XLA vs torch fp32 matmul rate on the step's products"),
    (f"{get(LONGEST[2], 'rows', 0, 'longest N')}", "ours: longest N"),
    (f"{get(LONGEST[2], 'rows', 0, 'peak GiB at it'):.1f} GiB", "ours: peak GiB at it"),
    (f"{get(LONGEST[2], 'rows', 0, 'trials', 0, 'seconds') / 60:.0f} min", "ours: the step's time"),
    (f"{get(LONGEST[1], 'rows', 0, 'first N that failed')}", "peer: first N that failed"),
    (f"{get(LONGEST[1], 'rows', 0, 'trials', 0, 'peak_gib'):.1f} GiB", "peer: peak GiB"),
    (f"{get(LONGEST[0], 'meta', 'memory_gb')} GiB", "the memory budget (GiB: bench/longest)"),
    (f"{_aot('per_chip_bytes') / GIB:.1f} GiB", "70B QLoRA: S2 per chip"),
    (f"{_aot('usable_hbm_bytes') / GIB:.2f}", "v4 usable HBM per chip"),
    (f"{_aot('full_attention', 'per_chip_bytes') / GIB:.1f} GiB", "70B QLoRA: full per chip"),
    (_aot("topology"), "70B QLoRA: slice"),
    (f"{_aot('seq_len')}", "70B QLoRA: N"),
    (f"{get(AOT[2], 'per_chip_bytes') / GIB:.1f} GiB", "7B @ 100k one chip: per chip"),
    (f"{get(AOT[2], 'usable_hbm_bytes') / GIB:.2f}", "v5p usable HBM per chip"),
    (f"{get(AOT[2], 'per_chip', 'temp') / GIB:.1f} GiB", "7B @ 100k one chip: temporaries"),
    (f"{get(AOT[2], 'seq_len'):,}", "7B @ 100k one chip: N"),
    (f"{get(AOT_BEFORE_FIX, 'per_chip_bytes') / GIB:.0f} GiB", "7B @ 100k before the fix"),
    (pct(_quant("smollm2 (int8)")), "int8 ppl vs fp32"),
    (pct(_quant("smollm2 (nf4)")), "nf4 ppl vs fp32"),
    (pct(_quant("smollm2 (int4)")), "int4 ppl vs fp32"),
    (pct(_quality("hqq4")), "hqq4 ppl vs fp32"),
    (f"{_hqq_share():.0%} of nf4's increase", "hqq4's share of nf4's increase"),
    (f"{get('docs/qlora/train_step.json', 'rows', 0, 'nf4/plain'):.2f}×", "nf4 step vs bf16"),
    (_long(LS2, "4x"), "long miniature: LoRA+ S2 @1024, 4x"),
    (_long(LP, "4x"), "long miniature: LoRA+ full @1024, 4x"),
    (_long(LS2, "4x", "text_ppl_2x"), "long miniature: LoRA+ S2 @2048, 4x"),
    (_long(LP, "4x", "text_ppl_2x"), "long miniature: LoRA+ full @2048, 4x"),
    (_long("LoRA+, S2-Attn, last 1/4 full attention", "4x", "text_ppl_2x"),
     "long miniature: LoRA+ S2 + full tail @2048, 4x"),
    (f"{_demo('smollm2 (rope linear x4)'):.1f}", "demo eval: PI x4 untrained @8192"),
    (f"{_demo('demo'):.1f}", "demo eval: fine-tuned @8192"),
]

# Numbers in the prose of the docs pages and the README (page, text it must contain, what)
DOC_CELLS = [
    ("README.md", f"{get('docs/tests/tier1.json', 'seconds') / 60:.1f} min", "tier one time"),
    ("README.md", f"{get('docs/tests/tier2.json', 'seconds') / 60:.1f} min", "tier two time"),
    ("README.md", f"{_fuzz_total()} hostile inputs", "fuzz inputs, all readers"),
    ("docs/miniature_bytes.md", pct(_mini("full FT, S2-Attn") / _mini("full FT, full attention")),
     "S2 vs full attention, full FT, @2048"),
    ("docs/miniature_bytes.md",
     pct(_mini("full FT, S2-Attn", "4096") / _mini("full FT, full attention", "4096")),
     "S2 vs full attention, full FT, @4096"),
    ("docs/miniature_bytes.md", pct(_mini("LoRA+, S2-Attn (LongLoRA)") / _mini("LoRA, S2-Attn")),
     "LoRA+ vs LoRA @2048"),
    ("docs/miniature_bytes.md",
     f"all {sum(len(v['seeds']) for v in load(MINI)['variants'] if v['trainable_params'])} runs",
     "fine-tuning runs in results.json"),
    ("docs/miniature_bytes.md", f"{get(MINI, 'pretrain_seconds'):.0f} s", "pretraining seconds"),
    ("docs/miniature_bytes.md", f"{get(MINI, 'train_seconds'):.0f} s", "fine-tuning seconds"),
    ("docs/miniature_bytes.md", f"{get(MINI, 'seconds'):.0f} s", "whole invocation seconds"),
    ("docs/miniature_bytes.md", _passkey_best(), "best passkey of any variant"),
    ("docs/qlora.md", f"took {sum(r['seconds'] for r in load(QUALITY)['rows']) / 60:.0f} min",
     "quality bench minutes"),
    ("docs/qlora.md", f"removes {_hqq_share():.0%} of nf4's", "hqq4's share of nf4's increase"),
    ("docs/fit.md", f"{_aot('per_chip', 'arguments') / GIB:.2f} GiB", "70B QLoRA arguments"),
    ("docs/fit.md", f"{_aot('arguments_bytes', 'frozen_weights') / GIB:.2f} GiB",
     "70B QLoRA frozen weights"),
    ("docs/fit.md", f"{_aot('per_chip', 'temp') / GIB:.2f} GiB", "70B QLoRA temporaries"),
    ("docs/fit.md", f"{_aot('est_step_seconds'):.1f} s", "70B QLoRA ideal step"),
    ("README.md", f"same accuracy\n({get(SIDE, 'summary', 'acc_longlora_jax'):.4f})",
     "lm-eval side by side: accuracy"),
    ("README.md", f"{get(SIDE, 'summary', 'generations_identical')}/"
     f"{get(SIDE, 'summary', 'generations')} identical", "lm-eval side by side: generations"),
    ("README.md", f"within {get(SIDE, 'summary', 'mc_max_abs_diff'):.1e} (multiple\nchoice) and "
     f"{get(SIDE, 'summary', 'rolling_max_rel_diff'):.1e} relative", "lm-eval: loglikelihoods"),
    ("docs/speed.md", f"{_kernel_rest(8192):.0%} of the step at 8192, {_kernel_rest(16384):.0%} "
     "at\n  16384", "the attention kernel's non-matmul share"),
    ("docs/speed.md", f"is {_share(8192, 'modeling/attention.py'):.1%} at 8192 and "
     f"{_share(16384, 'modeling/attention.py'):.1%} at 16384", "attention.py's own share"),
    ("docs/speed.md", f"{get('docs/bench/norms_ab.json', 'rows', 0, 'speed-up'):.2f}× faster at "
     f"{get('docs/bench/norms_ab.json', 'rows', 0, 'N')} tokens", "written-out norms' gain"),
    ("docs/evaluation.md", f"agree within {get(SIDE, 'summary', 'mc_max_abs_diff'):.1e}",
     "lm-eval side by side: MC loglikelihoods"),
    ("docs/evaluation.md", f"differ by up to {get(SIDE, 'summary', 'rolling_max_abs_diff'):.1e}:"
     f" {get(SIDE, 'summary', 'rolling_max_rel_diff'):.1e} of the sum, "
     f"{get(SIDE, 'summary', 'rolling_max_diff_per_token'):.1e} per", "rolling loglikelihoods"),
]

# Numbers in the headline table that are names, not results (model sizes, lengths in labels).
README_LABELS = {"2", "3", "4", "7", "8", "11", "20", "30", "70", "80", "100", "135", "256",
                 "1024", "2048", "4096", "8192", "16384"}
NUMBER = r"(?<![A-Za-z\d._])\d+(?:[.,]\d+)*"  # not the digits of a name (bf16, int4, S2, Q4_1)


def headline_table(text):
    """The README's table that follows its `<!-- headline: ... -->` marker."""
    match = re.search(r"<!-- headline:[^>]*-->\n((?:\|.*\n)+)", text)
    assert match, "README.md has no table after a <!-- headline: ... --> marker"
    return match.group(1)


def test_every_headline_cell_equals_its_json_source():
    rows = headline_table((ROOT / "README.md").read_text())
    missing = [(cell, what) for cell, what in README_CELLS if cell not in rows]
    assert not missing, f"README headline cells that differ from their JSON source: {missing}"


def test_the_headline_table_has_no_number_without_a_source():
    rows = headline_table((ROOT / "README.md").read_text()).splitlines()[2:]
    sourced = {n for cell, _ in README_CELLS for n in re.findall(NUMBER, cell)}
    for row in rows:
        row = re.sub(r"\]\([^)]*\)", "]", row)          # link targets are paths, not results
        for number in re.findall(NUMBER, row):
            assert number in README_LABELS or number in sourced, (
                f"README headline number {number!r} has no entry in README_CELLS: {row}")


def test_every_docs_table_equals_its_json_source():
    for page, renderers in TABLES.items():
        text = (ROOT / page).read_text()
        for render in renderers:
            rendered = render()
            assert rendered in text, f"{page} lacks this table (from JSON):\n{rendered}"


def test_every_docs_prose_number_equals_its_json_source():
    missing = [(page, text, what) for page, text, what in DOC_CELLS
               if text not in (ROOT / page).read_text()]
    assert not missing, f"docs numbers that differ from their JSON source: {missing}"


def test_every_relative_link_points_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


if __name__ == "__main__":
    for page, renderers in TABLES.items():
        for render in renderers:
            print(f"<!-- {page} -->\n{render()}\n")
    print("<!-- README headline cells -->")
    for cell, what in README_CELLS:
        print(f"{cell!r:>12}  {what}")


def test_the_long_range_miniature_page_quotes_its_results():
    page = (ROOT / LONG_PAGE).read_text().replace("\n", " ")
    missing = [(text, what) for text, what in LONG_CELLS if text not in page]
    assert not missing, f"{LONG_PAGE} does not quote these numbers of {LONG}: {missing}"
    for steps, claim, verdict in LONG_VERDICTS:
        assert _long_verdicts(steps, claim) == verdict, (steps, claim)


def test_the_lm_eval_side_by_side_supports_the_readme():
    """README: "the same accuracy", "identical greedy generations" (of all of them)."""
    summary = get(SIDE, "summary")
    assert summary["acc_hf"] == summary["acc_longlora_jax"]
    assert summary["acc_norm_hf"] == summary["acc_norm_longlora_jax"]
    assert summary["generations_identical"] == summary["generations"]
