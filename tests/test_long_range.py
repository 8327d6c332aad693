"""Long-range task rows (data.long_range) and their scoring (evaluation.long_range)."""

import itertools
import re

import jax
import numpy as np
import pytest

from longlora_jax.data import default_data_config, make_train_iterator
from longlora_jax.data.long_range import (
    REPEAT_TOKENS,
    REPEAT_WARMUP,
    TASKS,
    build_row,
    eval_rows,
    training_row,
)
from longlora_jax.data.tokenizer import ByteTokenizer, encoder
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.long_range import by_bucket, score_rows
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.llama import LlamaForCausalLM

TOK = ByteTokenizer()
ENCODE = encoder(TOK)


def text(tokens) -> str:
    return TOK.decode([int(t) for t in tokens])


def filler(n, seed=0):
    words = np.random.default_rng(seed).choice(["alpha", "beta", "gamma", "delta"], n)
    return ENCODE(" ".join(words))[:n]


@pytest.mark.parametrize("at_end", [False, True])
@pytest.mark.parametrize("distance", [40, 150, 400])
def test_needle_is_where_the_label_says(distance, at_end):
    for task in ("niah_single", "niah_multikey"):
        row = build_row(np.random.default_rng(distance), filler(513), task, distance, ENCODE,
                        answer_at_end=at_end)
        (span,) = row.spans
        answer = text(row.tokens[span.start:span.end])
        assert re.fullmatch(r"\d{6}", answer)
        # the value is read from `distance` back, right after the same words as the question
        source = span.start - distance
        assert text(row.tokens[source:source + 6]) == answer
        key = re.search(r" (\w{4})=$", text(row.tokens[:span.start])).group(1)
        assert text(row.tokens[:source]).endswith(f" {key}=")
        # the asked key appears exactly twice (needle, question); distractors have other keys
        whole = text(row.tokens)
        assert whole.count(f" {key}={answer}") == 2
        needles = re.findall(r" ([A-Z]{4})=\d{6}", whole)
        assert len(needles) == (2 if task == "niah_single" else 5)
        if at_end:
            assert span.end == len(row.tokens) - 2  # then ". "


def test_repeat_is_an_exact_copy_and_only_the_copy_is_scored():
    row = build_row(np.random.default_rng(0), filler(600, 1), "repeat", 300, ENCODE)
    (span,) = row.spans
    start = span.start - REPEAT_WARMUP
    copy = row.tokens[start:start + REPEAT_TOKENS]
    np.testing.assert_array_equal(copy, row.tokens[start - 300:start - 300 + REPEAT_TOKENS])
    assert re.fullmatch(r"[a-z ]+", text(copy))  # random letters: only the first copy tells
    assert span.end - span.start == REPEAT_TOKENS - REPEAT_WARMUP and span.distance == 300


def test_variable_chain_resolves_to_the_answer():
    row = build_row(np.random.default_rng(3), filler(513, 2), "vt", 300, ENCODE)
    (span,) = row.spans
    whole, answer = text(row.tokens), text(row.tokens[span.start:span.end]).split()
    value = re.search(r" \?(\d+):$", text(row.tokens[:span.start])).group(1)
    assigned = dict(re.findall(r" \$(\w+)=(\w+);", whole))
    resolved = []
    for name in assigned:
        v = name
        while v in assigned:
            v = assigned[v]
        if v == value:
            resolved.append(name)
    assert sorted(resolved) == sorted(answer) and len(answer) == 3
    first = whole.index(f" ${answer[0]}=")
    assert span.start - (first + len(" $")) == 300


def test_a_task_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        build_row(np.random.default_rng(0), filler(100), "niah_single", 95, ENCODE)
    with pytest.raises(ConfigError, match="unknown long-range task"):
        build_row(np.random.default_rng(0), filler(100), "passkey", 50, ENCODE)


def test_eval_rows_fall_in_their_buckets_and_are_deterministic():
    docs = [filler(3000, 5)]
    buckets = [(16, 128), (128, 256), (256, 480)]
    for task in TASKS:
        rows = eval_rows(0, docs, 513, task, buckets, 3, ENCODE)
        again = eval_rows(0, docs, 513, task, buckets, 3, ENCODE)
        assert [r.tokens.tolist() for _, r in rows] == [r.tokens.tolist() for _, r in again]
        for b, row in rows:
            lo, hi = buckets[b]
            assert lo <= row.spans[0].distance < hi and len(row.tokens) == 513


def test_training_rows_mix_tasks_and_text_deterministically():
    docs = [filler(2000, 7)]
    kinds = [training_row(np.random.default_rng([0, i]), docs, 257, TASKS, 0.5, 16, 256,
                          ENCODE).spans for i in range(200)]
    with_task = sum(bool(s) for s in kinds)
    assert 70 < with_task < 130 and {s[0].task for s in kinds if s} == set(TASKS)
    config = default_data_config()
    config.source, config.tasks, config.prefetch = "offline_essays", ("niah_single",), 0
    first = next(make_train_iterator(config, TOK, seq_len=128, global_batch=2, seed=3))
    second = next(make_train_iterator(config, TOK, seq_len=128, global_batch=2, seed=3))
    np.testing.assert_array_equal(first["inputs"], second["inputs"])
    assert first["segment_ids"].min() == 1 and first["loss_mask"].all()


def test_scoring_equals_the_argmax_of_the_full_logits():
    cfg = LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    params = LlamaForCausalLM(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))
    rows = [build_row(np.random.default_rng(i), filler(257, i), task, 100, ENCODE,
                      answer_at_end=True) for i, task in enumerate(TASKS * 2)]
    results = score_rows(cfg, params, rows, batch=3)
    for row, result in zip(rows, results, strict=True):
        logits = LlamaForCausalLM(cfg).apply(params, row.tokens[None, :-1])[0]
        span = row.spans[0]
        predicted = np.argmax(np.asarray(logits[span.start - 1:span.end - 1]), axis=-1)
        logp = jax.nn.log_softmax(np.asarray(logits[span.start - 1:span.end - 1]))
        want_nll = -np.mean(logp[np.arange(len(predicted)), row.tokens[span.start:span.end]])
        assert result["nll"] == pytest.approx(float(want_nll), rel=1e-4)
        if span.task != "repeat":
            assert result["correct"] == bool(
                (predicted == row.tokens[span.start:span.end]).all())
    table = by_bucket(results, [(0, 128)])
    assert set(table) == set(TASKS) and table["repeat"]["0-128"]["rows"] == 2


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tasks", ("needle",), "unknown long-range task"),
    ("task_fraction", 2.0, "task_fraction=2.0 must be in"),
    ("task_answer_weight", 0.0, "task_answer_weight=0.0 must be > 0"),
    ("task_min_distance", 0, "task_min_distance=0 must be >= 1"),
    ("tasks_per_row", 0, "tasks_per_row=0 must be >= 1"),
])
def test_bad_task_settings_are_one_line_errors(field, value, message):
    config = default_data_config()
    config.source, config.prefetch = "offline_essays", 0
    config[field] = value
    with pytest.raises(ConfigError, match=message):
        make_train_iterator(config, TOK, seq_len=64, global_batch=1)


def test_several_tasks_in_one_row_keep_their_own_answers():
    docs = [filler(2000, 9)]
    rows = [training_row(np.random.default_rng([1, i]), docs, 257, TASKS, 1.0, 16, 128,
                         ENCODE, tasks_per_row=3) for i in range(40)]
    counts = [len(r.spans) for r in rows]
    assert max(counts) == 3 and np.mean(counts) > 1.5  # as many as fit, up to three
    for row in rows:
        spans = sorted(row.spans, key=lambda s: s.start)
        for a, b in itertools.pairwise(spans):
            assert a.end <= b.start  # no task writes over another's answer
        for span in row.spans:
            answer = row.tokens[span.start:span.end]
            if span.task == "repeat":  # the copy still equals its source
                start = span.start - REPEAT_WARMUP
                np.testing.assert_array_equal(
                    row.tokens[start:start + REPEAT_TOKENS],
                    row.tokens[start - span.distance:start - span.distance + REPEAT_TOKENS])
            elif span.task != "vt":  # the needle's value sits `distance` back, intact
                source = span.start - span.distance
                np.testing.assert_array_equal(row.tokens[source:source + len(answer)], answer)
