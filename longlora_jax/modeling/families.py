"""The model families and the one way to build a config's model: `build_model(cfg)`.

    llama, mistral, qwen2  ->  `modeling.llama.LlamaForCausalLM` (the LLaMA block; Mistral's
                               sliding window and Qwen2's q/k/v biases are config fields)
    gpt_neox               ->  `modeling.gpt_neox.GPTNeoXForCausalLM`

A config's family is its `model_type` (HF config.json's field; `LlamaConfig.from_hf` refuses
any other with the supported list). Every family's module has the same call
(`CausalLM.__call__`: ids -> logits, train / decode / return_hidden) and `project`, so
training, evaluation, generation and export never look at the family.
"""

from __future__ import annotations

from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.gpt_neox import GPTNeoXForCausalLM
from longlora_jax.modeling.llama import CausalLM, LlamaForCausalLM


def build_model(cfg: LlamaConfig) -> CausalLM:
    """The flax module of `cfg`'s model family."""
    if cfg.model_type == "gpt_neox":
        return GPTNeoXForCausalLM(cfg)
    return LlamaForCausalLM(cfg)
