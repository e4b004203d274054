"""SageAttention2++ attention, pure torch: the definition the INT8-QK / FP8-PV kernels implement.

Per (batch, head), inputs HND [B, H, S, D], everything computed in fp32:
1. K smoothing: k̄ = mean over all key tokens; K' = K - k̄. Exact under softmax (a per-row constant shift).
2. INT8 Q and K' with one scale per token group (`int8.py`; default granularity "per_thread").
3. Scores in the log2 domain: t = (Q̂·K̂ᵀ) · δ_Q · δ_K · sm_scale · log2(e)   (integer dot products are exact).
4. Online softmax over key tiles of `kv_tile` tokens (`attention_common.py`) with the fixed offset
   P̃ = exp2(t - m + 8.807) ≤ 448, P̂ = e4m3_round(P̃); the row sum l is the fp32 sum of P̂ (row_sum=
   "quantized_p", the default: the sm90 kernel gets it from the tensor core as P̂ times a column of ones;
   slightly more accurate than summing P̃ against fp64 SDPA, docs/results/experiments.md) or of P̃ (row_sum="p_tilde": the
   Triton kernel, where the sum of P̂ costs ~10% speed).
5. V in FP8 E4M3 with one scale per channel (`fp8.py`); each tile's P̂·V̂ accumulates into a fresh fp32
   accumulator that is added to the running one (two-level FP32 accumulation).
6. O = acc / l · δ_V. LSE (natural log, of sm_scale·Q·Kᵀ with the unsmoothed K) = (m + log2 l - 8.807)·ln2
   + sm_scale·Q·k̄ᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_common import LN2, LOG2E, expand_kv_heads, online_softmax_attention
from .formats import e4m3_round
from .fp8 import quantize_fp8_per_channel
from .int8 import k_token_groups, q_token_groups, quantize_int8_grouped

# exp2 offset of P: the row maximum maps to 2**8.807 ≈ 447.8 ≤ 448 (E4M3 max), as in SageAttention2.
P_FP8_OFFSET_LOG2 = 8.807


@dataclass
class Sage2ppQuantized:
    q_int8: torch.Tensor   # [B, Hq, Sq, D] fp32 integers
    q_scale: torch.Tensor  # [B, Hq, Sq] per-token copy of its group's scale
    k_int8: torch.Tensor   # [B, Hkv, Skv, D]
    k_scale: torch.Tensor  # [B, Hkv, Skv]
    k_mean: torch.Tensor   # [B, Hkv, 1, D]
    v_fp8: torch.Tensor    # [B, Hkv, Skv, D] fp32 holding E4M3 values
    v_scale: torch.Tensor  # [B, Hkv, D]


def sage2pp_quantize(q, k, v, *, qk_quant_gran: str = "per_thread", q_block: int = 128, k_block: int = 128,
                     smooth_k: bool = True) -> Sage2ppQuantized:
    qf, kf, vf = q.float(), k.float(), v.float()
    k_mean = kf.mean(dim=-2, keepdim=True) if smooth_k else torch.zeros_like(kf[..., :1, :])
    q_i8, q_s = quantize_int8_grouped(qf, q_token_groups(q.shape[-2], qk_quant_gran, q_block, q.device))
    k_i8, k_s = quantize_int8_grouped(kf - k_mean, k_token_groups(k.shape[-2], qk_quant_gran, k_block, k.device))
    v_f8, v_s = quantize_fp8_per_channel(vf)
    return Sage2ppQuantized(q_i8, q_s, k_i8, k_s, k_mean, v_f8, v_s)


def sage2pp_attention_reference(q, k, v, *, is_causal: bool = False, sm_scale: float | None = None,
                                return_lse: bool = False, qk_quant_gran: str = "per_thread",
                                q_block: int = 128, k_block: int = 128, kv_tile: int = 128,
                                smooth_k: bool = True, row_sum: str = "quantized_p"):
    """q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] (HND). Returns out (q's dtype) or (out, lse fp32 [B, Hq, Sq]).
    row_sum: "quantized_p" (l sums the e4m3 P that multiplies V) or "p_tilde" (l sums the fp32 P̃)."""
    if row_sum not in ("quantized_p", "p_tilde"):
        raise ValueError(f"row_sum must be 'quantized_p' or 'p_tilde', got {row_sum!r}")
    heads_q, seq_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    seq_kv = k.shape[2]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    qz = sage2pp_quantize(q, k, v, qk_quant_gran=qk_quant_gran, q_block=q_block, k_block=k_block,
                          smooth_k=smooth_k)
    k_i8 = expand_kv_heads(qz.k_int8, heads_q)
    k_s = expand_kv_heads(qz.k_scale.unsqueeze(-1), heads_q).squeeze(-1)
    v_f8 = expand_kv_heads(qz.v_fp8, heads_q)
    q_scaled = qz.q_scale * (scale * LOG2E)

    def scores_log2(start, end):
        s_int = qz.q_int8 @ k_i8[..., start:end, :].transpose(-1, -2)
        return s_int * q_scaled.unsqueeze(-1) * k_s[..., None, start:end]

    acc, l, m = online_softmax_attention(
        scores_log2, e4m3_round, lambda s, e: v_f8[..., s:e, :], seq_q=seq_q, seq_kv=seq_kv, kv_tile=kv_tile,
        p_offset_log2=P_FP8_OFFSET_LOG2, is_causal=is_causal, device=q.device,
        row_sum_of_quantized_p=row_sum == "quantized_p")
    v_scale = expand_kv_heads(qz.v_scale.unsqueeze(-2), heads_q)
    out = (acc / l.unsqueeze(-1) * v_scale).to(q.dtype)
    if not return_lse:
        return out
    k_mean = expand_kv_heads(qz.k_mean, heads_q)
    lse = (m + torch.log2(l) - P_FP8_OFFSET_LOG2) * LN2 + scale * (q.float() @ k_mean.transpose(-1, -2)).squeeze(-1)
    return out, lse
