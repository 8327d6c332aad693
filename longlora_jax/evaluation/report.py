"""An evaluation's results: one row per (model, RoPE variant), written as JSON, markdown, PNG.

    OUT/results.json        settings + every model's perplexity/passkey/RULER by length
    OUT/results.md          a perplexity and a passkey table, lengths as columns, and a RULER
                            table per length (tasks as columns, their average last)
    OUT/ppl_vs_length.png, OUT/passkey_vs_length.png, OUT/ruler_vs_length.png
    OUT/partial.json        while a run is under way: what has finished, as results.json has
                            it, with "complete": false; a run with the same settings resumes
                            from it, and the complete run removes it
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from longlora_jax.errors import ConfigError
from longlora_jax.evaluation import plots

PARTIAL = "partial.json"


@dataclasses.dataclass
class ModelResult:
    """One evaluated (model, RoPE variant, attention): its perplexity, passkey and RULER
    (`evaluation.ruler.ruler_scores`) results by length, and the evaluation documents as
    [name, tokens]."""

    name: str
    source: str
    rope: str
    context_window: int
    documents: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    attention: str = "full"
    perplexity: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    passkey: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    ruler: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def markdown(results: Sequence[ModelResult], lengths: Sequence[int], settings: dict) -> str:
    """results.md: a perplexity and a passkey table (those that ran), lengths as columns."""
    head = ["| model | rope | attention | window | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|---|---|---:|" + "---:|" * len(lengths)]

    def rows(cell: Callable[[ModelResult, int], str]) -> list[str]:
        return [f"| {r.name} | {r.rope} | {r.attention} | {r.context_window} | "
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
            f"## Perplexity ({settings['eval']['protocol']} windows, data {settings['data']})", "",
            *head, *rows(ppl_cell), "",
            ("\\* beyond the model's context window. " if beyond else "")
            + "Windows per length: "
            + ", ".join(f"{n}: {counts[n]}" for n in lengths if n in counts) + "."])
    if any(r.passkey for r in results):
        sections.append([f"## Passkey retrieval ({settings['passkey']} trials per length)", "",
                         *head, *rows(passkey_cell)])
    if any(r.ruler for r in results):
        sections.append(ruler_markdown(results, lengths, settings))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def ruler_markdown(results: Sequence[ModelResult], lengths: Sequence[int], settings: dict
                   ) -> list[str]:
    """One RULER table per length: a row per model, a column per task (score in percent,
    RULER's string_match_all) and their average."""
    lines = [f"## RULER ({settings['ruler']['samples']} samples per task and length)"]
    for n in lengths:
        rows = [r for r in results if n in r.ruler]
        if not rows:
            continue
        tasks = list(rows[0].ruler[n]["tasks"])
        lines += ["", f"### {n} tokens", "",
                  "| model | rope | " + " | ".join(tasks) + " | average |",
                  "|---|---|" + "---:|" * (len(tasks) + 1)]
        lines += [f"| {r.name} | {r.rope} | "
                  + " | ".join(f"{r.ruler[n]['tasks'][t]['score']:.1f}" for t in tasks)
                  + f" | {r.ruler[n]['average']:.1f} |" for r in rows]
    return lines


def _payload(results: Sequence[ModelResult], settings: dict) -> dict:
    return {"settings": settings, "models": [dataclasses.asdict(r) for r in results]}


def write_partial(out: pathlib.Path, results: Sequence[ModelResult], settings: dict) -> None:
    """OUT/partial.json: the results so far, marked incomplete; replaced atomically so a
    stop during the write leaves the previous one."""
    out.mkdir(parents=True, exist_ok=True)
    staged = out / (PARTIAL + ".tmp")
    staged.write_text(json.dumps({"complete": False, **_payload(results, settings)}, indent=2)
                      + "\n")
    staged.replace(out / PARTIAL)


def read_partial(out: pathlib.Path, settings: dict) -> list[ModelResult]:
    """The results a stopped run with the same `settings` left in OUT/partial.json ([] when
    there is none). ConfigError when its settings differ: resuming would mix two runs."""
    path = out / PARTIAL
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(settings))  # tuples as the file has them: lists
    differ = sorted(k for k in now.keys() | saved["settings"].keys()
                    if now.get(k) != saved["settings"].get(k))
    if differ:
        raise ConfigError(f"{path} is from a stopped run with other settings (differing: "
                          f"{', '.join(differ)}); run with those, or move it away to start over")

    def by_length(cells: dict[str, Any]) -> dict[int, Any]:
        return {int(n): cell for n, cell in cells.items()}

    return [ModelResult(**{**m, "documents": [tuple(d) for d in m["documents"]],
                           **{k: by_length(m[k]) for k in ("perplexity", "passkey", "ruler")}})
            for m in saved["models"]]


def write_outputs(out: pathlib.Path, results: Sequence[ModelResult], lengths: Sequence[int],
                  settings: dict) -> None:
    """results.json, results.md, ppl_vs_length.png and (with passkey) passkey_vs_length.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_payload(results, settings), indent=2) + "\n")
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
    if any(r.ruler for r in results):
        plots.line_plot({r.name: {n: p["average"] for n, p in r.ruler.items()}
                         for r in results}, out / "ruler_vs_length.png", windows=windows,
                        title="RULER average vs context length",
                        ylabel="RULER average (%)", ylim=(-5, 105))
