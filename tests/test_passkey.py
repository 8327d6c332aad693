"""Passkey retrieval: the official LongLoRA prompt, fitted to a token budget; scoring; errors."""

import numpy as np
import pytest

from longlora_jax.data.tokenizer import ByteTokenizer, encoder
from longlora_jax.errors import ConfigError
from longlora_jax.evaluation import passkey
from longlora_jax.modeling.config import LlamaConfig

ENCODE = encoder(ByteTokenizer())


def official_prompt(n_prefix: int, n_suffix: int, key: str) -> str:
    """`generate_prompt_landmark` of LongLoRA's passkey_retrivial.py, with the random draws
    (prefix length, key) passed in."""
    task_description = ("There is an important info hidden inside a lot of irrelevant text. "
                        "Find it and memorize them. I will quiz you about the important "
                        "information there.")
    garbage = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
               "back again.")
    garbage_inf = " ".join([garbage] * 5000)
    information_line = f"The pass key is {key}. Remember it. {key} is the pass key."
    final_question = "What is the pass key? The pass key is"
    return "\n".join([task_description, garbage_inf[:n_prefix], information_line,
                      garbage_inf[:n_suffix], final_question])


@pytest.mark.parametrize("chars, depth", [(0, 0.3), (500, 0.0), (1234, 0.37), (20000, 1.0)])
def test_prompt_is_the_official_one(chars, depth):
    prefix = round(depth * chars)
    assert passkey.passkey_text(chars, depth, "48213") == official_prompt(
        prefix, chars - prefix, "48213")


@pytest.mark.parametrize("length", [300, 1000, 4096])
def test_trial_fills_the_budget(length):
    trial = passkey.make_trial(ENCODE, length, seed=7, reserve=5)
    assert len(trial.ids) <= length - 5
    assert len(trial.ids) >= length - 5 - 2  # byte tokens: the filler fits to the character
    text = ByteTokenizer().decode(trial.ids)
    assert text.startswith(passkey.TASK) and text.endswith(passkey.QUESTION)
    assert passkey.INFO.format(key=trial.key) in text
    assert len(trial.key) == 5 and trial.key.isdigit()
    # the key sits at the drawn depth of the filler
    before = text.index(passkey.INFO.format(key=trial.key)) - len(passkey.TASK) - 2
    filler = len(text) - len(passkey.TASK) - len(passkey.INFO.format(key=trial.key)) \
        - len(passkey.QUESTION) - 4
    assert before == round(trial.depth * filler)


def test_trials_are_seeded():
    a, b, c = (passkey.make_trial(ENCODE, 600, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.ids, b.ids)
    assert (a.key, a.depth) != (c.key, c.depth)


def test_bos_is_prepended():
    trial = passkey.make_trial(ENCODE, 400, seed=0, bos_id=1)
    assert trial.ids[0] == 1 and len(trial.ids) <= 400


def test_length_shorter_than_scaffolding_is_a_one_line_error():
    scaffold = len(ENCODE(passkey.passkey_text(0, 0.5, "12345")))
    with pytest.raises(ConfigError, match=f"passkey length 100 is shorter than the prompt "
                                          f"scaffolding: {scaffold} tokens") as err:
        passkey.make_trial(ENCODE, 100, seed=0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, ok", [(" 48213.", True), ("48213", True), ("\n48213 is", True),
                                      (" 4821", False), (" 482130", False), (" the key", False),
                                      (" 48 213", False)])
def test_answer_scoring(text, ok):
    assert passkey.answer_correct(text, "48213") is ok


def test_accuracy_runs_batched_prompts_through_generate():
    """A random model: the pipeline runs (left-padded batch of different prompt lengths) and
    reports every trial; retrieval itself is measured on SmolLM2 (slow test below)."""
    import flax.linen as nn
    import jax

    from longlora_jax.modeling.llama import LlamaForCausalLM

    cfg = LlamaConfig.preset("tiny", scan_layers=True)
    variables = nn.unbox(jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0),
                                                              np.zeros((1, 8), np.int32)))
    result = passkey.passkey_accuracy(cfg, variables, ByteTokenizer(), 400, trials=3, batch=2)
    assert result["trials"] == 3 and len(result["answers"]) == 3
    assert result["accuracy"] == result["correct"] / 3
    assert result["prompt_tokens"] <= 400


@pytest.mark.slow
def test_smollm2_retrieves_the_passkey_at_1k():
    """SmolLM2-135M-Instruct (native window 8192) finds the key in ~1k-token prompts."""
    from longlora_jax.io.run import load_model

    loaded = load_model("smollm2")
    result = passkey.passkey_accuracy(loaded.cfg, loaded.variables, loaded.tokenizer, 1024,
                                      trials=4, batch=2)
    print(result)
    assert result["accuracy"] >= 0.75
