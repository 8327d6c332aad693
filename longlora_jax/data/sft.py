"""Supervised fine-tuning examples: LongAlpaca-format JSON and the official LongLoRA prompts.

A data file is a JSON list of `{"instruction": str, "output": str, "input": str (optional)}`.
The prompt is built like the official `supervised-fine-tune.py` (its `PROMPT_DICT`): the
`*_input` template when `input` is non-empty, the no-input template otherwise; the response is
`output` followed by EOS. Prompt tokens (and BOS) are masked out of the loss.

Templates (`SFT_TEMPLATES`, pairs of (with input, without input)):
  "longlora"   what the official script uses: prompt_input_llama2 / prompt_llama2
  "llama2_sys" prompt_input_llama2 / prompt_no_input_llama2 (LLaMA-2 chat system prompt)
  "alpaca"     prompt_input / prompt_no_input (Stanford Alpaca)
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping

import numpy as np

from longlora_jax.errors import ConfigError, DataError

_LLAMA2_SYSTEM = (
    "[INST] <<SYS>>\n"
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information.\n"
    "<</SYS>> \n\n"
)
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
    "prompt_no_input_llama2": _LLAMA2_SYSTEM + " {instruction} [/INST]",
    "prompt_input_llama2": _LLAMA2_SYSTEM + " {instruction} \n{input} [/INST]",
    "prompt_llama2": "[INST]{instruction}[/INST]",
}
SFT_TEMPLATES = {
    "longlora": ("prompt_input_llama2", "prompt_llama2"),
    "llama2_sys": ("prompt_input_llama2", "prompt_no_input_llama2"),
    "alpaca": ("prompt_input", "prompt_no_input"),
}


def check_template(template: str) -> None:
    if template not in SFT_TEMPLATES:
        raise ConfigError(f"data.sft_template={template!r}; valid: {sorted(SFT_TEMPLATES)}")


def format_prompt(example: Mapping[str, str], template: str) -> str:
    """The prompt string of one example (everything before the response)."""
    check_template(template)
    with_input, without_input = SFT_TEMPLATES[template]
    key = with_input if example.get("input", "") != "" else without_input
    return PROMPT_DICT[key].format_map(example)


def load_sft_json(path: str | pathlib.Path) -> list[dict[str, str]]:
    """Reads and validates a LongAlpaca-format JSON file (a list of instruction examples)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"SFT data file {str(path)!r} does not exist")
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"SFT data file {str(path)!r} is not valid JSON (UTF-8): "
                        f"{type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"SFT data file {str(path)!r} must hold a non-empty JSON list of "
                        "{instruction, input, output} objects")
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise DataError(f"{path}: example {i} is a {type(example).__name__}, expected an "
                            "object with 'instruction', 'output' and optional 'input'")
        for field in ("instruction", "output"):
            if not isinstance(example.get(field), str):
                raise DataError(f"{path}: example {i} has no string {field!r} (each example "
                                "needs 'instruction' and 'output'; 'input' is optional)")
        if not isinstance(example.get("input", ""), str):
            raise DataError(f"{path}: example {i} has a non-string 'input'")
    return examples


def sft_tokens(
    example: Mapping[str, str],
    encode: Callable[[str], np.ndarray],
    *,
    eos_id: int,
    bos_id: int | None,
    template: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_l int32, weights_l float32): [BOS] prompt response EOS, weight 0 on BOS+prompt.

    `weights[i]` is the loss weight of predicting `tokens[i]`. Prompt and response are encoded
    separately so the mask boundary is exact.
    """
    prompt = encode(format_prompt(example, template))
    response = encode(example["output"])
    head = [bos_id] if bos_id is not None else []
    tokens = np.concatenate([np.asarray(head, np.int32), prompt, response,
                             np.asarray([eos_id], np.int32)])
    weights = np.zeros(len(tokens), np.float32)
    weights[len(head) + len(prompt):] = 1.0
    return tokens, weights
