"""The official LongLoRA S2-Attn in PyTorch: the peer that does the same work as ours.

The semantics of the official `llama_attn_replace.py` (its non-flash forward, with SDPA in
each group as the issue tracker's users run it): the key/value heads are repeated to the
query heads, the second half of the heads is rolled back by G/2 along the sequence, the
sequence is cut into groups of G attended causally (one SDPA call over all groups folded into
the batch), and the rolled heads are rolled forward again. The roll wraps around, so this is
our S2 with `wrap=True`; benchmarks compare it with ours at the same setting.

`s2_attention` works on [B, H, N, D] tensors; `register` makes it a transformers attention
implementation ("longlora_s2") so a transformers + PEFT model trains with it.
"""

from __future__ import annotations

ATTENTION_NAME = "longlora_s2"


def s2_attention(q_bhnd, k_bhnd, v_bhnd, group: int):
    """Official S2-Attn (wrap-around roll), causal in groups of `group`: q [B, Hq, N, D],
    k, v [B, Hkv, N, D] (Hq a multiple of Hkv) -> [B, Hq, N, D]."""
    import torch

    b, hq, n, d = q_bhnd.shape
    if n % group:
        raise ValueError(f"S2 needs N={n} to be a multiple of the group size {group}")
    repeat = hq // k_bhnd.shape[1]
    k_bhnd = k_bhnd.repeat_interleave(repeat, dim=1)
    v_bhnd = v_bhnd.repeat_interleave(repeat, dim=1)
    half = hq // 2

    def shift(x):  # [B, H, N, D] -> [B * N/G, H, G, D], second half of the heads rolled
        x = torch.cat([x[:, :half], x[:, half:].roll(-group // 2, dims=2)], dim=1)
        return x.reshape(b, hq, n // group, group, d).transpose(1, 2).reshape(-1, hq, group, d)

    out = torch.nn.functional.scaled_dot_product_attention(
        shift(q_bhnd), shift(k_bhnd), shift(v_bhnd), is_causal=True)
    out = out.reshape(b, n // group, hq, group, d).transpose(1, 2).reshape(b, hq, n, d)
    return torch.cat([out[:, :half], out[:, half:].roll(group // 2, dims=2)], dim=1)


def register(group_size_ratio: float) -> str:
    """Registers the official S2 as transformers' attention "longlora_s2" (G = ratio x N,
    as the official training script sets it) and returns the name to pass as
    `attn_implementation`."""
    from transformers import AttentionInterface

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                **kwargs):
        n = query.shape[2]
        out = s2_attention(query, key, value, group=int(n * group_size_ratio))
        return out.transpose(1, 2).contiguous(), None  # [B, N, H, D], as transformers wants

    AttentionInterface.register(ATTENTION_NAME, forward)
    return ATTENTION_NAME
