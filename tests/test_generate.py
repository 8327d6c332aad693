"""KV-cache decoding: cached logits equal the full forward's; greedy output equals transformers'.

References: our own full forward (itself checked against transformers in test_model_vs_hf.py)
for the step-by-step logits, and `transformers` `generate(do_sample=False)` on random tiny
checkpoints (GQA, rope scalings including dynamic NTK, left-padded batches) and on SmolLM2.
"""

import functools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from longlora_jax import generate as generate_command
from longlora_jax.cli import run_command
from longlora_jax.inference import decode as gen
from longlora_jax.inference import prompts
from longlora_jax.io.hf import load_pretrained
from longlora_jax.modeling.config import LlamaConfig
from longlora_jax.modeling.kv_cache import CACHE_COLLECTION, init_cache
from longlora_jax.modeling.llama import LlamaForCausalLM
from tests.helpers import run_python
from tests.test_model_vs_hf import random_hf_model

ATOL = 1e-5
PAD = 0

# name: (scan_layers, kv heads, lora rank, rope scaling)
CACHE_CASES = {
    "unscanned-gqa-lora-linear": (False, 2, 4, {"rope_type": "linear", "factor": 2.0}),
    "scanned-gqa-lora-yarn": (True, 2, 4, {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 8}),
    "scanned-mha-default": (True, 4, 0, None),
}


def tiny_variables(cfg: LlamaConfig, seed: int = 0) -> dict:
    """Random tiny variables with non-zero LoRA B (so the adapters change the logits)."""
    variables = nn.unbox(jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(seed),
                                                             np.zeros((1, 8), np.int32)))
    if "lora" in variables:
        leaves, tree = jax.tree.flatten(variables["lora"])
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = [x + 0.2 * jax.random.normal(k, x.shape)
                 for x, k in zip(leaves, keys, strict=True)]
        variables["lora"] = jax.tree.unflatten(tree, noisy)
    return variables


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cached_logits_equal_full_forward(case):
    scan, hkv, rank, rope = CACHE_CASES[case]
    cfg = LlamaConfig.preset("tiny", scan_layers=scan, num_key_value_heads=hkv, lora_rank=rank,
                             rope_scaling=rope)
    model = LlamaForCausalLM(cfg)
    variables = tiny_variables(cfg)
    n, prompt, pad = 16, 6, 3
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, n)).astype(np.int32)
    forward = jax.jit(model.apply)
    full = np.asarray(forward(variables, ids))
    if rank:  # the adapters are really applied on both paths
        base_only = np.asarray(forward({"params": variables["params"]}, ids))
        assert np.abs(base_only - full).max() > 1e-2
    # Row 1 is left-padded by `pad` slots (garbage tokens, segment 0): its text is ids[1, :n-pad].
    slots = np.concatenate([ids[:1], np.concatenate([ids[1:, -pad:], ids[1:, :-pad]], 1)])
    segments = np.ones((2, n), np.int32)
    segments[1, :pad] = 0
    positions = np.stack([np.arange(n), np.maximum(np.arange(n) - pad, 0)]).astype(np.int32)
    want = [full[0], full[1, : n - pad]]  # logits of the text tokens of each row

    step = jax.jit(functools.partial(model.apply, decode=True, mutable=[CACHE_COLLECTION]))
    cache = nn.unbox(init_cache(model, 2, n))
    got = []
    # prefill in two chunks of 3 tokens, then decode one token at a time
    spans = [(0, prompt // 2), (prompt // 2, prompt)] + [(t, t + 1) for t in range(prompt, n)]
    for lo, hi in spans:
        logits, updated = step({**variables, CACHE_COLLECTION: cache}, slots[:, lo:hi],
                               positions[:, lo:hi], segments[:, lo:hi])
        cache = updated[CACHE_COLLECTION]
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    err0 = np.abs(got[0] - want[0]).max()
    err1 = np.abs(got[1, pad:] - want[1]).max()
    print(f"{case}: max |cached - full| row0 {err0:.2e}, left-padded row1 {err1:.2e}")
    assert err0 < ATOL and err1 < ATOL
    flat = jax.tree_util.tree_flatten_with_path(cache)[0]
    indices = [np.asarray(leaf) for path, leaf in flat if path[-1].key == "index"]
    assert len(indices) == (1 if scan else cfg.num_hidden_layers)
    assert all((i == n).all() for i in indices)  # every layer wrote every slot


def test_decode_needs_positions():
    cfg = LlamaConfig.preset("tiny")
    model = LlamaForCausalLM(cfg)
    variables = tiny_variables(cfg)
    cache = nn.unbox(init_cache(model, 1, 4))
    with pytest.raises(ValueError, match="position_ids"):
        model.apply({**variables, CACHE_COLLECTION: cache}, np.ones((1, 2), np.int32),
                    decode=True, mutable=[CACHE_COLLECTION])


@pytest.mark.parametrize("start, n, window", [(0, 18, None), (7, 5, None), (17, 1, None),
                                              (3, 1, None), (0, 18, 6), (13, 4, 5), (17, 1, 9)])
def test_blocked_cache_attention_equals_numpy(start, n, window):
    """Blocks of 4 slots over an 18-slot cache (the last block overlaps its neighbour), GQA,
    a left-padded row, a sliding window (the loop then starts at the first block it reaches):
    equal to dense masked softmax attention in float64."""
    from longlora_jax.modeling.kv_cache import cached_attention

    rng = np.random.default_rng(start)
    b, s, hq, hkv, d = 2, 18, 6, 2, 8
    q = rng.normal(size=(b, n, hq, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, s, hkv, d)).astype(np.float32) for _ in range(2))
    kv_seg = np.ones((b, s), np.int32)
    kv_seg[1, :5] = 0  # row 1: five padding slots
    q_seg = kv_seg[:, start:start + n]
    got = np.asarray(cached_attention(q, k, v, kv_seg, q_seg, start, window=window, block=4))
    want = np.zeros_like(got, dtype=np.float64)
    for bi in range(b):
        for i in range(n):
            visible = (np.arange(s) <= start + i) & (kv_seg[bi] == q_seg[bi, i])
            if window is not None:
                visible &= np.arange(s) > start + i - window
            for h in range(hq):
                kh = h // (hq // hkv)
                scores = k[bi, visible, kh].astype(np.float64) @ q[bi, i, h] / np.sqrt(d)
                probs = np.exp(scores - scores.max())
                want[bi, i, h] = probs / probs.sum() @ v[bi, visible, kh]
    np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------ transformers

# name: (HF config changes, rope (test_model_vs_hf.ROPE), scan, prompt lengths, new tokens)
HF_CASES = {
    "gqa": ({"num_key_value_heads": 2}, "none", False, (12, 7), 12),
    "linear-scanned": ({"num_key_value_heads": 2}, "linear", True, (12, 5), 12),
    # max_position_embeddings=32: prefill at 24 tokens, decoding passes 32 -> the NTK base grows
    # at every step, and earlier keys keep the rotation they were cached with.
    "dynamic": ({"max_position_embeddings": 32}, "dynamic", False, (24, 20), 20),
    "llama3-9q3kv": ({"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3},
                     "llama3", True, (10, 10), 10),
}


def hf_greedy(model, rows: list[np.ndarray], new_tokens: int) -> np.ndarray:
    """transformers' greedy generate on left-padded rows (a fresh call: HF's dynamic RoPE
    state starts from the config)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    return out.numpy()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_greedy_equals_transformers(case, tmp_path):
    changes, rope, scan, lengths, new_tokens = HF_CASES[case]
    model = random_hf_model(changes, rope)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_pretrained(tmp_path, config_overrides={"scan_layers": scan})
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    want = hf_greedy(model, rows, new_tokens)
    got = gen.generate(cfg, params, rows, new_tokens, pad_token_id=PAD)
    assert got.shape == (len(rows), max(lengths) + new_tokens)
    print(f"{case}: ours {got[:, -new_tokens:].tolist()}\n{case}: hf   {want[:, -new_tokens:]}")
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1]:] == PAD).all()  # HF stopped early only if every row ended


def test_rows_stop_at_eos_and_match_transformers(tmp_path):
    """A row stops at its EOS and emits pad after; the other row runs on (as in HF)."""
    model = random_hf_model({"num_key_value_heads": 2}, "none")
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_pretrained(tmp_path)
    rows = [np.arange(10, 22, dtype=np.int32), np.arange(40, 48, dtype=np.int32)]
    free = gen.generate(cfg, params, rows, 10, eos_token_id=(), pad_token_id=PAD)[:, -10:]
    eos = int(free[0, 3])  # row 0's 4th new token becomes its EOS
    assert eos not in free[1, :6] and eos not in free[0, :3]
    got = gen.generate(cfg, params, rows, 10, eos_token_id=eos, pad_token_id=PAD)[:, -10:]
    np.testing.assert_array_equal(got[0, :4], free[0, :4])
    assert (got[0, 4:] == PAD).all()
    first_eos_1 = list(free[1]).index(eos) if eos in free[1] else 10
    np.testing.assert_array_equal(got[1, :first_eos_1 + 1], free[1, :first_eos_1 + 1])
    model.generation_config.eos_token_id = eos
    want = hf_greedy(model, rows, 10)[:, 12:]
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)


@pytest.mark.integration
def test_sharded_generate_equals_unsharded():
    """8 fake devices (data 2 x tensor 2 x sequence 2): the same greedy tokens."""
    out = run_python("""
        import json
        import jax, numpy as np, flax.linen as nn
        jax.config.update("jax_default_matmul_precision", "highest")
        from longlora_jax.generate import generate
        from longlora_jax.modeling.config import LlamaConfig
        from longlora_jax.modeling.llama import LlamaForCausalLM
        from longlora_jax.parallel.mesh import make_mesh
        cfg = LlamaConfig.preset("tiny", scan_layers=True, eos_token_id=None)
        init = jax.jit(LlamaForCausalLM(cfg).init)
        variables = nn.unbox(init(jax.random.key(0), np.zeros((1, 8), np.int32)))
        rows = [np.arange(3, 15, dtype=np.int32), np.arange(30, 37, dtype=np.int32)]
        one = generate(cfg, variables, rows, 8)
        mesh = make_mesh({"data": 2, "tensor": 2, "sequence": 2})
        sharded = generate(cfg, variables, rows, 8, mesh=mesh)
        print(json.dumps([one.tolist(), sharded.tolist()]))
    """, devices=8)
    one, sharded = json.loads(out.strip().splitlines()[-1])
    assert one == sharded


def test_streaming_callback_sees_every_token_in_order():
    cfg = LlamaConfig.preset("tiny", eos_token_id=None, scan_layers=True)
    variables = tiny_variables(cfg)
    seen = []
    out = gen.generate(cfg, variables, np.arange(3, 9, dtype=np.int32)[None], 7,
                       on_token=lambda step, toks: seen.append((int(step), toks.tolist())))
    assert [s for s, _ in seen] == list(range(7))
    assert [t[0] for _, t in seen] == out[0, 6:].tolist()


def test_chunked_prefill_gives_the_same_tokens():
    cfg = LlamaConfig.preset("tiny", eos_token_id=None, scan_layers=True)
    variables = tiny_variables(cfg)
    rows = [np.arange(3, 14, dtype=np.int32), np.arange(20, 26, dtype=np.int32)]
    one = gen.generate(cfg, variables, rows, 6)
    chunked = gen.generate(cfg, variables, rows, 6, prefill_chunk=4)  # 11 -> 3 chunks of 4
    assert chunked.shape == (2, 12 + 6)
    np.testing.assert_array_equal(chunked[:, -6:], one[:, -6:])


def test_sampling():
    cfg = LlamaConfig.preset("tiny", eos_token_id=None, scan_layers=True)
    variables = tiny_variables(cfg)
    prompt = np.arange(3, 9, dtype=np.int32)[None]
    greedy = gen.generate(cfg, variables, prompt, 8)
    # a vanishing nucleus keeps only the top token: sampling == greedy
    tiny_p = gen.generate(cfg, variables, prompt, 8, temperature=1.0, top_p=1e-6, seed=5)
    np.testing.assert_array_equal(tiny_p, greedy)
    a = gen.generate(cfg, variables, prompt, 8, temperature=1.5, seed=1)
    b = gen.generate(cfg, variables, prompt, 8, temperature=1.5, seed=1)
    c = gen.generate(cfg, variables, prompt, 8, temperature=1.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()


def test_top_p_sampling_distribution():
    """Samples follow softmax(logits / T) renormalised over the nucleus."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.asarray(gen._top_p_logits(logits, 0.7))
    assert np.isfinite(kept[0, :2]).all() and np.isinf(kept[0, 2:]).all()
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: gen._choose(logits, k, 1.0, 0.9, False))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(prompt_mask=np.array([[1, 0, 1]])), "prompt_mask"),
])
def test_bad_arguments(bad, match):
    cfg = LlamaConfig.preset("tiny")
    kwargs = {"max_new_tokens": 2, **bad}
    with pytest.raises(ValueError, match=match):
        gen.generate(cfg, {}, np.array([[5, 6, 7]], np.int32), **kwargs)


def test_cli_prompt_and_errors(capsys, tmp_path):
    def cli(*argv):
        return run_command(generate_command.COMMAND, list(argv))

    assert cli("--model", "preset:tiny", "--prompt", "hello", "--max-new-tokens", "4",
               "--temperature", "0") == 0
    captured = capsys.readouterr()
    assert "prompt tokens" in captured.err
    assert cli("--model", "preset:tiny", "--material", str(tmp_path / "nope.txt"),
               "--question", "why?") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope.txt" in err and len(err.splitlines()) == 1
    long_prompt = "x" * 2000  # the tiny preset's window is 1024 tokens (bytes tokenizer)
    assert cli("--model", "preset:tiny", "--prompt", long_prompt) == 2
    err = capsys.readouterr().err.strip()
    assert "context window 1024" in err and len(err.splitlines()) == 1


def test_build_prompt_templates():
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert prompts.build_prompt(Chat(), prompt="hi", material=None, question=None) == \
        "<user>hi</user><assistant>"
    # The official inference.py since November 2023: "[INST]{instruction}[/INST]", with the
    # instruction material + "\n" + question.
    assert prompts.build_prompt(object(), material="BOOK", question="Q?") == "[INST]BOOK\nQ?[/INST]"
    alpaca = prompts.build_prompt(object(), material="BOOK", question="Q?", template="alpaca")
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith(
        "### Instruction:\nBOOK\nQ?\n\n### Response:")
    assert prompts.build_prompt(object(), prompt="hi", material=None, question=None) == "hi"


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers():
    """The offline SmolLM2-135M-Instruct GGUF: 24 greedy tokens of a chat prompt, ours vs HF."""
    import transformers

    from longlora_jax.data import assets
    from longlora_jax.io.gguf import load_gguf, load_gguf_tokenizer

    path = assets.smollm2_gguf()
    tokenizer = load_gguf_tokenizer(path)
    text = prompts.build_prompt(tokenizer, prompt="Name three colours of the rainbow.",
                            material=None, question=None)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    cfg, params = load_gguf(path, config_overrides={"scan_layers": True})
    got = gen.generate(cfg, params, ids[None], 24)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want = hf_greedy(hf, [ids], 24)
    print("ours:", tokenizer.decode(got[0, len(ids):]))
    print("hf:  ", tokenizer.decode(want[0, len(ids):]))
    np.testing.assert_array_equal(got[0, : want.shape[1]], want[0])
