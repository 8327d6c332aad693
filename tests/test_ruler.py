"""RULER-style tasks: every generator puts what its answer says where it says, the scoring is
RULER's rule, prompts fill their length, and `evaluate --tasks` writes its tables and refuses
bad input in one line."""

import collections
import json
import re

import numpy as np
import pytest

from longlora_jax import evaluate
from longlora_jax.cli import run_command
from longlora_jax.data import assets
from longlora_jax.data.tokenizer import ByteTokenizer
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation.ruler import expand_tasks, fit_sample, prompt_encoder
from longlora_jax.evaluation.ruler_tasks import (
    NEEDLE,
    TASKS,
    Corpus,
    Niah,
    build_sample,
    postprocess,
    string_match_all,
)

NIAH = [name for name, spec in TASKS.items() if isinstance(spec, Niah)]


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_texts([d.text for d in assets.essays()])


def context_of(text: str) -> str:
    """The haystack part of a (last) task template: between its intro and its question."""
    return text.rsplit("\nQuestion:", 1)[0] if "\nQuestion:" in text else text


@pytest.mark.parametrize("task", NIAH)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_needles_are_there_once_at_their_depths(task, seed, corpus):
    spec = TASKS[task]
    size = {"essay": 3000, "noise": 200, "needle": 200}[spec.haystack]
    sample = build_sample(task, size=size, seed=seed, corpus=corpus, length=4096)
    kind = spec.value_type
    pattern = re.escape(NEEDLE.format(type_needle_v=kind, key="KEY", value="VALUE"))
    needles = re.findall(pattern.replace("KEY", r"(\S+)").replace("VALUE", r"(\S+?)"),
                         sample.text)
    body = sample.text.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]  # the haystack
    assert len(sample.outputs) == spec.num_values * spec.num_queries
    for value in sample.outputs:
        assert sample.text.count(value) == 1  # each answer: in exactly one needle
        (key,) = [k for k, v in needles if v == value]
        assert key in sample.answer_prefix  # ... whose key is asked for
        real = [v for k, v in needles if k == key]  # (the needle haystack: one line per key)
        assert value in real and body.count(f" {key} ") == len(real)
    # the needles put in (the needle haystack's other lines are distractors), each at its depth
    inserted = [(k, v) for k, v in needles if spec.haystack != "needle" or v in sample.outputs]
    assert len(inserted) == len(sample.depths) == (
        max(spec.num_keys, spec.num_queries) * spec.num_values)
    where = sorted(body.index(f"for {k} is: {v}.") for k, v in inserted)
    if spec.haystack == "essay":  # depth in sentences; measured in characters
        measured = [100 * w / len(body) for w in where]
        assert np.allclose(measured, sample.depths, atol=5), (measured, sample.depths)
    else:  # depth in lines, exactly (the i-th needle has i needles above it)
        measured = [100 * (body[:w].count("\n") - i) / size for i, w in enumerate(where)]
        assert np.allclose(measured, sample.depths), (measured, sample.depths)
    assert sample.new_tokens == 128


def test_singular_wording_when_one_value_is_asked(corpus):
    one = build_sample("niah_single_2", size=100, seed=0, corpus=corpus, length=4096)
    many = build_sample("niah_multivalue", size=100, seed=0, corpus=corpus, length=4096)
    assert one.text.startswith("A special magic number is hidden")
    assert "What is the special magic number for" in one.text
    assert one.answer_prefix.endswith("mentioned in the provided text is")
    assert many.text.startswith("Some special magic numbers are hidden")
    assert many.answer_prefix.endswith("mentioned in the provided text are")


@pytest.mark.parametrize("seed", range(4))
def test_variable_chain_resolves_to_the_answer(seed, corpus):
    sample = build_sample("vt", size=60, seed=seed, corpus=corpus, length=4096)
    task = sample.text.rsplit("Memorize and track", 1)[1]
    value = re.search(r"assigned the value (\d+) in the text", task).group(1)
    assert value in sample.answer_prefix and "5 variables" in sample.answer_prefix
    known: dict[str, str] = {}
    for name, rhs in re.findall(r"^VAR (\w+) = (.+?)\s*$", task, flags=re.M):
        known[name] = known[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert {n for n, v in known.items() if v == value} == set(sample.outputs)
    assert len(sample.outputs) == 5 and all(len(n) == 5 for n in sample.outputs)
    # the worked example before it is answered, with its own 3-letter chain
    example = sample.text.rsplit("Memorize and track", 1)[0]
    assert re.search(r"they are: ([A-Z]{3} ){4}[A-Z]{3}\n$", example)


@pytest.mark.parametrize("length, repeats", [(2048, 6), (8192, 30)])
def test_common_words_are_the_most_common(length, repeats, corpus):
    sample = build_sample("cwe", size=300, seed=0, corpus=corpus, length=length)
    question = sample.text.rsplit("Below is a numbered list", 1)[1]
    counts = collections.Counter(re.findall(r"\d+\. (\S+)", question))
    top = [w for w, _ in counts.most_common(10)]
    assert set(top) == set(sample.outputs)
    assert all(counts[w] == repeats for w in sample.outputs)
    assert counts.most_common(11)[-1][1] < repeats
    assert sum(counts.values()) == 10 * repeats + (300 - 10) * (1 if length < 4096 else 3)


def test_frequent_words_are_the_most_frequent(corpus):
    sample = build_sample("fwe", size=2000, seed=0, corpus=corpus, length=8192)
    counts = collections.Counter(context_of(sample.text).split(" coded words. ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..."  # the noise word leads
    assert ranked[1:4] == list(sample.outputs)
    assert counts[ranked[3]] > counts[ranked[4]]


def test_samples_are_reproducible(corpus):
    for task in TASKS:
        a, b = (build_sample(task, size=50, seed=3, corpus=corpus, length=4096)
                for _ in range(2))
        assert a == b
        assert build_sample(task, size=50, seed=4, corpus=corpus, length=4096) != a


def test_scoring_is_rulers_string_match_all():
    preds = ["The numbers are 123 and 456.", "only 123", "nothing here", "ABC-def"]
    refs = [["123", "456"], ["123", "456"], ["123"], ["abc-DEF"]]
    assert string_match_all(preds, refs) == 62.5  # (1 + 0.5 + 0 + 1) / 4
    assert string_match_all(["a b"], [["a", "b", "c"]]) == 66.67  # rounded to 2 decimals
    assert postprocess("  1. alpha\x002. beta\t\n ") == "1. alpha\n2. beta"


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_1", "vt", "cwe", "fwe"])
def test_prompts_fill_their_length(task, corpus):
    tok = ByteTokenizer()
    ids_of = prompt_encoder(tok, "auto")
    sample, ids = fit_sample(task, 3000, 0, corpus, ids_of)
    budget = 3000 - sample.new_tokens
    assert len(ids) <= budget
    assert np.array_equal(ids, tok.encode(sample.text + sample.answer_prefix))
    # the next larger haystack would not fit (bisection found the largest): within one unit
    # (vt below 20 noise lines: two lines, its worked example grows too)
    unit = {"niah_single_1": 90, "niah_multikey_1": 20, "vt": 180, "cwe": 20, "fwe": 60}[task]
    assert len(ids) > budget - unit, (len(ids), budget)
    with pytest.raises(ConfigError, match=f"length 300 is too short for task {task}"):
        fit_sample(task, 300, 0, corpus, ids_of)


def test_task_names():
    assert expand_tasks(["ruler"]) == list(TASKS) and len(TASKS) == 11
    assert expand_tasks(["vt", "cwe", "vt"]) == ["vt", "cwe"]
    with pytest.raises(ConfigError, match="unknown task 'qa_1'; valid: niah_single_1"):
        expand_tasks(["qa_1"])


@pytest.mark.integration
def test_evaluate_writes_ruler_tables_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", "preset:tiny", "--perplexity=false", "--lengths", "700,1000",
            "--tasks", "niah_single_1,fwe", "--config.ruler.samples=2", "--out", str(out)]
    assert run_command(evaluate.COMMAND, argv) == 0
    result = json.loads((out / "results.json").read_text())["models"][0]["ruler"]
    assert set(result) == {"700", "1000"}
    for scores in result.values():
        assert set(scores["tasks"]) == {"niah_single_1", "fwe"}
        for task in scores["tasks"].values():
            assert 0 <= task["score"] <= 100 and len(task["answers"]) == 2
    md = (out / "results.md").read_text()
    assert "### 700 tokens" in md and "| model | rope | niah_single_1 | fwe | average |" in md
    assert (out / "ruler_vs_length.png").stat().st_size > 0
    capsys.readouterr()
    for bad, message in (
            (["--tasks", "niah_single_9"], "error: unknown task 'niah_single_9'; valid:"),
            (["--tasks", "vt", "--lengths", "4096"],
             "error: lengths [4096] exceed the context window 1024 of preset:tiny")):
        argv = ["--model", "preset:tiny", "--perplexity=false", *bad, "--out", str(tmp_path / "x")]
        assert run_command(evaluate.COMMAND, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "x").exists()
