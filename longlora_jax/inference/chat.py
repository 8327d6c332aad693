"""Answer one prompt with a model, streaming the text: what `python -m longlora_jax.generate` runs.

The model is any source `io.run.load_model` takes (a training workdir, smollm2, hf:DIR,
gguf:FILE, preset:NAME); the prompt is either `prompt` or a `material` file plus a
`question` (as the official inference script), put through `inference.prompts`.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

import ml_collections
import numpy as np

from longlora_jax.cli.renames import Renamed
from longlora_jax.data.tokenizer import decoder, encoder
from longlora_jax.errors import ConfigError
from longlora_jax.inference.decode import eos_ids, generate
from longlora_jax.inference.prompts import build_prompt
from longlora_jax.io.run import load_model
from longlora_jax.modeling.config import parse_rope

# Retired spellings, accepted (with a warning) until the next release.
RENAMED = (Renamed("rope", "rope.scaling"),)
# Short flag names (`--rope linear:4`).
ALIASES = {"rope": "rope.scaling"}


def default_config() -> ml_collections.ConfigDict:
    """The generation settings.

    model            training workdir | smollm2 | hf:DIR | gguf:FILE | preset:NAME
    prompt           the prompt text; or
    material, question   a text file and a question about it (both together)
    template         auto | chat | longlora | alpaca | none (see `inference.prompts`)
    max_new_tokens, temperature (0 = greedy), top_p, seed   decoding
    rope.scaling     RoPE scaling to run with: base | default | linear:F | dynamic:F | yarn:F
                     (`--rope` for short)
    allow_beyond_context   allow prompt + new tokens beyond the model's context window
    dtype            weights and compute dtype
    quantize         the base's projections: auto (a workdir's own, none for a base) | none |
                     int8 | int4 | nf4 (see `modeling.quant`)
    """
    return ml_collections.ConfigDict(dict(
        model="smollm2", prompt="", material="", question="", template="auto",
        max_new_tokens=256, temperature=0.6, top_p=0.9, seed=0,
        rope=ml_collections.ConfigDict(dict(scaling="base")),
        allow_beyond_context=False, dtype="float32", quantize="auto",
    ))


class Streamer:
    """Prints the decoded text of one row as tokens arrive (holds back partial characters)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[int, ...]):
        self.decode, self.stop, self.ids, self.printed = decode, stop, [], 0
        self.done = False

    def __call__(self, step: np.ndarray, tokens_b: np.ndarray) -> None:
        token = int(np.asarray(tokens_b)[0])
        if self.done or token in self.stop:
            self.done = True
            return
        self.ids.append(token)
        text = self.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def answer(config: ml_collections.ConfigDict) -> str:
    """Generates the answer to `config`'s prompt, printing it as it comes; returns the text."""
    if bool(config.material) != bool(config.question):
        raise ConfigError("material and question go together (a file and a question about it)")
    if bool(config.prompt) == bool(config.material):
        raise ConfigError("give either prompt or material + question")
    material = None
    if config.material:
        path = pathlib.Path(config.material)
        if not path.is_file():
            raise ConfigError(f"material {config.material!r} is not a file")
        material = path.read_text(encoding="utf-8")
    loaded = load_model(config.model, rope=parse_rope(config.rope.scaling), dtype=config.dtype,
                        quantize=config.quantize)
    text = build_prompt(loaded.tokenizer, prompt=config.prompt or None, material=material,
                        question=config.question or None, template=config.template)
    ids = encoder(loaded.tokenizer)(text)
    total = len(ids) + config.max_new_tokens
    window = loaded.cfg.context_window
    if total > window and not config.allow_beyond_context:
        raise ConfigError(
            f"prompt ({len(ids)} tokens) + max_new_tokens {config.max_new_tokens} = {total} "
            f"exceeds the model's context window {window}; shorten it, set rope.scaling, or set "
            "allow_beyond_context")
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    stop = eos_ids(loaded.cfg, None) + (() if eos is None else (int(eos),))
    print(f"[{loaded.name}: {len(ids)} prompt tokens]", file=sys.stderr, flush=True)
    streamer = Streamer(decoder(loaded.tokenizer), stop)
    generate(loaded.cfg, loaded.variables, ids[None], config.max_new_tokens,
             temperature=config.temperature, top_p=config.top_p, seed=config.seed,
             eos_token_id=stop, on_token=streamer)
    print()
    return streamer.decode(streamer.ids)
