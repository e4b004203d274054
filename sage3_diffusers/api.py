"""Public attention calls. Shapes: (B, H, S, D) for tensor_layout="HND", (B, S, H, D) for "NHD".

q: (B, Hq, Sq, D); k, v: (B, Hkv, Skv, D) with Hq % Hkv == 0 (GQA); Sq may differ from Skv.
fp16/bf16 for the quantized kernels (fp32 goes to SDPA or an emulation, see `dispatch`). Causal masking is
top-left aligned, as in torch SDPA. Inputs are never modified. Non-finite inputs give non-finite outputs
in the rows they reach (for quantized kernels a NaN spreads through its quantization group: a query block,
or a whole head for K/V, which are smoothed by their mean).
"""
from __future__ import annotations

import torch

from .backends.base import AttentionProblem
from .dispatch import Selection, backend_for, device_capability, select_backend

LAYOUTS = ("HND", "NHD")


def _problem(q, k, v, layout: str, is_causal: bool, return_lse: bool, attn_mask) -> AttentionProblem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'(B, H, S, D)' if layout == 'HND' else '(B, S, H, D)'} for "
                             f"tensor_layout={layout!r}), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"tensor_layout must be one of {LAYOUTS}, got {layout!r}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    hd = (1, 2) if layout == "HND" else (2, 1)  # (head dim index, seq dim index)
    b, hq, sq, d = q.shape[0], q.shape[hd[0]], q.shape[hd[1]], q.shape[3]
    hkv, skv = k.shape[hd[0]], k.shape[hd[1]]
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    if v.shape[hd[0]] != hkv or v.shape[hd[1]] != skv:
        raise ValueError(f"k and v must have the same heads and sequence length, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} ({layout})")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if skv == 0 and sq > 0:
        raise ValueError("key/value sequence length is 0: attention over no keys is undefined")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError("attn_mask must be a tensor (bool: True = attend, or additive float) or None")
    return AttentionProblem(
        batch=b, heads_q=hq, heads_kv=hkv, seq_q=sq, seq_kv=skv, head_dim=d, head_dim_v=v.shape[3],
        dtype=q.dtype, device_type=q.device.type, capability=device_capability(q.device), layout=layout,
        is_causal=bool(is_causal), return_lse=bool(return_lse), has_mask=attn_mask is not None)


def resolve(q, k, v, kernel: str = "auto", *, is_causal: bool = False, tensor_layout: str = "HND",
            return_lse: bool = False, attn_mask=None) -> Selection:
    """Which backend `sage_attention` would run for these inputs, and why the others were rejected."""
    return select_backend(_problem(q, k, v, tensor_layout, is_causal, return_lse, attn_mask), kernel)


def choose(q, k, v, kernel: str = "auto", *, is_causal: bool = False, tensor_layout: str = "HND",
           return_lse: bool = False, attn_mask=None):
    """(backend, fallback note or None) for these inputs; unlike `resolve`, safe inside torch.compile."""
    return backend_for(_problem(q, k, v, tensor_layout, is_causal, return_lse, attn_mask), kernel)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto", *,
                   is_causal: bool = False, tensor_layout: str = "HND", sm_scale: float | None = None,
                   return_lse: bool = False, attn_mask: torch.Tensor | None = None):
    """Attention through the best backend for `kernel` ("auto", "fp4", "int8_fp8", "sdpa" or a backend
    name). Returns out (q's layout and dtype) or (out, lse) with lse fp32 (B, Hq, Sq), natural log."""
    problem = _problem(q, k, v, tensor_layout, is_causal, return_lse, attn_mask)
    scale = problem.head_dim ** -0.5 if sm_scale is None else float(sm_scale)
    if problem.seq_q == 0 or problem.batch == 0 or problem.heads_q == 0:
        out = q.new_empty(q.shape[:3] + (v.shape[3],))
        lse = torch.empty((problem.batch, problem.heads_q, problem.seq_q), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    backend, _ = backend_for(problem, kernel)
    return backend.forward(q, k, v, layout=tensor_layout, is_causal=is_causal, sm_scale=scale,
                           return_lse=return_lse, attn_mask=attn_mask)


def sageattn3(q, k, v, is_causal: bool = False, tensor_layout: str = "HND", sm_scale: float | None = None,
              return_lse: bool = False):
    """SageAttention3 (NVFP4 microscaling). Where no FP4 kernel runs, see `dispatch` for the fallback."""
    return sage_attention(q, k, v, "fp4", is_causal=is_causal, tensor_layout=tensor_layout, sm_scale=sm_scale,
                          return_lse=return_lse)


# The name the SageAttention3 release uses for the same call.
sageattn3_blackwell = sageattn3


def sageattn2pp(q, k, v, is_causal: bool = False, tensor_layout: str = "HND", sm_scale: float | None = None,
                return_lse: bool = False):
    """SageAttention2++ (INT8 QK, FP8 PV)."""
    return sage_attention(q, k, v, "int8_fp8", is_causal=is_causal, tensor_layout=tensor_layout,
                          sm_scale=sm_scale, return_lse=return_lse)
