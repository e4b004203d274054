"""Public attention calls. Shapes: (B, H, S, D) for tensor_layout="HND", (B, S, H, D) for "NHD".

q: (B, Hq, Sq, D); k, v: (B, Hkv, Skv, D) with Hq % Hkv == 0 (GQA); Sq may differ from Skv.
fp16/bf16 for the quantized kernels (fp32 goes to SDPA or an emulation, see `dispatch`). Causal masking is
top-left aligned, as in torch SDPA. Inputs are never modified. Non-finite inputs give non-finite outputs
in the rows they reach (for quantized kernels a NaN spreads through its quantization group: a query block,
or a whole head for K/V, which are smoothed by their mean).
"""
from __future__ import annotations

import math

import torch

from .backends.base import describe_problem
from .dispatch import Selection, decide, explain_selection


def resolve(q, k, v, kernel: str = "auto", *, is_causal: bool = False, tensor_layout: str = "HND",
            return_lse: bool = False, attn_mask=None, kv_lens=None) -> Selection:
    """Which backend `sage_attention` would run for these inputs, and why the others were rejected. With
    SAGE3_FALLBACK=error and no runnable backend, `.backend` is None and `.explain()` lists every reason."""
    return explain_selection(describe_problem(q, k, v, tensor_layout, is_causal, return_lse, attn_mask, kv_lens),
                             kernel)


def choose(q, k, v, kernel: str = "auto", *, is_causal: bool = False, tensor_layout: str = "HND",
           return_lse: bool = False, attn_mask=None, kv_lens=None):
    """(backend, fallback note or None) for these inputs; unlike `resolve`, safe inside torch.compile and cached
    per call signature (see `dispatch.decide`)."""
    backend, note, _ = decide(q, k, v, kernel, tensor_layout, is_causal, return_lse, attn_mask, kv_lens)
    return backend, note


def _checked_scale(sm_scale) -> float:
    try:
        scale = float(sm_scale)
    except (TypeError, ValueError):
        raise ValueError(f"sm_scale must be a finite number > 0 (or None for head_dim ** -0.5), got "
                         f"{type(sm_scale).__name__} {sm_scale!r}") from None
    if isinstance(sm_scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"sm_scale must be a finite number > 0 (or None for head_dim ** -0.5), got {sm_scale!r}")
    return scale


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto", *,
                   is_causal: bool = False, tensor_layout: str = "HND", sm_scale: float | None = None,
                   return_lse: bool = False, attn_mask: torch.Tensor | None = None,
                   kv_lens: torch.Tensor | None = None):
    """Attention through the best backend for `kernel` ("auto", "fp4", "int8_fp8", "sdpa" or a backend
    name). Returns out (q's layout and dtype) or (out, lse) with lse fp32 (B, Hq, Sq), natural log.

    kv_lens: int32 [B] on q's device, per-sample key lengths of right-padded keys (sample b attends to its first
    kv_lens[b] keys, every query row included); read on the device by the backend, never on the host. Backends
    without `supports_kv_lens` are not chosen for such calls (the dispatcher says why)."""
    backend, _, empty = decide(q, k, v, kernel, tensor_layout, is_causal, return_lse, attn_mask, kv_lens)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else _checked_scale(sm_scale)
    if empty:
        out = q.new_empty(q.shape[:3] + (v.shape[3],))
        b, h, s = (q.shape[0], q.shape[2], q.shape[1]) if tensor_layout == "NHD" else q.shape[:3]
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if kv_lens is None:
        return backend.forward(q, k, v, layout=tensor_layout, is_causal=is_causal, sm_scale=scale,
                               return_lse=return_lse, attn_mask=attn_mask)
    return backend.forward(q, k, v, layout=tensor_layout, is_causal=is_causal, sm_scale=scale,
                           return_lse=return_lse, attn_mask=attn_mask, kv_lens=kv_lens)


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
