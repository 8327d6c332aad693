"""SFT: the official LongLoRA prompt templates, prompt masking, truncation, bad JSON."""

import json

import numpy as np
import pytest

from longlora_jax.data import ByteTokenizer, default_data_config, make_train_iterator
from longlora_jax.data.sft import format_prompt, load_sft_json
from longlora_jax.errors import DataError

# The official supervised-fine-tune.py prompts, written out for two concrete examples.
SYSTEM = (
    "[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as "
    "helpfully as possible, while being safe.  Your answers should not include any harmful, "
    "unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your "
    "responses are socially unbiased and positive in nature.\n\nIf a question does not make any "
    "sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false "
    "information.\n<</SYS>> \n\n"
)
NO_INPUT = {"instruction": "Summarize {the} book.", "output": "It is about {x}."}
WITH_INPUT = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}


def test_templates_match_the_official_script():
    assert format_prompt(NO_INPUT, "longlora") == "[INST]Summarize {the} book.[/INST]"
    assert format_prompt(WITH_INPUT, "longlora") == SYSTEM + " Translate. \nBonjour [/INST]"
    assert format_prompt(NO_INPUT, "llama2_sys") == SYSTEM + " Summarize {the} book. [/INST]"
    assert format_prompt(NO_INPUT, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSummarize {the} book.\n\n### Response:")
    assert format_prompt(WITH_INPUT, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:")
    # An empty input counts as no input, as in the official `example.get("input", "") != ""`.
    assert format_prompt({**WITH_INPUT, "input": ""}, "longlora") == "[INST]Translate.[/INST]"


def _sft_cfg(tmp_path, examples, **overrides):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(examples))
    cfg = default_data_config()
    cfg.source, cfg.paths, cfg.shuffle, cfg.prefetch = "sft_json", (str(path),), False, 0
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path):
    tok = ByteTokenizer()
    cfg = _sft_cfg(tmp_path, [NO_INPUT, WITH_INPUT], add_bos=True)
    batch = next(make_train_iterator(cfg, tok, seq_len=1024, global_batch=2))
    for row, example in enumerate([NO_INPUT, WITH_INPUT]):
        prompt = [tok.bos_token_id, *tok.encode(format_prompt(example, "longlora"))]
        response = [*tok.encode(example["output"]), tok.eos_token_id]
        n = len(prompt) + len(response)
        np.testing.assert_array_equal(batch["inputs"][row, :n - 1], (prompt + response)[:-1])
        np.testing.assert_array_equal(batch["targets"][row, :n - 1], (prompt + response)[1:])
        # Target t is scored iff it is a response token (or the final EOS).
        expected_mask = np.zeros(1024, np.float32)
        expected_mask[len(prompt) - 1:n - 1] = 1.0
        np.testing.assert_array_equal(batch["loss_mask"][row], expected_mask)
        scored = batch["targets"][row][batch["loss_mask"][row] > 0]
        assert tok.decode(scored[:-1]) == example["output"] and scored[-1] == tok.eos_token_id
        np.testing.assert_array_equal(batch["segment_ids"][row], np.r_[np.ones(n - 1),
                                                                       np.zeros(1024 - n + 1)])


def test_long_examples_are_truncated_to_seq_len(tmp_path):
    tok = ByteTokenizer()
    example = {"instruction": "Q", "output": "A" * 100}
    batch = next(make_train_iterator(_sft_cfg(tmp_path, [example]), tok, seq_len=32,
                                     global_batch=1))
    prompt = tok.encode(format_prompt(example, "longlora"))
    full = prompt + tok.encode(example["output"]) + [tok.eos_token_id]
    np.testing.assert_array_equal(batch["inputs"][0], full[:32])
    np.testing.assert_array_equal(batch["targets"][0], full[1:33])
    np.testing.assert_array_equal(batch["loss_mask"][0],
                                  np.r_[np.zeros(len(prompt) - 1), np.ones(33 - len(prompt))])


@pytest.mark.parametrize("content, message", [
    ("[{\"instruction\": \"x\"}]", "no string 'output'"),
    ("[{\"output\": \"x\"}]", "no string 'instruction'"),
    ("[{\"instruction\": \"x\", \"output\": \"y\", \"input\": 3}]", "non-string 'input'"),
    ("[]", "non-empty JSON list"),
    ("{\"instruction\": \"x\"}", "non-empty JSON list"),
    ("[1]", "example 0 is a int"),
    ("not json", "not valid JSON"),
])
def test_bad_sft_json_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_sft_json(path)
    assert "\n" not in str(err.value)


def test_unknown_template_is_a_config_error(tmp_path):
    cfg = _sft_cfg(tmp_path, [NO_INPUT], sft_template="vicuna")
    with pytest.raises(ValueError, match="sft_template='vicuna'"):
        next(make_train_iterator(cfg, ByteTokenizer(), seq_len=8, global_batch=1))
