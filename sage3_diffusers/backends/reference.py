"""The reference numerics run as backends: slow, any device, for accuracy studies and CPU tests.
Never chosen by kernel="auto"; used when named, or for a family when fallback="emulate"."""
from __future__ import annotations

import torch

from ..numerics import sage2pp_attention_reference, sage3_attention_reference
from .base import AttentionBackend, from_hnd, to_hnd


class _ReferenceBackend(AttentionBackend):
    priority = -10
    auto_eligible = False
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dims = None
    verified = "is the specification (pure torch); unit-tested against hand-computed values and fp64 SDPA"
    _fn = None

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        # Contiguous copies: the fp32 reductions then see one memory order whatever the caller's strides, so the
        # quantization (rounding boundaries amplify a last-bit difference to an e4m3/int8 step) is layout-invariant.
        q, k, v = (to_hnd(t, layout).contiguous() for t in (q, k, v))
        res = type(self)._fn(q, k, v, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse)
        if return_lse:
            return from_hnd(res[0], layout), res[1]
        return from_hnd(res, layout)


class ReferenceFp4Backend(_ReferenceBackend):
    name = "reference_fp4"
    family = "fp4"
    description = "SageAttention3 NVFP4 numerics emulated in torch (slow)"
    _fn = staticmethod(sage3_attention_reference)


class ReferenceInt8Fp8Backend(_ReferenceBackend):
    name = "reference_int8_fp8"
    family = "int8_fp8"
    description = "SageAttention2++ INT8-QK/FP8-PV numerics emulated in torch (slow)"
    _fn = staticmethod(sage2pp_attention_reference)
BACKENDS = [ReferenceFp4Backend, ReferenceInt8Fp8Backend]
