"""Scores a model on long-range task rows (`data.long_range`): accuracy and NLL by distance.

A row's scored span is judged teacher-forced in one forward pass: an answer (niah, vt) is
correct when the model's argmax at every answer token is that token, which is exactly what
greedy decoding would write there; a repeated passage gives its mean NLL per token. Rows are
scored with full causal attention, or with the model's training attention ("s2" / "short",
its group rule and sinks) to measure the train/test attention gap.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longlora_jax.data.long_range import ANSWER_TASKS, TaskRow
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.perplexity import EVAL_ATTENTIONS
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.llama import CausalLM


@functools.lru_cache(maxsize=8)
def _span_scorer(cfg: LlamaConfig, attention: str):
    """jitted (variables, inputs [B, N], at [B, K], targets [B, K]) -> (log p [B, K],
    argmax hit [B, K]) for the tokens predicted at input positions `at`."""
    sparse = attention != "full"
    model = build_model(cfg.replace(attention_train=attention, lora_dropout=0.0) if sparse
                        else cfg)

    @jax.jit
    def score(variables, inputs_bn, at_bk, targets_bk):
        h_bne = model.apply(variables, inputs_bn, return_hidden=True, train=sparse)
        h_bke = jnp.take_along_axis(h_bne, at_bk[..., None], axis=1)
        logits = model.apply(variables, h_bke, method=CausalLM.project).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, targets_bk[..., None], axis=-1)[..., 0]
        return target_logp, jnp.argmax(logits, axis=-1) == targets_bk

    return score


def score_rows(cfg: LlamaConfig, variables: Any, rows: Sequence[TaskRow], *,
               attention: str = "full", batch: int = 8) -> list[dict[str, Any]]:
    """Per row: task, distance, `correct` (answer tasks) and `nll` (mean per scored token).

    Every row holds N + 1 tokens (the model reads the first N) and one scored span.
    """
    if attention not in EVAL_ATTENTIONS:
        raise ConfigError(f"attention={attention!r}; valid: {', '.join(EVAL_ATTENTIONS)}")
    if not rows:
        return []
    n = len(rows[0].tokens) - 1
    if any(len(r.tokens) != n + 1 or len(r.spans) != 1 for r in rows):
        raise ConfigError("task rows must all hold the same number of tokens and one span")
    width = max(s.end - s.start for r in rows for s in r.spans)
    score = _span_scorer(cfg, attention)
    out = []
    for first in range(0, len(rows), batch):
        chunk = list(rows[first:first + batch])
        chunk += [chunk[-1]] * (batch - len(chunk))  # a fixed batch: one compile
        inputs = np.stack([r.tokens[:n] for r in chunk]).astype(np.int32)
        at = np.zeros((batch, width), np.int32)
        valid = np.zeros((batch, width), bool)
        for i, r in enumerate(chunk):
            span = r.spans[0]
            size = span.end - span.start
            at[i, :size] = np.arange(span.start - 1, span.end - 1)
            at[i, size:] = span.end - 2
            valid[i, :size] = True
        targets = np.take_along_axis(np.stack([r.tokens for r in chunk]), at + 1, axis=1)
        logp, hit = jax.device_get(score(variables, inputs, at, targets.astype(np.int32)))
        for i, r in enumerate(chunk[:len(rows) - first]):
            span, v = r.spans[0], valid[i]
            result = {"task": span.task, "distance": span.distance,
                      "nll": float(-logp[i][v].mean())}
            if span.task in ANSWER_TASKS:
                result["correct"] = bool(hit[i][v].all())
            out.append(result)
    return out


def by_bucket(results: Sequence[dict[str, Any]], buckets: Sequence[tuple[int, int]]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {"lo-hi": {"accuracy" | "ppl": value, "rows": count}}} over distance buckets."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for task in sorted({r["task"] for r in results}):
        table[task] = {}
        for lo, hi in buckets:
            inside = [r for r in results if r["task"] == task and lo <= r["distance"] < hi]
            if not inside:
                continue
            cell: dict[str, float] = {"rows": len(inside)}
            if task in ANSWER_TASKS:
                cell["accuracy"] = sum(r["correct"] for r in inside) / len(inside)
            else:
                cell["ppl"] = math.exp(float(np.mean([r["nll"] for r in inside])))
            table[task][f"{lo}-{hi}"] = cell
    return table
