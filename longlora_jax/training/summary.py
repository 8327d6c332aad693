"""The run's segments and WORKDIR/summary.json.

A segment is one launch's part of the run: from the step it started at to the newest step,
its training seconds (compiles included, evaluations before and after not) and its tokens.
Every checkpoint's meta carries the segments of its lineage, so the summary of a resumed run
covers every launch that trained part of it, with every evaluation in metrics.jsonl.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import time
from typing import Any

SUMMARY_FILE = "summary.json"


class Segment:
    """This launch's part of the run; `tokens` grows as it trains."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.tokens = 0.0

    def record(self, step: int) -> dict[str, Any]:
        """The segment as it stands at `step` (a checkpoint's meta and the summary list it)."""
        return {"start_step": self.start_step, "end_step": step, "started": self.started,
                "train_seconds": time.perf_counter() - self.t0, "tokens": self.tokens}


def run_summary(segments: list[dict[str, Any]], records: list[dict[str, Any]],
                **extra: Any) -> dict[str, Any]:
    """The whole run: all segments of its lineage, every evaluation in `records` (the rows of
    metrics.jsonl) and `extra`. Without `eval_before` in `extra`, the evaluation at step 0 of
    an earlier segment is the one before training."""
    seconds = sum(s["train_seconds"] for s in segments)
    tokens = sum(s["tokens"] for s in segments)
    evaluations = [{"step": r["step"], "ppl": r["eval_ppl"], "nll": r["eval_nll"]}
                   for r in records if "eval_ppl" in r]
    summary = {"end_step": segments[-1]["end_step"], "train_seconds": seconds, "tokens": tokens,
               "tokens_per_sec": tokens / max(seconds, 1e-9), "segments": segments,
               "evaluations": evaluations, **extra}
    before = [e for e in evaluations if e["step"] == 0]
    if "eval_before" not in summary and before:
        summary["eval_before"] = before[0]
    return summary


def finished_summary(workdir: pathlib.Path, step: int,
                     segments: list[dict[str, Any]]) -> dict[str, Any]:
    """What a launch with nothing left to train returns: the finished run's summary.json as
    it is, or (none written) its step and segments."""
    path = workdir / SUMMARY_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"end_step": step, "segments": segments}


def write_summary(workdir: pathlib.Path, summary: dict[str, Any]) -> None:
    """Writes WORKDIR/summary.json and prints its one-line digest."""
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    segments = summary["segments"]
    lines = [f"steps {segments[0]['start_step']} -> {summary['end_step']} in "
             f"{summary['train_seconds']:.1f} s"
             + (f" over {len(segments)} segments" if len(segments) > 1 else "")]
    last = summary.get("last_metrics") or {}
    if last:
        lines.append(f"final loss {last['loss']:.4f}, {last['tokens_per_sec']:.0f} tokens/s")
    for key in ("eval_before", "eval_after"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')}: ppl {summary[key]['ppl']:.3f}")
    print("summary: " + " | ".join(lines), flush=True)
