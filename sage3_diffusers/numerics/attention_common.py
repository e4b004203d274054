"""Pieces shared by the reference attentions: online softmax over key tiles in the log2 domain."""
from __future__ import annotations

import math
from typing import Callable

import torch

LOG2E = 1.4426950408889634
LN2 = math.log(2.0)


def expand_kv_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """GQA: query head h reads key/value head h // (heads_q // heads_kv)."""
    heads_kv = x.shape[1]
    return x if heads_kv == heads_q else x.repeat_interleave(heads_q // heads_kv, dim=1)


def online_softmax_attention(
    scores_log2: Callable[[int, int], torch.Tensor],
    quantize_p: Callable[[torch.Tensor], torch.Tensor],
    v_tile: Callable[[int, int], torch.Tensor],
    *,
    seq_q: int,
    seq_kv: int,
    kv_tile: int,
    p_offset_log2: float,
    is_causal: bool,
    device,
    row_sum_of_quantized_p: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-style forward over key tiles of `kv_tile` tokens, exactly as a tiled kernel computes it.

    scores_log2(start, end) -> [B, H, Sq, end-start] scores already scaled into the log2 domain.
    With m the running row max (including the current tile) the probabilities of a tile are
    P̃ = exp2(t - m + p_offset_log2), so the row maximum maps to 2**p_offset_log2. The PV product uses
    quantize_p(P̃) (the kernel's P operand); the row sum l accumulates the fp32 P̃, or with
    row_sum_of_quantized_p the quantized P itself (what a kernel gets by multiplying P with a column of ones
    on the tensor core: numerator and denominator then use the same P).
    Returns (acc, l, m): the output is acc / l, the log2-sum-exp is m + log2(l) - p_offset_log2.
    """
    acc = m = l = None
    q_idx = torch.arange(seq_q, device=device)
    for start in range(0, seq_kv, kv_tile):
        end = min(start + kv_tile, seq_kv)
        t = scores_log2(start, end)
        if is_causal:  # top-left aligned, as torch SDPA: query i sees keys j <= i
            k_idx = torch.arange(start, end, device=device)
            t = t.masked_fill(k_idx[None, :] > q_idx[:, None], float("-inf"))
        if acc is None:
            shape = t.shape[:-1]
            m = torch.full(shape, float("-inf"), device=device)
            l = torch.zeros(shape, device=device)
            acc = torch.zeros(shape + (v_tile(start, end).shape[-1],), device=device)
        m_new = torch.maximum(m, t.amax(dim=-1))
        # Rows that have seen only masked keys keep m = -inf: their P and rescale factor are 0.
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        p = torch.exp2(t - m_safe.unsqueeze(-1) + p_offset_log2)
        alpha = torch.exp2(m - m_safe)
        p_q = quantize_p(p)
        l = l * alpha + (p_q if row_sum_of_quantized_p else p).sum(dim=-1)
        acc = acc * alpha.unsqueeze(-1) + p_q @ v_tile(start, end)
        m = m_new
    return acc, l, m
