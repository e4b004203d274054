"""Hopper (sm_90a) CUDA backend: INT8 QK^T / FP8 PV attention with SageAttention2++ numerics.

The kernels live in the compiled extension `sage3_diffusers._C_sm90` (csrc/sm90). One call is three
launches: K-mean / V-amax partials, fused Q/K/V quantization, the warp-specialized wgmma attention.
It is exposed as the torch.library custom op `torch.ops.sage3.sm90_int8fp8_attn` (with a fake
implementation, so torch.compile and CUDA graphs see through it) and as the dispatcher backend
`cuda_sm90_int8_fp8`.
"""
from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, AttentionProblem

_EXT_NAME = "sage3_diffusers._C_sm90"
_ext = None
_ext_error: str | None = None


def _load_ext():
    """The compiled extension, or None (the reason is kept in _ext_error)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module(_EXT_NAME)
        except ImportError as e:  # not built, or built against another torch
            _ext_error = f"{type(e).__name__}: {e}"
    return _ext


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """The kernels read channels contiguously with 16-byte rows; anything else is copied once."""
    ok = (x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and
          all(x.stride(d) % 8 == 0 or x.size(d) == 1 for d in range(3)))
    return x if ok else x.contiguous()


@torch.library.custom_op("sage3::sm90_int8fp8_attn", mutates_args=())
def sm90_int8fp8_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                      sm_scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's layout and dtype, contiguous) and lse [B, Hq, Sq] fp32 (an empty tensor unless return_lse)."""
    ext = _load_ext()
    if ext is None:
        raise RuntimeError(f"{_EXT_NAME} is not built ({_ext_error})")
    if layout not in ("HND", "NHD"):
        raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}")
    out, lse = ext.forward(_kernel_ready(q), _kernel_ready(k), _kernel_ready(v), layout == "NHD", is_causal,
                           float(sm_scale), return_lse)
    if not return_lse:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@sm90_int8fp8_attn.register_fake
def _(q, k, v, layout, is_causal, sm_scale, return_lse):
    b, h, s = (q.shape[0], q.shape[2], q.shape[1]) if layout == "NHD" else q.shape[:3]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((b, h, s) if return_lse else (0,), dtype=torch.float32)
    return out, lse


class CudaSm90Int8Fp8Backend(AttentionBackend):
    name = "cuda_sm90_int8_fp8"
    family = "int8_fp8"
    priority = 100
    description = "Hopper sm_90a CUDA kernel: INT8 QK^T + FP8 PV wgmma, TMA, warp-specialized (SageAttention2++)"
    verified = "run on H100 against the SageAttention2++ reference (tests/gpu/test_cuda_sm90.py)"
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    supports_causal = True
    supports_lse = True
    supports_mask = False
    supports_gqa = True
    supported_capabilities = ((9, 0),)

    def unavailable_reasons(self) -> list[str]:
        if _load_ext() is None:
            return [f"extension _C_sm90 not built ({_ext_error}); build with "
                    "SAGE3_EXTENSIONS=sm90 TORCH_CUDA_ARCH_LIST=9.0a python setup.py build_ext --inplace"]
        if not torch.cuda.is_available():
            return ["no CUDA device available"]
        return []

    def input_reasons(self, p: AttentionProblem) -> list[str]:
        reasons = super().input_reasons(p)
        if p.device_type != "cuda":
            reasons.append(f"tensors are on {p.device_type}, needs a CUDA device")
        elif p.capability not in self.supported_capabilities:
            cap = "unknown" if p.capability is None else f"sm_{p.capability[0]}{p.capability[1]}"
            reasons.append(f"needs sm_90 (Hopper), this GPU is {cap}")
        if p.seq_q < 1 or p.seq_kv < 1:
            reasons.append(f"empty sequence (seq_q={p.seq_q}, seq_kv={p.seq_kv})")
        return reasons

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None):
        if attn_mask is not None:
            raise ValueError(f"{self.name} does not take attn_mask")
        out, lse = torch.ops.sage3.sm90_int8fp8_attn(q, k, v, layout, bool(is_causal), float(sm_scale),
                                                     bool(return_lse))
        return (out, lse) if return_lse else out


BACKENDS = [CudaSm90Int8Fp8Backend]
