"""Triton INT8-QK / FP8-PV attention (SageAttention2++ numerics) as a dispatcher backend.

The kernels live in `kernels/triton/`; this module registers the torch.library custom op
`torch.ops.sage3.triton_int8fp8_attn` around them (with a fake implementation, so torch.compile(fullgraph=True)
traces through it and CUDA graphs can capture it: no host syncs, no host-to-device copies; the first eager call
per shape class autotunes, so warm up before capturing) and the backend `triton_int8_fp8`. Importing this module
does not import triton; the op's CUDA implementation does, on first call.

Portable across sm_80+: FP8 P·V where Triton has an FP8 dot (sm_89+, TMA loads on sm_90+); on sm_80/86 P·V in
FP16 with the same INT8 Q/K quantization. The sm_90a CUDA kernel, where built, outranks it (priority 100 vs 50).
"""
from __future__ import annotations

import torch

from ..kernels import kv_lens_for_kernel
from ..kernels.triton import triton_available
from . import head_chunks
from .base import AttentionBackend, AttentionProblem, fake_attention_outputs, run_op


def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                    sm_scale: float, return_lse: bool, qk_quant_gran: str,
                    kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out in q's layout and dtype, lse fp32 (B, Hq, Sq) natural log, or an empty tensor when
    return_lse is False). kv_lens: None, or int32 [B] on q's device: batch entry b attends to its first
    kv_lens[b] keys (read by the kernel: no host sync); kv_lens[b] == 0 gives zero rows and LSE -inf. Large calls
    run over chunks of key/value heads (head_chunks.py)."""
    from ..kernels.triton.int8fp8 import int8fp8_attention
    kv_lens = kv_lens_for_kernel(kv_lens, q.shape[0], q.device)

    def call(q, k, v, out=None):
        return int8fp8_attention(q, k, v, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
                                 return_lse=return_lse, qk_quant_gran=qk_quant_gran, kv_lens=kv_lens, out=out)
    nhd = layout == "NHD"
    step = head_chunks.kv_heads_per_chunk(q, k, nhd)
    out, lse = call(q, k, v) if step is None else \
        head_chunks.forward_in_head_chunks(call, q, k, v, nhd, return_lse, step)
    if lse is None:
        lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return out, lse


@torch.library.custom_op("sage3::triton_int8fp8_attn", mutates_args=(), device_types="cuda")
def triton_int8fp8_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                        sm_scale: float, return_lse: bool, qk_quant_gran: str,
                        kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_triton_forward` as a custom op (torch.compile, torch.export and dispatch modes see it as one opaque op)."""
    return _triton_forward(q, k, v, layout, is_causal, sm_scale, return_lse, qk_quant_gran, kv_lens)


@triton_int8fp8_attn.register_fake
def _(q, k, v, layout, is_causal, sm_scale, return_lse, qk_quant_gran, kv_lens=None):
    return fake_attention_outputs(q, layout, return_lse)


class TritonInt8Fp8Backend(AttentionBackend):
    name = "triton_int8_fp8"
    family = "int8_fp8"
    priority = 50
    description = ("Triton INT8 QK / FP8 E4M3 PV, SageAttention2++ numerics with fused quantization (K smoothing, "
                   "per-thread INT8 Q/K, per-channel FP8 V); on sm_80/86 (no FP8 dot) P·V in FP16 with the same "
                   "INT8 Q/K")
    verified = ("run on H200 against the torch reference (row_sum='p_tilde'): tests/gpu/test_triton_int8fp8.py; "
                "the sm_80/86 FP16 P·V path only exercised by forcing it on an sm_90 GPU")
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    supports_kv_lens = True
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

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None, kv_lens=None):
        if attn_mask is not None:
            raise ValueError("triton_int8_fp8 does not take attn_mask (per-sample key lengths: kv_lens)")
        out, lse = run_op(torch.ops.sage3.triton_int8fp8_attn, _triton_forward, q, k,
                          v, layout, bool(is_causal), float(sm_scale), bool(return_lse), "per_thread", kv_lens)
        return (out, lse) if return_lse else out


BACKENDS = [TritonInt8Fp8Backend]
