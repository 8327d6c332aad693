"""Prompt templates for generation: a prompt, or a material (e.g. a book) plus a question.

    build_prompt(tokenizer, prompt=..., template="auto")
    build_prompt(tokenizer, material=..., question=..., template="auto")

template:
  "auto"      the tokenizer's chat template if it has one; else "longlora" for a material +
              question and the raw prompt otherwise
  "chat"      the tokenizer's chat template (one user message)
  "longlora"  "[INST]{instruction}[/INST]": what the official inference script prompts with
              since November 2023, when the LongAlpaca models moved to LLaMA-2 prompting
              (the SFT template of the same name trains with it)
  "alpaca"    the Alpaca prompt the official script used before (earlier LongAlpaca releases)
  "none"      the text as it is
The instruction is `material + "\\n" + question`, as the official script builds it.
"""

from __future__ import annotations

from typing import Any

from longlora_jax.data.sft import PROMPT_DICT
from longlora_jax.errors import ConfigError

TEMPLATES = ("auto", "chat", "longlora", "alpaca", "none")
_FORMATS = {"longlora": PROMPT_DICT["prompt_llama2"], "alpaca": PROMPT_DICT["prompt_no_input"]}


def build_prompt(tokenizer: Any, *, prompt: str | None = None, material: str | None = None,
                 question: str | None = None, template: str = "auto") -> str:
    """The prompt text: material + question (or the prompt) in the chosen template."""
    if template not in TEMPLATES:
        raise ConfigError(f"template={template!r}; valid: {', '.join(TEMPLATES)}")
    text = f"{material}\n{question}" if material is not None else prompt
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    if template == "auto":
        template = "chat" if has_chat else ("longlora" if material is not None else "none")
    if template == "chat":
        if not has_chat:
            raise ConfigError("template='chat' but the tokenizer has no chat template; use "
                              "'longlora', 'alpaca' or 'none'")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    if template in _FORMATS:
        return _FORMATS[template].format(instruction=text)
    return text
