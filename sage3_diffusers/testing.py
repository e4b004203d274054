"""Inputs and fp64 references for tests and benchmarks.

DiT-like attention inputs: K with a large per-channel offset shared by all tokens (what K smoothing removes),
Q with a few outlier channels (what per-block Q smoothing and fine-grained scales are for)."""
import torch


def dit_like_qkv(b, hq, sq, d, *, hkv=None, skv=None, dtype=torch.float32, device="cpu", k_offset=8.0,
                 q_outlier=10.0, generator=None):
    hkv = hq if hkv is None else hkv
    skv = sq if skv is None else skv
    g = generator
    q = torch.randn(b, hq, sq, d, generator=g, device=device)
    q[..., : max(1, d // 32)] *= q_outlier  # outlier channels
    k = torch.randn(b, hkv, skv, d, generator=g, device=device)
    k = k + k_offset * torch.randn(1, hkv, 1, d, generator=g, device=device)  # per-channel offset shared by tokens
    v = torch.randn(b, hkv, skv, d, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa_fp64(q, k, v, is_causal=False, scale=None):
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k, v, is_causal=is_causal, scale=scale)


def lse_fp64(q, k, is_causal=False, scale=None):
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)
