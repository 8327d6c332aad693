"""longlora_jax: LongLoRA (S2-Attn + position interpolation + LoRA+) in JAX/Flax."""

from longlora_jax.modeling.config import ConfigError, LlamaConfig, RopeScaling
from longlora_jax.modeling.llama import LlamaForCausalLM

__all__ = ["ConfigError", "LlamaConfig", "LlamaForCausalLM", "RopeScaling"]
__version__ = "0.1.0"
