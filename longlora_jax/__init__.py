"""longlora_jax: LongLoRA (S2-Attn + position interpolation + LoRA+) in JAX/Flax.

    from longlora_jax import LlamaConfig, LlamaForCausalLM, build_model

The package root holds the commands (`python -m longlora_jax.train|evaluate|generate|export|
aot|bench|assets|miniature`), the error family every command reports in (`errors`) and these
public names; the library lives in its layers (README, "Layout").
"""

import os

# transformers prints an advisory notice at import when PyTorch is absent (the runtime never
# needs torch); advisory notices only, warnings and errors still show.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from longlora_jax.errors import ConfigError, UserError
from longlora_jax.modeling.config import LlamaConfig, RopeScaling
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.llama import LlamaForCausalLM

__all__ = ["ConfigError", "LlamaConfig", "LlamaForCausalLM", "RopeScaling", "UserError",
           "build_model"]
__version__ = "0.1.0"
