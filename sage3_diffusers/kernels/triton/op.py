"""torch.library custom op around the Triton SageAttention2++ kernels, so torch.compile(fullgraph=True) traces
through it (fake implementation below) and CUDA graphs can capture it (no host syncs, no host-to-device copies;
the first eager call per shape class autotunes, so warm up before capturing).

Importing this module does not import triton; the op's CUDA implementation does, on first call.
"""
from __future__ import annotations

import torch

from ...backends.base import fake_attention_outputs

OP_NAME = "sage3::triton_int8fp8_attn"


@torch.library.custom_op(OP_NAME, mutates_args=(), device_types="cuda")
def triton_int8fp8_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                        sm_scale: float, return_lse: bool, qk_quant_gran: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out in q's layout and dtype, lse fp32 (B, Hq, Sq) natural log, or an empty tensor when
    return_lse is False)."""
    from .int8fp8 import int8fp8_attention
    out, lse = int8fp8_attention(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
                                 return_lse=return_lse, qk_quant_gran=qk_quant_gran)
    if lse is None:
        lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return out, lse


@triton_int8fp8_attn.register_fake
def _triton_int8fp8_attn_fake(q, k, v, layout, is_causal, sm_scale, return_lse, qk_quant_gran):
    return fake_attention_outputs(q, layout, return_lse)
