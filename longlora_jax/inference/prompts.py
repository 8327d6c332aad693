"""Prompt templates for generation: a prompt, or a material (e.g. a book) plus a question.

    build_prompt(tokenizer, prompt=..., template="auto")
    build_prompt(tokenizer, material=..., question=..., template="auto")

template: "auto" (the tokenizer's chat template if it has one; else the Alpaca template for a
material + question and the raw prompt otherwise) | "chat" | "alpaca" | "none".
"""

from __future__ import annotations

from typing import Any

from longlora_jax.errors import ConfigError

# The official LongLoRA inference template for a material + question (no chat template).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES = ("auto", "chat", "alpaca", "none")


def build_prompt(tokenizer: Any, *, prompt: str | None = None, material: str | None = None,
                 question: str | None = None, template: str = "auto") -> str:
    """The prompt text: material + question (or the prompt) in the chosen template."""
    if template not in TEMPLATES:
        raise ConfigError(f"template={template!r}; valid: {', '.join(TEMPLATES)}")
    text = f"{material}\n{question}" if material is not None else prompt
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    if template == "auto":
        template = "chat" if has_chat else ("alpaca" if material is not None else "none")
    if template == "chat":
        if not has_chat:
            raise ConfigError("template='chat' but the tokenizer has no chat template; use "
                              "'alpaca' or 'none'")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=text)
    return text
