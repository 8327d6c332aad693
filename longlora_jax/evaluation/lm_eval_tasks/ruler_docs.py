"""lm-eval's side of the offline RULER tasks (`ruler_offline_*`): the documents and the scoring.

    python -m longlora_jax.harness --model longlora_jax --model_args model=runs/demo \\
        --tasks ruler_offline --metadata '{"max_seq_lengths": [2048, 4096], "samples": 4}'

The YAML files beside this module are lm-eval tasks (`python -m longlora_jax.harness` adds
this folder to lm-eval's `--include_path`; with plain lm-eval, pass it yourself). Each task's
`custom_dataset` gets lm-eval's model_args and `--metadata` as keywords:

  max_seq_lengths   lengths in tokens (default [4096]); each one of `LENGTHS`
  samples           prompts per length (default 4), seeds seed .. seed + samples - 1
  seed              (default 0)
  tokenizer, model  whose tokenizer sizes the prompts: a model as `evaluate --model` takes it
                    (a workdir, smollm2, hf:DIR, ...); `tokenizer` wins when both are given

A document is exactly what `evaluate --tasks TASK --config.ruler.template=none` prompts with
for the same seed and length: `input` is the task text, `gen_prefix` the answer prefix (it
starts with a space, so lm-eval joins the two with nothing between), `outputs` the expected
strings. With `--apply_chat_template` the text goes in the user turn and the prefix starts the
assistant's, as `evaluate`'s "chat" template does. Scores are RULER's `string_match_all` in
percent, one metric per length (`LENGTHS`; lengths not asked for show -1).
"""

from __future__ import annotations

import functools
from typing import Any

import datasets

from longlora_jax.data import assets
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.ruler import fit_sample, prompt_encoder
from longlora_jax.evaluation.ruler_tasks import Corpus, postprocess, string_match_all
from longlora_jax.io.run import load_model

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # the YAMLs' metric names


@functools.cache
def _tokenizer(source: str) -> Any:
    return load_model(source).tokenizer


@functools.cache
def _corpus() -> Corpus:
    return Corpus.from_texts([d.text for d in assets.essays()])


def ruler_dataset(task: str, max_seq_lengths: Any = (4096,), samples: int = 4, seed: int = 0,
                  tokenizer: str | None = None, model: str | None = None,
                  **_: Any) -> dict[str, datasets.Dataset]:
    """{"test": one document per (length, sample)}: input, gen_prefix, outputs, max_length."""
    source = tokenizer or model
    if not source:
        raise ConfigError("ruler_offline tasks need a tokenizer to size their prompts: "
                          "--model_args model=... or --metadata '{\"tokenizer\": \"smollm2\"}'")
    lengths = [int(n) for n in ([max_seq_lengths] if isinstance(max_seq_lengths, int | str)
                                else max_seq_lengths)]
    for n in lengths:
        if n not in LENGTHS:
            raise ConfigError(f"max_seq_lengths {n}; valid: {', '.join(map(str, LENGTHS))}")
    ids_of = prompt_encoder(_tokenizer(str(source)), "none")
    docs = []
    for n in lengths:
        for i in range(int(samples)):
            sample, _ = fit_sample(task, n, int(seed) + i, _corpus(), ids_of)
            docs.append({"input": sample.text, "gen_prefix": sample.answer_prefix,
                         "outputs": list(sample.outputs), "max_length": n})
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """{str(length): score in percent} for the document's length, -1 for the others."""
    scores = {str(n): -1.0 for n in LENGTHS}
    scores[str(doc["max_length"])] = string_match_all([postprocess(results[0])],
                                                      [doc["outputs"]])
    return scores


def aggregate(scores: list[float]) -> float:
    """The mean over the documents of one length (-1 when the run had none)."""
    asked = [s for s in scores if s != -1]
    return sum(asked) / len(asked) if asked else -1.0
