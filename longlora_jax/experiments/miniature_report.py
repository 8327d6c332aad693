"""The miniature's report: summary numbers, the claims decided against the seeds' spread,
results.json, results.md and plots (`write_report`).

Every number is a mean over seeds with its spread (max - min). A claim compares two rows: it
holds (or fails) when the difference of their means is larger than the larger spread of the
two, and is "not decided" otherwise.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from collections.abc import Callable
from typing import Any

from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.plots import line_plot, scatter_plot

NIAH = ("niah_single", "niah_multikey")
Stat = tuple[float, float]  # mean, spread over seeds


# ----------------------------------------------------------------------------- numbers


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _stat(values: list[float]) -> Stat | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return statistics.fmean(values), max(values) - min(values)


def _seeds(row: dict[str, Any], steps: str) -> list[dict[str, Any]]:
    """The row's results at `steps` for every seed (the references: their one result)."""
    results = row["results"]
    if "0" in results and "-" in results["0"]:
        return [results["0"]["-"]]
    return [per_seed[steps] for per_seed in results.values() if steps in per_seed]


def niah_accuracy(result: dict[str, Any], bucket: str | None = None,
                  tasks: tuple[str, ...] = NIAH) -> float:
    """Row-weighted accuracy over `tasks` (in one bucket, or all)."""
    hits = rows = 0.0
    for task in tasks:
        for name, cell in result.get(task, {}).items():
            if bucket is None or name == bucket:
                hits += cell["accuracy"] * cell["rows"]
                rows += cell["rows"]
    return hits / rows if rows else float("nan")


def repeat_ppl(result: dict[str, Any], bucket: str | None = None) -> float:
    """Repeated-passage perplexity (in one bucket, or the geometric mean over buckets)."""
    cells = [c for name, c in result.get("repeat", {}).items() if bucket in (None, name)]
    if not cells:
        return float("nan")
    return math.exp(statistics.fmean(math.log(c["ppl"]) for c in cells))


def _metrics(report: dict[str, Any]) -> dict[str, Callable[[dict[str, Any]], float]]:
    target = str(report["scale"]["base_context"] * report["scale"]["factor"])
    twice = str(2 * int(target))
    far = [f"{lo}-{hi}" for lo, hi in report["buckets"]][1:]  # beyond one group
    return {
        "text_ppl": lambda r: r["ppl"][target],
        "text_ppl_2x": lambda r: r["ppl"][twice],
        "text_ppl_s2": lambda r: r["sparse"]["ppl"][target],
        "repeat_ppl": lambda r: repeat_ppl(r["tasks"]),
        "niah_acc": lambda r: niah_accuracy(r["tasks"]),
        "niah_acc_far": lambda r: statistics.fmean(niah_accuracy(r["tasks"], b) for b in far),
        "niah_single_acc_s2": lambda r: niah_accuracy(r["sparse"]["tasks"],
                                                      tasks=("niah_single",)),
        "niah_single_acc": lambda r: niah_accuracy(r["tasks"], tasks=("niah_single",)),
        "vt_acc": lambda r: niah_accuracy(r["tasks"], tasks=("vt",)),
    }


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per variant and steps: every metric's (mean, spread), the recovery ratios
    R = (PI - variant) / (PI - full FT with full attention) on text and repeated-passage
    perplexity, the niah accuracy gap to that row, and the train/test attention gaps."""
    metrics = _metrics(report)
    rows = {row["variant"]: row for row in report["variants"]}
    pi = _seeds(rows["base + PI (no fine-tuning)"], "-")[0]
    out: dict[str, Any] = {}
    for steps in report["lengths"]:
        ref = [metrics["text_ppl"](r) for r in _seeds(rows["full FT, full attention"], steps)]
        ref_rep = [metrics["repeat_ppl"](r) for r in _seeds(rows["full FT, full attention"],
                                                            steps)]
        ref_acc = [metrics["niah_acc"](r) for r in _seeds(rows["full FT, full attention"],
                                                          steps)]
        for name, row in rows.items():
            if row["mode"] is None and steps != next(iter(report["lengths"])):
                continue
            seeds = _seeds(row, steps)
            if not seeds:
                continue
            entry = {k: _stat([f(r) for r in seeds]) for k, f in metrics.items()}
            gain = metrics["text_ppl"](pi) - statistics.fmean(ref)
            gain_rep = metrics["repeat_ppl"](pi) - statistics.fmean(ref_rep)
            entry["recovery_text"] = _stat([
                _ratio(metrics["text_ppl"](pi) - metrics["text_ppl"](r), gain) for r in seeds])
            entry["recovery_repeat"] = _stat([
                _ratio(metrics["repeat_ppl"](pi) - metrics["repeat_ppl"](r), gain_rep)
                for r in seeds])
            entry["niah_gap_to_full_ft"] = _stat([metrics["niah_acc"](r)
                                                  - statistics.fmean(ref_acc) for r in seeds])
            entry["s2_eval_text_gap"] = _stat([metrics["text_ppl_s2"](r)
                                               - metrics["text_ppl"](r) for r in seeds])
            entry["s2_eval_niah_gap"] = _stat([metrics["niah_single_acc_s2"](r)
                                               - metrics["niah_single_acc"](r) for r in seeds])
            out.setdefault(name, {})["-" if row["mode"] is None else steps] = entry
    return out


# ----------------------------------------------------------------------------- claims


def compare(summary: dict[str, Any], a: str, b: str, metric: str, steps: str, *,
            higher_is_better: bool) -> dict[str, Any]:
    """Whether row `a` is better than row `b` on `metric`: "holds", "fails" or "not decided"
    (the difference is within the larger spread of the two rows)."""
    (ma, sa), (mb, sb) = summary[a][steps][metric], summary[b][steps][metric]
    diff = ma - mb
    better = diff > 0 if higher_is_better else diff < 0
    verdict = "not decided" if abs(diff) <= max(sa, sb) else ("holds" if better else "fails")
    return {"a": a, "b": b, "metric": metric, "steps": steps, "a_mean": ma, "a_spread": sa,
            "b_mean": mb, "b_spread": sb, "difference": diff, "verdict": verdict}


# (claim, row a, row b, metric, higher is better); "a is at least as good as b" claims are
# judged "holds" when a is better or the difference is not decided -- said in the sentence.
CLAIMS = (
    ("S2-Attn fine-tunes as well as full attention (LoRA+), text", "LoRA+, S2-Attn (LongLoRA)",
     "LoRA+, full attention", "text_ppl", False),
    ("S2-Attn fine-tunes as well as full attention (LoRA+), retrieval",
     "LoRA+, S2-Attn (LongLoRA)", "LoRA+, full attention", "niah_acc", True),
    ("S2-Attn fine-tunes as well as full attention (full FT), text", "full FT, S2-Attn",
     "full FT, full attention", "text_ppl", False),
    ("S2-Attn as good as full attention (LoRA+), text at twice the target",
     "LoRA+, S2-Attn (LongLoRA)", "LoRA+, full attention", "text_ppl_2x", False),
    ("S2-Attn as good as full attention (full FT), text at twice the target",
     "full FT, S2-Attn", "full FT, full attention", "text_ppl_2x", False),
    ("the shift is needed: S2 beats short attention, retrieval beyond one group",
     "LoRA+, S2-Attn (LongLoRA)", "LoRA+, short attention (no shift)", "niah_acc_far", True),
    ("the shift is needed: S2 beats short attention, repeated passages",
     "LoRA+, S2-Attn (LongLoRA)", "LoRA+, short attention (no shift)", "repeat_ppl", False),
    ("LoRA+ beats LoRA, text", "LoRA+, S2-Attn (LongLoRA)", "LoRA, S2-Attn", "text_ppl", False),
    ("LoRA+ beats LoRA, retrieval", "LoRA+, S2-Attn (LongLoRA)", "LoRA, S2-Attn", "niah_acc",
     True),
    ("sinks close the S2 gap, text", "LoRA+, S2-Attn + sinks", "LoRA+, S2-Attn (LongLoRA)",
     "text_ppl", False),
    ("sinks close the S2 gap, retrieval", "LoRA+, S2-Attn + sinks",
     "LoRA+, S2-Attn (LongLoRA)", "niah_acc", True),
    ("a full-attention tail closes the S2 gap, text",
     "LoRA+, S2-Attn, last 1/4 full attention", "LoRA+, S2-Attn (LongLoRA)", "text_ppl", False),
    ("sinks close the S2 gap, text at twice the target", "LoRA+, S2-Attn + sinks",
     "LoRA+, S2-Attn (LongLoRA)", "text_ppl_2x", False),
    ("a full-attention tail closes the S2 gap, text at twice the target",
     "LoRA+, S2-Attn, last 1/4 full attention", "LoRA+, S2-Attn (LongLoRA)", "text_ppl_2x",
     False),
    ("a full-attention tail closes the S2 gap, retrieval",
     "LoRA+, S2-Attn, last 1/4 full attention", "LoRA+, S2-Attn (LongLoRA)", "niah_acc", True),
    ("wrap (Algorithm 1) vs the official segments, text", "LoRA+, S2-Attn, wrap (Algorithm 1)",
     "LoRA+, S2-Attn (LongLoRA)", "text_ppl", False),
)


def claims(summary: dict[str, Any], lengths: list[str]) -> list[dict[str, Any]]:
    out = []
    for steps in lengths:
        for text, a, b, metric, higher in CLAIMS:
            if a in summary and b in summary:
                out.append({"claim": text, **compare(summary, a, b, metric, steps,
                                                     higher_is_better=higher)})
    return out


# ----------------------------------------------------------------------------- rendering


def _cell(stat: Stat | None, fmt: str = "{:.2f}") -> str:
    if stat is None:
        return "-"
    mean, spread = stat
    return fmt.format(mean) + (f" ± {fmt.format(spread / 2)}" if spread else "")


def markdown(report: dict[str, Any], summary: dict[str, Any], decided: list[dict]) -> str:
    scale = report["scale"]
    target, base = scale["base_context"] * scale["factor"], scale["base_context"]
    bucket_names = [f"{lo}-{hi}" for lo, hi in report["buckets"]]
    rows = {row["variant"]: row for row in report["variants"]}
    lines = [f"Base window {base} bytes, extended {scale['factor']}x to {target} with linear "
             f"position interpolation, S2 group G = {target // 4}; mean ± half the spread over "
             f"seeds {', '.join(map(str, scale['seeds']))}. Steps: "
             + ", ".join(f"{k} = {v}" for k, v in report["lengths"].items()) + ".", "",
             "## Summary", "",
             f"| variant | steps | text ppl @{target} | R text | repeat ppl | R repeat | "
             f"niah acc | gap to full FT | niah acc > G | vt acc | S2-eval text ppl | "
             f"S2-eval − full, niah_single |", "|---|---|" + "---:|" * 10]
    for name, per_steps in summary.items():
        for steps, e in per_steps.items():
            lines.append(
                f"| {name} | {steps} | {_cell(e['text_ppl'])} | {_cell(e['recovery_text'])} | "
                f"{_cell(e['repeat_ppl'])} | {_cell(e['recovery_repeat'])} | "
                f"{_cell(e['niah_acc'])} | {_cell(e['niah_gap_to_full_ft'], '{:+.2f}')} | "
                f"{_cell(e['niah_acc_far'])} | {_cell(e['vt_acc'])} | "
                f"{_cell(e['text_ppl_s2'])} | {_cell(e['s2_eval_niah_gap'], '{:+.2f}')} |")
    lines += ["", "R = (ppl of base + PI − ppl of the variant) / (ppl of base + PI − ppl of "
              "full FT with full attention), at the same steps; niah = niah_single and "
              "niah_multikey pooled (exact greedy answer); > G: the buckets beyond one group; "
              "S2-eval: the same model evaluated with its S2 (or short) attention.", "",
              "## Claims", "", "| claim | steps | a | b | difference | verdict |",
              "|---|---|---:|---:|---:|---|"]
    for c in decided:
        lines.append(f"| {c['claim']} | {c['steps']} | {c['a_mean']:.3f} ± "
                     f"{c['a_spread'] / 2:.3f} | {c['b_mean']:.3f} ± {c['b_spread'] / 2:.3f} | "
                     f"{c['difference']:+.3f} | {c['verdict']} |")
    lines += ["", "A claim is decided when the difference of means exceeds the larger of the "
              "two rows' seed spreads (max − min); otherwise it is not decided.", "",
              "## Retrieval by distance (full attention)", "",
              "| variant | steps | " + " | ".join(f"niah {b}" for b in bucket_names) + " | "
              + " | ".join(f"vt {b}" for b in bucket_names) + " | "
              + " | ".join(f"repeat ppl {b}" for b in bucket_names) + " |",
              "|---|---|" + "---:|" * (3 * len(bucket_names))]
    lengths = list(report["lengths"])
    for name, row in rows.items():
        for steps in (["-"] if row["mode"] is None else lengths):
            seeds = _seeds(row, lengths[0] if steps == "-" else steps)
            cells = [_stat([niah_accuracy(r["tasks"], b) for r in seeds]) for b in bucket_names]
            cells += [_stat([niah_accuracy(r["tasks"], b, ("vt",)) for r in seeds])
                      for b in bucket_names]
            cells += [_stat([repeat_ppl(r["tasks"], b) for r in seeds]) for b in bucket_names]
            lines.append(f"| {name} | {steps} | " + " | ".join(_cell(c) for c in cells) + " |")
    at_window = _seeds(rows["base, no PI (no fine-tuning)"], "-")[0]["at_window"]
    lines += ["", f"The base at its own window ({base} bytes, distances 16-{base - 16}): "
              + ", ".join(f"{task} " + (f"accuracy {cell['accuracy']:.2f}" if "accuracy" in cell
                                        else f"ppl {cell['ppl']:.2f}")
                          for task, cells in at_window.items() for cell in cells.values())
              + ".", "", "## Text perplexity and cost", "",
              f"| variant | steps | trainable params | ppl @{base} | ppl @{target} | "
              f"ppl @{2 * target} | s/step | temp MiB | attention GFLOP/step |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cost = row.get("cost", {})
        for steps in (["-"] if row["mode"] is None else lengths):
            seeds = _seeds(row, lengths[0] if steps == "-" else steps)
            ppl = [_cell(_stat([r["ppl"][str(n)] for r in seeds]))
                   for n in (base, target, 2 * target)]
            lines.append(f"| {name} | {steps} | {row['trainable_params']:,} | "
                         + " | ".join(ppl) + " | "
                         + (f"{cost['seconds_per_step']:.2f} | {cost['temp_mib']:.0f} | "
                            f"{cost['attention_gflop']:.2f} |" if cost else "- | - | - |"))
    lines += ["", f"Pretraining the base took {report['pretrain_seconds'] / 60:.0f} min (cached "
              f"between runs); this invocation {report['seconds'] / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def rewrite_report(out: pathlib.Path) -> None:
    """Renders OUT/results.json's measurements again (summary, claims, tables, plots), e.g.
    after the report's rules changed; nothing is trained or measured."""
    path = out / "results.json"
    if not path.is_file():
        raise ConfigError(f"report_only needs {path} (from an earlier run of the miniature)")
    report = json.loads(path.read_text())
    write_report(out, {k: v for k, v in report.items() if k not in ("summary", "claims")})


def write_report(out: pathlib.Path, report: dict[str, Any]) -> None:
    """results.json (raw + summary + claims), results.md, accuracy_vs_distance.png,
    recovery_vs_cost.png."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(report)
    decided = claims(summary, list(report["lengths"]))
    full = {**report, "summary": summary, "claims": decided}
    (out / "results.json").write_text(json.dumps(full, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report, summary, decided))
    long = list(report["lengths"])[-1]
    mids = [(lo + hi) // 2 for lo, hi in report["buckets"]]
    series = {}
    for row in report["variants"]:
        seeds = _seeds(row, long)
        if seeds:
            label = row["variant"] + ("" if row["mode"] is None else f" ({long})")
            series[label] = {m: statistics.fmean(niah_accuracy(r["tasks"], f"{lo}-{hi}")
                                                 for r in seeds)
                             for m, (lo, hi) in zip(mids, report["buckets"], strict=True)}
    target = report["scale"]["base_context"] * report["scale"]["factor"]
    line_plot(series, out / "accuracy_vs_distance.png", title="Needle retrieval by distance "
              f"(full attention, rows of {target} bytes)", ylabel="niah accuracy",
              windows={"G": target // 4, "base window": report["scale"]["base_context"]},
              ylim=(-0.02, 1.02))
    points = {}
    for row in report["variants"]:
        if "cost" in row and long in summary.get(row["variant"], {}):
            points[row["variant"]] = (row["cost"]["seconds_per_step"],
                                      summary[row["variant"]][long]["recovery_text"][0])
    scatter_plot(points, out / "recovery_vs_cost.png", title=f"Recovery ratio ({long} steps) "
                 "vs cost", xlabel="seconds per training step (this CPU)",
                 ylabel="R on held-out text", log_x=True)
