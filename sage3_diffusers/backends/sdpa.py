"""Exact attention through torch SDPA, with cuDNN tried first on CUDA (about 1.9x torch's flash backend on H100);
torch falls through the other backends the caller has enabled when cuDNN cannot take an input."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionProblem, from_hnd, to_hnd

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    _CUDNN = int(SDPBackend.CUDNN_ATTENTION)
except ImportError:  # pragma: no cover - torch < 2.3
    sdpa_kernel = None
_get_order = getattr(torch._C, "_get_sdp_priority_order", None)
_set_order = getattr(torch._C, "_set_sdp_priority_order", None)
_cudnn_first_orders: dict = {}
_order_lock = threading.Lock()


def cudnn_first(order) -> list:
    """SDPA's backend priority order with cuDNN moved to the front, the others kept in their order."""
    key = tuple(order)  # torch returns the order as ints
    hit = _cudnn_first_orders.get(key)
    if hit is None:
        hit = _cudnn_first_orders[key] = [_CUDNN] + [b for b in key if b != _CUDNN]
    return hit


def sdpa_cudnn_first(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """F.scaled_dot_product_attention with cuDNN tried first, the caller's priority order restored after. Only
    the order is set, the enabled backends stay the caller's: `sdpa_kernel(..., set_priority=True)` would enable
    and disable each backend on entry and exit, tens of µs of host time per call."""
    # The order is process-wide: the lock keeps overlapping calls from different threads from restoring each
    # other's cuDNN-first order for good (another thread's own SDPA calls still see it while one of ours runs, as
    # with sdpa_kernel).
    with _order_lock:
        previous = _get_order()
        _set_order(cudnn_first(previous))
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=enable_gqa)
        finally:
            _set_order(previous)


def _sdpa(q, k, v, attn_mask, is_causal, scale):
    enable_gqa = q.shape[1] != k.shape[1]
    if q.is_cuda and sdpa_kernel is not None:
        if _set_order is not None and not torch.compiler.is_compiling():
            return sdpa_cudnn_first(q, k, v, attn_mask, is_causal, scale, enable_gqa)
        with sdpa_kernel(_CUDA_ORDER, set_priority=True):  # traced: the context manager torch.compile knows
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
