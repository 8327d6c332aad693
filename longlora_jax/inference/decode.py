"""KV-cache decoding with full attention: one prefill, then single-token steps in a jitted loop.

    out_bs = generate(cfg, variables, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0)

Prompts (B rows):
  - an int array [B, T]: every token is prompt text (equal lengths);
  - a list of 1-D token sequences of different lengths: left-padded to the longest with the
    pad id, and the padding masked out;
  - an int array [B, T] with `prompt_mask` [B, T] (transformers' `attention_mask`: 1 = text,
    0 = padding, padding only at the start of a row).
Left padding puts every row's last prompt token at slot T-1, so all rows share one cache
index; positions count text tokens only (transformers' `cumsum(mask) - 1`), so a padded row
decodes exactly as it would alone, and greedy output matches `transformers` `generate`.

Output: int32 [B, T + max_new_tokens], the (left-padded) prompts followed by the new tokens.
Greedy when temperature == 0, else sampling from softmax(logits / temperature) restricted to
the smallest set of tokens whose probability reaches top_p. A row stops at its first EOS
token (`cfg.eos_token_id` or `eos_token_id=`); after that it emits the pad id
(`cfg.pad_token_id`, else the first EOS id), as transformers does. The loop ends early once
every row has stopped (the rest is pad).

Streaming: `on_token(step, tokens_b)` is a host callback (`jax.experimental.io_callback`,
ordered) called from inside the jitted loop with each step's tokens as numpy; the CLI decodes
and prints them as they come. Everything else runs on device in one `lax.while_loop`.

The command `python -m longlora_jax.generate` (`inference.chat`) builds the prompt
(`inference.prompts`) and streams the answer through `on_token`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from longlora_jax.io.base import shard_variables
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.families import build_model
from longlora_jax.modeling.kv_cache import CACHE_COLLECTION, init_cache
from longlora_jax.parallel import rules

TokenCallback = Callable[[np.ndarray, np.ndarray], None]



def as_variables(params_or_variables: Mapping[str, Any]) -> dict[str, Any]:
    """`{"params": ..., "lora": ...}` as given, or bare params wrapped as `{"params": params}`."""
    if "params" in params_or_variables:
        return dict(params_or_variables)
    return {"params": params_or_variables}


def pad_prompts(prompt_ids: Any, prompt_mask: Any = None, *, pad_id: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T] int32, mask [B, T] int32) with every row's padding on the left.

    prompt_ids: [B, T] ints (with an optional left-padding `prompt_mask`), or a list of 1-D
    token sequences, which are left-padded with `pad_id` to the longest.
    """
    if isinstance(prompt_ids, np.ndarray | jax.Array) and np.ndim(prompt_ids) == 2:
        ids = np.asarray(prompt_ids, np.int32)
        mask = (np.ones_like(ids) if prompt_mask is None
                else np.asarray(prompt_mask, np.int32).reshape(ids.shape))
    else:
        if prompt_mask is not None:
            raise ValueError("prompt_mask goes with a [B, T] array, not a list of sequences")
        rows = [np.asarray(row, np.int32).reshape(-1) for row in prompt_ids]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    if ids.size == 0 or (mask.sum(axis=1) == 0).any():
        raise ValueError(f"every prompt needs at least one token; got shape {ids.shape} with "
                         f"{int((mask.sum(axis=1) == 0).sum())} empty row(s)")
    if (np.diff(mask, axis=1) < 0).any() or not set(np.unique(mask)) <= {0, 1}:
        raise ValueError("prompt_mask must be 0/1 with the zeros (padding) at the start of a row")
    return ids, mask


def _top_p_logits(logits_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside the nucleus (smallest top set with probability >= top_p) set to -inf."""
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    threshold_b = jnp.min(jnp.where(before_bv < top_p, sorted_bv, jnp.inf), axis=-1)
    return jnp.where(logits_bv >= threshold_b[:, None], logits_bv, -jnp.inf)


def _choose(logits_bv, key, temperature, top_p, greedy: bool) -> jax.Array:
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = _top_p_logits(logits_bv / temperature, top_p)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _decoder(cfg: LlamaConfig, max_new_tokens: int, greedy: bool, eos: tuple[int, ...],
             pad_id: int, on_token: TokenCallback | None, prefill_chunk: int):
    """The jitted (variables, cache, ids, mask, temperature, top_p, key) -> new tokens [B, M].

    prefill_chunk > 0: the prompt (a multiple of it long) is prefilled that many tokens at a
    time, in a `lax.scan` over chunks.
    """
    model = build_model(cfg)
    eos_ids = jnp.asarray(eos, jnp.int32)

    def forward(variables, cache, ids_bn, positions_bn, segments_bn):
        logits_bnv, updated = model.apply(
            {**variables, CACHE_COLLECTION: cache}, ids_bn, positions_bn, segments_bn,
            decode=True, mutable=[CACHE_COLLECTION])
        return logits_bnv[:, -1], updated[CACHE_COLLECTION]

    def prefill(variables, cache, ids_bt, positions_bt, mask_bt):
        b, t = ids_bt.shape
        if not prefill_chunk or t <= prefill_chunk:
            return forward(variables, cache, ids_bt, positions_bt, mask_bt)

        def chunks(x_bt):
            return x_bt.reshape(b, t // prefill_chunk, prefill_chunk).swapaxes(0, 1)

        def body(cache, xs):
            logits_bv, cache = forward(variables, cache, *xs)
            return cache, logits_bv

        cache, logits_cbv = jax.lax.scan(
            body, cache, (chunks(ids_bt), chunks(positions_bt), chunks(mask_bt)))
        return logits_cbv[-1], cache

    @jax.jit
    def run(variables, cache, ids_bt, mask_bt, temperature, top_p, key):
        b = ids_bt.shape[0]
        # transformers' generate: positions count text tokens; padding gets position 1.
        positions_bt = jnp.where(mask_bt > 0, jnp.cumsum(mask_bt, axis=1) - 1, 1)
        logits_bv, cache = prefill(variables, cache, ids_bt, positions_bt, mask_bt)
        out_bm = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

        def emit(step, logits_bv, finished_b, out_bm, key):
            key, sub = jax.random.split(key)
            token_b = jnp.where(finished_b, pad_id,
                                _choose(logits_bv, sub, temperature, top_p, greedy))
            if on_token is not None:
                io_callback(on_token, None, step, token_b, ordered=True)
            finished_b = finished_b | jnp.isin(token_b, eos_ids)
            return token_b, finished_b, out_bm.at[:, step].set(token_b), key

        token_b, finished_b, out_bm, key = emit(0, logits_bv, jnp.zeros(b, bool), out_bm, key)
        position_b = positions_bt[:, -1] + 1

        def cond(state):
            step, _, finished_b, *_ = state
            return (step < max_new_tokens) & ~jnp.all(finished_b)

        def body(state):
            step, token_b, finished_b, position_b, out_bm, cache, key = state
            logits_bv, cache = forward(variables, cache, token_b[:, None], position_b[:, None],
                                       jnp.ones((b, 1), jnp.int32))
            token_b, finished_b, out_bm, key = emit(step, logits_bv, finished_b, out_bm, key)
            return step + 1, token_b, finished_b, position_b + 1, out_bm, cache, key

        state = (jnp.int32(1), token_b, finished_b, position_b, out_bm, cache, key)
        return jax.lax.while_loop(cond, body, state)[4]

    return run


def eos_ids(cfg: LlamaConfig, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, Sequence) else (eos,)))


def generate(
    config: LlamaConfig,
    params_or_variables: Mapping[str, Any],
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_mask: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_token: TokenCallback | None = None,
    prefill_chunk: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Prompts + up to `max_new_tokens` new tokens each: int32 [B, T + max_new_tokens].

    See the module docstring for prompt formats, sampling, EOS and streaming.
    prefill_chunk > 0 prefills the prompt that many tokens at a time, bounding the prefill's
    activations (exact full attention; prompts are left-padded to a multiple of it, which the
    returned prompt part then shows). Dynamic NTK RoPE ignores it: its frequencies depend on the
    longest position of a call, and transformers prefills in one call. `mesh`: variables and
    cache placed by the logical-axis table, run under `rules.activate(mesh)`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    eos = eos_ids(config, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    ids_bt, mask_bt = pad_prompts(prompt_ids, prompt_mask, pad_id=pad)
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 0 (0 = one prefill)")
    if config.rope_scaling.rope_type == "dynamic" or ids_bt.shape[1] <= prefill_chunk:
        prefill_chunk = 0
    if prefill_chunk and ids_bt.shape[1] % prefill_chunk:
        extra = prefill_chunk - ids_bt.shape[1] % prefill_chunk
        ids_bt = np.pad(ids_bt, ((0, 0), (extra, 0)), constant_values=pad)
        mask_bt = np.pad(mask_bt, ((0, 0), (extra, 0)))
    b, t = ids_bt.shape
    model = build_model(config)
    cache = init_cache(model, b, t + max_new_tokens)
    run = _decoder(config, max_new_tokens, temperature == 0, eos, int(pad), on_token,
                   prefill_chunk)
    args = (as_variables(params_or_variables), nn.unbox(cache), ids_bt, mask_bt,
            jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jax.random.key(seed))
    if mesh is None:
        new_bm = run(*args)
    else:
        variables = shard_variables(config, args[0], mesh)
        cache = jax.device_put(args[1], rules.tree_shardings(mesh, cache))
        with rules.activate(mesh):
            new_bm = run(variables, cache, *args[2:])
    return np.concatenate([ids_bt, np.asarray(new_bm)], axis=1)
