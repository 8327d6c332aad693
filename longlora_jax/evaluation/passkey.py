"""Passkey retrieval: can the model find a 5-digit key hidden at a random depth in filler text?

The prompt is the official LongLoRA one (`passkey_retrivial.py`, after landmark attention):

    TASK
    <filler, cut to `prefix` characters>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <filler, cut to `suffix` characters>
    What is the pass key? The pass key is

lines joined by "\\n", the filler being "The grass is green. ... There and back again." repeated
(both cuts start at its beginning, as the official code does). Differences from the official
script, all to make the length a token count: the key is a random 5-digit number (official:
1..50000); the depth is a uniform fraction of the filler; the filler length is the largest that
keeps the prompt within `length` tokens (official: a character count of 3.75 x the length).
The model decodes greedily (through the KV cache) a few tokens more than the key needs; a trial
passes when the decoded text, stripped, starts with the key as a whole number.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from longlora_jax.data.tokenizer import bos_id, decoder, encoder
from longlora_jax.errors import ConfigError
from longlora_jax.inference.decode import generate
from longlora_jax.modeling.config import LlamaConfig

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INFO = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    """One prompt: token ids [T] (T <= the requested length), the key, its depth in [0, 1]."""

    ids: np.ndarray
    key: str
    depth: float


def passkey_text(filler_chars: int, depth: float, key: str) -> str:
    """The official prompt with `filler_chars` characters of filler, `depth` of them first."""
    repeats = filler_chars // (len(FILLER) + 1) + 1
    filler = " ".join([FILLER] * repeats)
    prefix = round(depth * filler_chars)
    return "\n".join([TASK, filler[:prefix], INFO.format(key=key),
                      filler[:filler_chars - prefix], QUESTION])


def make_trial(encode: Callable[[str], np.ndarray], length: int, *, seed: int,
               bos_id: int | None = None, reserve: int = 0) -> PasskeyTrial:
    """The trial of `seed` with the longest filler that keeps the prompt within `length` -
    `reserve` tokens. `encode`: text -> ids without special tokens; `bos_id` is prepended when
    given. Raises ConfigError when even the prompt without filler does not fit.
    """
    rng = np.random.default_rng(seed)
    key, depth = str(rng.integers(10_000, 100_000)), float(rng.random())
    head = np.asarray([] if bos_id is None else [bos_id], np.int32)
    budget = length - reserve

    def ids_for(chars: int) -> np.ndarray:
        return np.concatenate([head, encode(passkey_text(chars, depth, key))]).astype(np.int32)

    scaffold = len(ids_for(0))
    if scaffold > budget:
        raise ConfigError(
            f"passkey length {length} is shorter than the prompt scaffolding: {scaffold} tokens "
            f"without filler + {reserve} for the answer; use lengths >= {scaffold + reserve}")
    low, high = 0, 8 * budget  # no tokenizer packs 8 characters of this filler in one token
    while low < high:  # largest filler length whose prompt fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(ids_for(mid)) <= budget else (low, mid - 1)
    return PasskeyTrial(ids_for(low), key, depth)


def answer_correct(text: str, key: str) -> bool:
    """True when `text`, stripped, starts with `key` as a whole number."""
    match = re.match(r"\s*(\d+)", text)
    return bool(match) and match.group(1) == key


def passkey_accuracy(
    cfg: LlamaConfig,
    variables: Any,
    tokenizer: Any,
    length: int,
    *,
    trials: int,
    seed: int = 0,
    batch: int = 1,
    add_bos: bool = False,
    prefill_chunk: int = 0,
) -> dict[str, Any]:
    """Greedy passkey retrieval over `trials` prompts of <= `length` tokens (seeds seed..).

    Returns {"accuracy", "correct", "trials", "prompt_tokens" (mean), "answers": [(key, text)]}.
    Prompts of one batch are left-padded together (see `generate`).
    """
    if trials < 1 or batch < 1:
        raise ConfigError(f"passkey trials={trials} and batch={batch} must be >= 1")
    encode, decode = encoder(tokenizer), decoder(tokenizer)
    new_tokens = len(encode(" 12345")) + 2
    bos = bos_id(tokenizer) if add_bos else None
    all_trials = [make_trial(encode, length, seed=seed + i, bos_id=bos, reserve=new_tokens)
                  for i in range(trials)]
    answers = []
    for first in range(0, trials, batch):
        group = all_trials[first:first + batch]
        out = generate(cfg, variables, [t.ids for t in group], new_tokens,
                       prefill_chunk=prefill_chunk)
        answers += [(t.key, decode(row[-new_tokens:])) for t, row in zip(group, out, strict=True)]
    correct = sum(answer_correct(text, key) for key, text in answers)
    return {"accuracy": correct / trials, "correct": correct, "trials": trials,
            "prompt_tokens": float(np.mean([len(t.ids) for t in all_trials])),
            "answers": answers}
