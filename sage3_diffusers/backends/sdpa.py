"""Exact attention through torch SDPA, with cuDNN pinned first on CUDA (about 1.9x torch's flash
backend on H100); torch falls through flash, efficient and math when cuDNN cannot take an input."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionProblem, from_hnd, to_hnd

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
except ImportError:  # pragma: no cover - torch < 2.3
    sdpa_kernel = None


def _sdpa(q, k, v, attn_mask, is_causal, scale):
    enable_gqa = q.shape[1] != k.shape[1]
    if q.is_cuda and sdpa_kernel is not None:
        with sdpa_kernel(_CUDA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def key_length_mask(kv_lens: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """[B,1,1,seq_kv] bool, True where key j < kv_lens[b]: the right-padding key mask that `kv_lens` stands for,
    built on kv_lens' device (no host sync)."""
    keys = torch.arange(seq_kv, device=kv_lens.device, dtype=kv_lens.dtype)
    return (keys[None, :] < kv_lens[:, None])[:, None, None, :]


def exact_lse(q, k, *, scale: float, is_causal: bool, attn_mask=None, chunk: int = 1024) -> torch.Tensor:
    """Natural-log LSE of scale·Q·Kᵀ (masked like SDPA), fp32 [B, Hq, Sq], in query chunks to bound memory."""
    heads_q = q.shape[1]
    kf = k.float()
    if k.shape[1] != heads_q:
        kf = kf.repeat_interleave(heads_q // k.shape[1], dim=1)
    out = []
    for s in range(0, q.shape[2], chunk):
        e = min(s + chunk, q.shape[2])
        sc = (q[:, :, s:e].float() @ kf.transpose(-1, -2)) * scale
        if is_causal:
            qi = torch.arange(s, e, device=q.device)[:, None]
            ki = torch.arange(k.shape[2], device=q.device)[None, :]
            sc = sc.masked_fill(ki > qi, float("-inf"))
        if attn_mask is not None:
            m = attn_mask[..., s:e, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] == q.shape[2] else attn_mask
            sc = sc.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sc + m.float()
        out.append(torch.logsumexp(sc, dim=-1))
    return torch.cat(out, dim=-1)


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    family = "sdpa"
    priority = 0
    description = "exact torch SDPA (cuDNN first on CUDA, then flash/efficient/math)"
    verified = "torch's own kernels; output equality with diffusers' processors tested on CPU"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims = None
    supports_mask = True
    supports_kv_lens = True  # as the equivalent [B,1,1,N] boolean key mask, built on the device

    def input_reasons(self, p: AttentionProblem) -> list[str]:
        reasons = super().input_reasons(p)
        # SDPA handles differing value head dims itself.
        return [r for r in reasons if not r.startswith("value head_dim")]

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None, kv_lens=None):
        qh, kh, vh = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
        if kv_lens is not None:
            attn_mask = key_length_mask(kv_lens, kh.shape[2])
        out = from_hnd(_sdpa(qh, kh, vh, attn_mask, is_causal, sm_scale), layout)
        if not return_lse:
            return out
        return out, exact_lse(qh, kh, scale=sm_scale, is_causal=is_causal, attn_mask=attn_mask)
BACKENDS = [SdpaBackend]
