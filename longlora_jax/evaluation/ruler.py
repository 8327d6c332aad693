"""RULER's synthetic tasks run on a model: prompts fitted to a length, greedy answers, scores.

    scores = ruler_scores(cfg, variables, tokenizer, corpus, length=4096, tasks=("vt",),
                          samples=4)

Each sample (`ruler_tasks.build_sample`) gets the largest haystack whose prompt plus the
task's generation budget fits `length` tokens (a binary search over the haystack size, as
RULER's scripts do). The prompt is the task text in the tokenizer's chat template when it has
one (`inference.prompts`, template "auto"; RULER's model templates play that role), followed
by the task's answer prefix. Answers are decoded greedily through the KV cache (`generate`),
`batch` prompts at a time, left-padded to one shape per (length, task) so that each compiles
once; scoring is RULER's `string_match_all` per task, and their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from longlora_jax.data.tokenizer import decoder, encoder
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.ruler_tasks import (
    TASKS,
    Corpus,
    Sample,
    build_sample,
    postprocess,
    string_match_all,
)
from longlora_jax.inference.decode import generate
from longlora_jax.inference.prompts import build_prompt
from longlora_jax.modeling.config import LlamaConfig

ALL_TASKS = "ruler"  # `tasks` shorthand for every task


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names (`ruler` = all of them, in RULER's order); ConfigError for others."""
    names: list[str] = []
    for task in tasks:
        for name in (TASKS if task == ALL_TASKS else (task,)):
            if name not in TASKS:
                raise ConfigError(f"unknown task {name!r}; valid: {', '.join(TASKS)}, "
                                  f"{ALL_TASKS} (all of them)")
            if name not in names:
                names.append(name)
    return names


def prompt_encoder(tokenizer: Any, template: str) -> Callable[[Sample], np.ndarray]:
    """sample -> prompt ids: the task text (in the chat template with "auto"/"chat") and then
    the answer prefix. A chat prompt carries its special tokens as text; a plain prompt gets
    the tokenizer's own (e.g. BOS) as `tokenizer.encode` adds them."""
    encode = encoder(tokenizer)
    chat = build_prompt(tokenizer, prompt="x", template=template) != "x"

    def ids(sample: Sample) -> np.ndarray:
        text = build_prompt(tokenizer, prompt=sample.text, template=template)
        text += sample.answer_prefix
        if chat:
            return encode(text)
        return np.asarray(tokenizer.encode(text), np.int32).reshape(-1)

    return ids


def fit_sample(task: str, length: int, seed: int, corpus: Corpus,
               ids: Callable[[Sample], np.ndarray]) -> tuple[Sample, np.ndarray]:
    """The sample of `seed` with the largest haystack whose prompt + generation budget fits
    `length` tokens, and its prompt ids. ConfigError when even the smallest does not fit."""

    def make(size: int) -> tuple[Sample, np.ndarray]:
        sample = build_sample(task, size=size, seed=seed, corpus=corpus, length=length)
        return sample, ids(sample)

    def fits(made) -> bool:
        return len(made[1]) + made[0].new_tokens <= length

    best = make(1)
    if not fits(best):
        raise ConfigError(
            f"length {length} is too short for task {task}: its prompt needs "
            f"{len(best[1])} tokens with the smallest haystack, plus {best[0].new_tokens} to "
            f"generate")
    low, high = 1, 2
    while fits(made := make(high)):  # grow until too long, then bisect
        low, best, high = high, made, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        made = make(mid)
        low, high, best = (mid, high, made) if fits(made) else (low, mid, best)
    return best


def ruler_scores(cfg: LlamaConfig, variables: Any, tokenizer: Any, corpus: Corpus, *,
                 length: int, tasks: Sequence[str], samples: int, seed: int = 0,
                 batch: int = 1, template: str = "auto", prefill_chunk: int = 0
                 ) -> dict[str, Any]:
    """RULER scores at `length` tokens: {"tasks": {task: {"score" (percent), "samples",
    "prompt_tokens" (mean), "answers": [[expected strings, prediction]]}}, "average"}."""
    if samples < 1 or batch < 1:
        raise ConfigError(f"ruler samples={samples} and batch={batch} must be >= 1")
    ids_of = prompt_encoder(tokenizer, template)
    decode = decoder(tokenizer)
    results: dict[str, Any] = {}
    for task in tasks:
        fitted = [fit_sample(task, length, seed + i, corpus, ids_of) for i in range(samples)]
        new_tokens = TASKS[task].new_tokens
        width = length - new_tokens
        predictions = []
        for first in range(0, samples, batch):
            group = fitted[first:first + batch]
            ids_bt = np.zeros((len(group), width), np.int32)
            mask_bt = np.zeros((len(group), width), np.int32)
            for row, (_, ids) in enumerate(group):
                ids_bt[row, width - len(ids):] = ids
                mask_bt[row, width - len(ids):] = 1
            out = generate(cfg, variables, ids_bt, new_tokens, prompt_mask=mask_bt,
                           prefill_chunk=prefill_chunk)
            predictions += [postprocess(decode(row[-new_tokens:])) for row in out]
        expected = [list(sample.outputs) for sample, _ in fitted]
        results[task] = {
            "score": string_match_all(predictions, expected), "samples": samples,
            "prompt_tokens": float(np.mean([len(ids) for _, ids in fitted])),
            "answers": [[e, p] for e, p in zip(expected, predictions, strict=True)]}
    average = float(np.mean([r["score"] for r in results.values()]))
    return {"tasks": results, "average": round(average, 2)}
