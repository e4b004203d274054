"""SageAttention3 attention, pure torch: the definition the NVFP4 kernels implement.

Per (batch, head), inputs HND [B, H, S, D], everything computed in fp32:
1. K smoothing: k̄ = mean over all key tokens; K' = K - k̄ (exact under softmax).
2. Q smoothing per block of `q_block` (128) query tokens: q̄_b = mean of the block's valid tokens,
   Q'_b = Q_b - q̄_b. The removed part is added back exactly as ΔS[b, j] = q̄_b · K'_j (fp32, unquantized).
3. Q', K' in NVFP4 with 1x16 blocks along D; V in NVFP4 with 1x16 blocks along the *tokens* (the PV
   reduction dim), per channel (`nvfp4.py`: E4M3 block scale = blockmax/(6·g) rounded before dividing).
   The second-level FP32 scale g is per 128-token tile (the kernels' CTA tiles, so it costs no extra pass):
   g = amax/(6·448) over the tile of Q' (per query block), of K' (per key tile), and per channel over the tile
   of V (per key tile and channel); g = 1 for an all-zero tile. It keeps every block scale inside E4M3's
   range whatever the input magnitude; the kernels fold g_q·g_k into the score scale and g_v into the
   per-tile PV accumulation.
4. S = Q̂'·K̂'ᵀ + ΔS; scores in the log2 domain t = S · sm_scale · log2(e).
5. Online softmax over key tiles of `kv_tile` (128) tokens; P in two levels: per row
   P̃ = exp2(t - m + log2(448·6)) so the row max maps to 2688 (level 1), then NVFP4 with 1x16 blocks along
   the keys of each tile (level 2: block scale = e4m3_round(blockmax/6)). The row sum uses the fp32 P̃.
6. O = Σ_tiles (P̂·V̂) with fp32 accumulation, O /= l. LSE (natural log, of sm_scale·Q·Kᵀ with the
   unsmoothed K) = (m + log2 l - log2 2688)·ln2 + sm_scale·Q·k̄ᵀ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention_common import LN2, LOG2E, expand_kv_heads, online_softmax_attention
from .formats import E2M1_MAX, E4M3_MAX
from .nvfp4 import NVFP4Tensor, fake_quantize_nvfp4, quantize_nvfp4

P_FP4_OFFSET_LOG2 = math.log2(448.0 * 6.0)
SAGE3_Q_BLOCK = 128
SAGE3_KV_TILE = 128


@dataclass
class Sage3Quantized:
    q: NVFP4Tensor            # Q' [B, Hq, Sq, D], blocks along D, tensor_scale [B, Hq, Sq, 1] (its tile's g)
    k: NVFP4Tensor            # K' [B, Hkv, Skv, D], blocks along D, tensor_scale [B, Hkv, Skv, 1]
    v: NVFP4Tensor            # V tiled [B, Hkv, n_tiles, kv_tile, D], blocks along the tile's tokens,
                              # tensor_scale [B, Hkv, n_tiles, 1, D]; tokens >= Skv are zero padding
    q_tile_scale: torch.Tensor  # [B, Hq, ceil(Sq/q_block)]
    k_tile_scale: torch.Tensor  # [B, Hkv, ceil(Skv/kv_tile)]
    v_tile_scale: torch.Tensor  # [B, Hkv, ceil(Skv/kv_tile), D]
    q_mean: torch.Tensor      # [B, Hq, ceil(Sq/q_block), D]
    k_mean: torch.Tensor      # [B, Hkv, 1, D]
    delta_s: torch.Tensor     # [B, Hq, ceil(Sq/q_block), Skv] = q̄_b · K'ᵀ

    def v_dequantized(self, seq_kv: int) -> torch.Tensor:
        return self.v.dequantize().flatten(-3, -2)[..., :seq_kv, :]


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over the valid tokens of each block of `block` tokens along dim -2: [..., ceil(S/block), D]."""
    seq = x.shape[-2]
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq
    sums = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (n_blocks, block)).sum(dim=-2)
    counts = torch.full((n_blocks,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts.unsqueeze(-1)


def _tiled(x: torch.Tensor, tile: int) -> torch.Tensor:
    """[..., S, D] -> [..., ceil(S/tile), tile, D], zero padded."""
    n = -(-x.shape[-2] // tile)
    return torch.nn.functional.pad(x, (0, 0, 0, n * tile - x.shape[-2])).unflatten(-2, (n, tile))


# fp32(1/2688); g is amax times this constant (a multiply, not a division, on every device).
_INV_FP4_RANGE = 1.0 / (E2M1_MAX * E4M3_MAX)


def second_level_scale(amax: torch.Tensor) -> torch.Tensor:
    """g = amax · fp32(1/(6·448)): the tile's largest block gets E4M3 scale ~448. All-zero tile: 1. NaN stays NaN."""
    inv = torch.tensor(_INV_FP4_RANGE, dtype=torch.float32, device=amax.device)
    return torch.where(amax == 0, torch.ones_like(amax), amax.float() * inv)


def sage3_quantize(q, k, v, *, q_block: int = SAGE3_Q_BLOCK, kv_tile: int = SAGE3_KV_TILE,
                   smooth_q: bool = True, smooth_k: bool = True) -> Sage3Quantized:
    qf, kf, vf = q.float(), k.float(), v.float()
    heads_q, seq_q, seq_kv = q.shape[1], q.shape[2], k.shape[2]
    k_mean = kf.mean(dim=-2, keepdim=True) if smooth_k else torch.zeros_like(kf[..., :1, :])
    ks = kf - k_mean
    if smooth_q and seq_q > 0:
        q_mean = block_means(qf, q_block)
    else:
        q_mean = torch.zeros(qf.shape[:-2] + (-(-seq_q // q_block), qf.shape[-1]), device=q.device)
    qs = qf - q_mean.repeat_interleave(q_block, dim=-2)[..., :seq_q, :]
    delta_s = q_mean @ expand_kv_heads(ks, heads_q).transpose(-1, -2)

    q_g = second_level_scale(_tiled(qs, q_block).abs().amax(dim=(-1, -2)))
    k_g = second_level_scale(_tiled(ks, kv_tile).abs().amax(dim=(-1, -2)))
    v_tiles = _tiled(vf, kv_tile)
    v_g = second_level_scale(v_tiles.abs().amax(dim=-2))
    q_rows = q_g.repeat_interleave(q_block, dim=-1)[..., :seq_q, None]
    k_rows = k_g.repeat_interleave(kv_tile, dim=-1)[..., :seq_kv, None]
    return Sage3Quantized(
        q=quantize_nvfp4(qs, dim=-1, tensor_scale=q_rows),
        k=quantize_nvfp4(ks, dim=-1, tensor_scale=k_rows),
        v=quantize_nvfp4(v_tiles, dim=-2, tensor_scale=v_g.unsqueeze(-2)),
        q_tile_scale=q_g, k_tile_scale=k_g, v_tile_scale=v_g, q_mean=q_mean, k_mean=k_mean, delta_s=delta_s)


def sage3_attention_reference(q, k, v, *, is_causal: bool = False, sm_scale: float | None = None,
                              return_lse: bool = False, q_block: int = SAGE3_Q_BLOCK,
                              kv_tile: int = SAGE3_KV_TILE, smooth_q: bool = True, smooth_k: bool = True):
    """q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] (HND). Returns out (q's dtype) or (out, lse fp32 [B, Hq, Sq])."""
    if kv_tile % 16:
        raise ValueError(f"kv_tile must be a multiple of 16 (the P block), got {kv_tile}")
    heads_q, seq_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    seq_kv = k.shape[2]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    qz = sage3_quantize(q, k, v, q_block=q_block, kv_tile=kv_tile, smooth_q=smooth_q, smooth_k=smooth_k)
    q_hat = qz.q.dequantize()
    k_hat = expand_kv_heads(qz.k.dequantize(), heads_q)
    v_hat = expand_kv_heads(qz.v_dequantized(seq_kv), heads_q)
    delta_rows = qz.delta_s.repeat_interleave(q_block, dim=-2)[..., :seq_q, :]
    c = scale * LOG2E

    def scores_log2(start, end):
        s = q_hat @ k_hat[..., start:end, :].transpose(-1, -2) + delta_rows[..., start:end]
        return s * c

    acc, l, m = online_softmax_attention(
        scores_log2, lambda p: fake_quantize_nvfp4(p, dim=-1), lambda s, e: v_hat[..., s:e, :],
        seq_q=seq_q, seq_kv=seq_kv, kv_tile=kv_tile, p_offset_log2=P_FP4_OFFSET_LOG2,
        is_causal=is_causal, device=q.device)
    out = (acc / l.unsqueeze(-1)).to(q.dtype)
    if not return_lse:
        return out
    k_mean = expand_kv_heads(qz.k_mean, heads_q)
    lse = (m + torch.log2(l) - P_FP4_OFFSET_LOG2) * LN2 + scale * (q.float() @ k_mean.transpose(-1, -2)).squeeze(-1)
    return out, lse
