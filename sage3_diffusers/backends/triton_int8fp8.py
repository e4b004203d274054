"""Triton INT8-QK / FP8-PV attention (SageAttention2++ numerics) as a dispatcher backend.

Runs through the custom op `torch.ops.sage3.triton_int8fp8_attn` (kernels in `kernels/triton/`). Portable
across sm_80+: FP8 P·V where Triton has an FP8 dot (sm_89+, TMA loads on sm_90+); on sm_80/86 P·V in FP16
with the same INT8 Q/K quantization. The sm_90a CUDA kernel, where built, outranks it (priority 100 vs 50).
"""
from __future__ import annotations

import torch

from ..kernels.triton import op as _op  # noqa: F401  (registers torch.ops.sage3.triton_int8fp8_attn; no triton import)
from ..kernels.triton import triton_available
from .base import AttentionBackend, AttentionProblem


class TritonInt8Fp8Backend(AttentionBackend):
    name = "triton_int8_fp8"
    family = "int8_fp8"
    priority = 50
    description = ("Triton INT8 QK / FP8 E4M3 PV, SageAttention2++ numerics with fused quantization (K smoothing, "
                   "per-thread INT8 Q/K, per-channel FP8 V); on sm_80/86 (no FP8 dot) P·V in FP16 with the same "
                   "INT8 Q/K")
    verified = ("run on H200 (2026-11-27 06:57 UTC): tests/gpu/test_triton_int8fp8.py vs the torch reference "
                "(row_sum='p_tilde'), 28 passing; sm_80/86 FP16 P·V path only exercised by forcing it on H200")
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    _unavailable: list[str] | None = None

    def unavailable_reasons(self) -> list[str]:
        if self._unavailable is None:
            reasons = []
            if not triton_available():
                reasons.append("triton not installed")
            if not torch.cuda.is_available():
                reasons.append("no CUDA device")
            else:
                caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
                if max(caps) < (8, 0):
                    reasons.append(f"needs sm_80+ (found {', '.join(f'sm_{a}{b}' for a, b in caps)})")
            type(self)._unavailable = reasons
        return list(self._unavailable)

    def input_reasons(self, p: AttentionProblem) -> list[str]:
        reasons = super().input_reasons(p)
        if p.device_type != "cuda":
            reasons.append(f"needs CUDA tensors (got {p.device_type})")
        elif p.capability is not None and p.capability < (8, 0):
            reasons.append(f"needs sm_80+ (this device is sm_{p.capability[0]}{p.capability[1]})")
        return reasons

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("triton_int8_fp8 does not take attn_mask")
        out, lse = torch.ops.sage3.triton_int8fp8_attn(q, k, v, layout, bool(is_causal), float(sm_scale),
                                                      bool(return_lse), "per_thread")
        return (out, lse) if return_lse else out


BACKENDS = [TritonInt8Fp8Backend]
