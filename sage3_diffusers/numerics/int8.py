"""INT8 quantization with one scale per group of tokens (SageAttention2's Q/K quantization).

For a group G of tokens of one (batch, head):  δ_G = max_{t∈G, c} |x[t, c]| / 127,
x̂[t, c] = rne(x[t, c] / δ_G) clamped to [-127, 127]; a group with δ_G = 0 quantizes to zeros.

Granularities (token index t within one head; `token_groups_*` return each token's group id):
- "per_block":  one scale per `block` consecutive tokens.
- "per_thread": the layout of the Hopper wgmma accumulator, so one thread needs one Q and one K scale.
  Q: within each 16-row warp slice, rows with equal (t % 8) share a scale: 8 groups per 16 tokens.
  K: within each `block`-token tile, tokens with equal (t % 8) // 2 share a scale: 4 groups per tile.
"""
from __future__ import annotations

import torch

from .formats import INT8_MAX, int8_round

QK_QUANT_GRANULARITIES = ("per_block", "per_thread")


def q_token_groups(seq_len: int, granularity: str, block: int = 128, device=None) -> torch.Tensor:
    t = torch.arange(seq_len, device=device)
    if granularity == "per_block":
        return t // block
    if granularity == "per_thread":
        return (t // 16) * 8 + t % 8
    raise ValueError(f"unknown qk_quant_gran {granularity!r}; allowed: {QK_QUANT_GRANULARITIES}")


def k_token_groups(seq_len: int, granularity: str, block: int = 128, device=None) -> torch.Tensor:
    t = torch.arange(seq_len, device=device)
    if granularity == "per_block":
        return t // block
    if granularity == "per_thread":
        return (t // block) * 4 + (t % 8) // 2
    raise ValueError(f"unknown qk_quant_gran {granularity!r}; allowed: {QK_QUANT_GRANULARITIES}")


def quantize_int8_grouped(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., S, D] with one scale per token group (groups: [S] int ids, 0..G-1).

    Returns (x̂ as fp32 integers [..., S, D], per-token scale [..., S] in fp32). Per-token scales repeat
    the group scale so callers need no gather; the group structure is what defines the numerics."""
    xf = x.float()
    n_groups = xf.shape[-2]  # an upper bound on the group count (ids < S): no host sync for the true count
    row_amax = xf.abs().amax(dim=-1)  # [..., S]
    idx = groups.to(xf.device).expand_as(row_amax)
    group_amax = torch.zeros(row_amax.shape[:-1] + (n_groups,), dtype=torch.float32, device=xf.device)
    group_amax = group_amax.scatter_reduce(-1, idx, row_amax, reduce="amax", include_self=True)
    # amax reductions propagate NaN, so a NaN token makes its whole group NaN (never silently finite).
    # True division (a tensor divisor): torch would turn a Python-scalar divisor into a reciprocal multiply on CUDA.
    scale = (group_amax / torch.tensor(INT8_MAX, device=xf.device)).gather(-1, idx)  # [..., S]
    s = scale.unsqueeze(-1)
    xq = torch.where(s == 0, torch.zeros_like(xf), int8_round(xf / s))
    xq = torch.where(torch.isnan(s), torch.full_like(xq, float("nan")), xq)
    return xq, scale
