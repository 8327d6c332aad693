"""lm-evaluation-harness backend: `--model longlora_jax` runs lm-eval's tasks on this project's
models (`python -m longlora_jax.harness` registers it and runs lm-eval's command line).

    python -m longlora_jax.harness --model longlora_jax --model_args model=runs/demo \\
        --tasks hellaswag --batch_size 4

model_args (lm-eval's `key=value,...`): model (a training workdir, or smollm2 | hf:DIR |
gguf:FILE | preset:NAME | BASE+ADAPTER_DIR, as `evaluate --model`), quantize (auto | none |
int8 | int4 | nf4), rope (base | default | linear:F | dynamic:F | yarn:F), dtype, max_length
(tokens a request may use; default the model's context window), max_gen_toks (default 256),
prefill_chunk (tokens per KV-cache chunk for long inputs, as `evaluate`; 0 = one forward).
Any other key is a ConfigError naming the valid ones.

The three request types follow lm-eval's `hf` backend token for token, so that the two agree on
the same weights: context and continuation are encoded apart (`TemplateLM`) with the
tokenizer's own special tokens, an empty context becomes BOS (else EOS); inputs longer than
max_length keep their last max_length tokens; rolling loglikelihoods use lm-eval's own
disjoint windows of max_length tokens after a BOS prefix. Loglikelihoods come from a
full-attention forward run through the KV cache `prefill_chunk` tokens at a time (exact;
O(chunk) activations), batched with right padding; `generate_until` decodes greedily through
the KV-cache decoder (`inference.decode.generate`), batched with left padding, and cuts the
text at the first stop string.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from longlora_jax.data.tokenizer import decoder
from longlora_jax.errors import ConfigError
from longlora_jax.inference.decode import generate
from longlora_jax.io.run import load_model
from longlora_jax.modeling.config import parse_rope
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.kv_cache import CACHE_COLLECTION, init_cache
from longlora_jax.modeling.llama import CausalLM

MODEL_ARGS = ("model", "quantize", "rope", "dtype", "max_length", "max_gen_toks",
              "prefill_chunk")
# lm-eval passes these from its own flags; accepted, and `device` ignored (JAX places arrays).
HARNESS_ARGS = ("batch_size", "max_batch_size", "device")
_PAD_TO = 64  # request batches are padded to a multiple of this: few compiled shapes


def token_logprob_fn(model: CausalLM, prefill_chunk: int):
    """A jitted (variables, inputs_bn, targets_bn) -> (logprob_bn, greedy_bn): at each position
    the log-probability of its target (the next token) and whether the target is the argmax.
    Full causal attention through the KV cache, chunk by chunk (n a multiple of the chunk)."""

    def score(variables, h_bce, next_bc):
        logits = model.apply(variables, h_bce, method=CausalLM.project).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, next_bc[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == next_bc

    @jax.jit
    def run(variables, ids_bn, next_bn):
        b, n = ids_bn.shape
        chunk = min(prefill_chunk or n, n)
        positions_bn = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

        def chunks(x_bn):
            return x_bn.reshape(b, n // chunk, chunk).swapaxes(0, 1)

        def body(cache, xs):
            ids_bc, positions_bc, next_bc = xs
            h_bce, updated = model.apply({**variables, CACHE_COLLECTION: cache}, ids_bc,
                                         positions_bc, decode=True, return_hidden=True,
                                         mutable=[CACHE_COLLECTION])
            return updated[CACHE_COLLECTION], score(variables, h_bce, next_bc)

        cache = nn.unbox(init_cache(model, b, n))
        _, (logp_cbc, greedy_cbc) = jax.lax.scan(
            body, cache, (chunks(ids_bn), chunks(positions_bn), chunks(next_bn)))
        return (logp_cbc.swapaxes(0, 1).reshape(b, n), greedy_cbc.swapaxes(0, 1).reshape(b, n))

    return run


def _int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args {name}={value!r}: need an integer") from None


@register_model("longlora_jax")
class LongLoRALM(TemplateLM):
    """This project's models for lm-eval (see the module docstring)."""

    def __init__(self, model: str = "smollm2", quantize: str = "auto", rope: str = "base",
                 dtype: str = "float32", max_length: int | None = None,
                 max_gen_toks: int = 256, prefill_chunk: int = 2048, batch_size: Any = 1,
                 max_batch_size: Any = None, device: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model_args key {sorted(unknown)[0]!r}; valid: "
                              f"{', '.join(MODEL_ARGS)}")
        loaded = load_model(str(model), rope=parse_rope(str(rope)), dtype=dtype,
                            quantize=str(quantize))
        self.cfg, self.variables, self.tokenizer = loaded.cfg, loaded.variables, loaded.tokenizer
        if not hasattr(self.tokenizer, "decode") or not hasattr(self.tokenizer, "encode"):
            raise ConfigError(f"model {model!r} has no tokenizer lm-eval can use")
        self.name = loaded.name
        self._max_length = _int("max_length", max_length or self.cfg.context_window)
        self.max_gen_toks = _int("max_gen_toks", max_gen_toks)
        self.prefill_chunk = _int("prefill_chunk", prefill_chunk)
        auto = str(batch_size).startswith("auto")
        self.batch_size = 8 if auto else _int("batch_size", batch_size)
        self._logprobs = token_logprob_fn(build_model(self.cfg), self.prefill_chunk)

    # ------------------------------------------------------------------ what lm-eval asks

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self.eot_token_id if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """As lm-eval's hf backend: the tokenizer's own special tokens (e.g. a LLaMA BOS)
        unless `add_special_tokens` says otherwise or the text starts with BOS already."""
        if not hasattr(self.tokenizer, "get_vocab"):  # the byte tokenizer adds none
            return [int(i) for i in self.tokenizer.encode(string)]
        bos = getattr(self.tokenizer, "bos_token", None)
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return [int(i) for i in self.tokenizer.encode(string, **options)]

    def tok_decode(self, tokens: list[int]) -> str:
        return decoder(self.tokenizer)(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) per request of
        (key, context ids, continuation ids), inputs cut to their last max_length tokens."""
        rows = [((list(context) + list(continuation))[-(self.max_length + 1):], len(continuation))
                for _, context, continuation in requests]
        results: list[tuple[float, bool]] = []
        for first in range(0, len(rows), self.batch_size):
            group = rows[first:first + self.batch_size]
            width = -(-max(len(full) - 1 for full, _ in group) // _PAD_TO) * _PAD_TO
            if self.prefill_chunk and width > self.prefill_chunk:
                width = -(-width // self.prefill_chunk) * self.prefill_chunk
            ids_bn = np.zeros((len(group), width + 1), np.int32)  # right padding
            for row, (full, _) in enumerate(group):
                ids_bn[row, :len(full)] = full
            logp_bn, greedy_bn = (np.asarray(x) for x in self._logprobs(
                self.variables, ids_bn[:, :-1], ids_bn[:, 1:]))
            for row, (full, count) in enumerate(group):
                span = slice(len(full) - 1 - count, len(full) - 1)
                results.append((float(logp_bn[row, span].sum()),
                                bool(greedy_bn[row, span].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each document, over lm-eval's disjoint max_length windows."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, *w) for w in windows])
            out.append(sum(logp for logp, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's `until` strings (and EOS)."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            until += [eos_text] if eos_text and eos_text not in until else []
            new_tokens = _int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0) or 0) > 0:
                raise ConfigError("generate_until: longlora_jax decodes greedily only "
                                  "(do_sample=false, temperature=0)")
            budget = self.max_length - new_tokens
            if budget < 1:
                raise ConfigError(f"max_gen_toks={new_tokens} leaves no room for a prompt in "
                                  f"max_length={self.max_length}")
            for first in range(0, len(indices), self.batch_size):
                batch = indices[first:first + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in batch]
                rows = generate(self.cfg, self.variables, prompts, new_tokens,
                                eos_token_id=self.eot_token_id, prefill_chunk=self.prefill_chunk)
                for i, row in zip(batch, rows, strict=True):
                    text = self.tok_decode([int(t) for t in row[-new_tokens:]])
                    for stop in until:
                        text = text.split(stop)[0]
                    out[i] = text
        return out

