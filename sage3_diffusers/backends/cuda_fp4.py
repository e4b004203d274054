"""SageAttention3 NVFP4 CUDA backends (extension `sage3_diffusers._C_fp4`, csrc/fp4).

One kernel source, two device images:
- sm_120a / sm_121a (RTX 5090 / RTX PRO 6000 class): the block-scaled FP4 tensor-core MMA
  (`mma.sync ... kind::mxf4nvf4.block_scale.scale_vec::4X ... ue4m3`). Compiled and its SASS checked
  (OMMA.SF.16864...UE4M3.4X); NOT yet run on Blackwell hardware.
- sm_90a, built only with SAGE3_FP4_EMULATED=1: the same kernel with that MMA emulated in software. It exists
  to verify the kernel's numerics on Hopper against the torch specification; it is slow.

Per call: the smoothing means and ΔS = q̄_b·K'ᵀ come from the specification's own torch code (so the quantized
tensors are bit-identical to `sage3_quantize`), then two fused CUDA quantization launches (Q'/K' rows, V per
channel) and the attention kernel, once per chunk of query tiles (ΔS is [B, Hq, Sq/128, Skv]); the LSE gets its
smoothing term back here. This is torch arithmetic around the kernels, so it lives in this module, not in the
binding (docs/architecture.md, "Compiled kernels: one contract"). Exposed as the custom op `torch.ops.sage3.fp4_attn` (with a fake
implementation for torch.compile) and as the backends `cuda_sm120_fp4` and `cuda_fp4_emulated`.
"""
from __future__ import annotations

import torch

from ..numerics.attention_common import LN2, expand_kv_heads
from ..numerics.sage3_reference import SAGE3_Q_BLOCK, block_means
from .base import CompiledExtension, CudaKernelBackend, build_hint, describe_problem, fake_attention_outputs, to_hnd

FP4_EXT = CompiledExtension("sage3_diffusers._C_fp4")
_NATIVE_CAPS = ((12, 0), (12, 1))


def _build_hint_native() -> str:
    return build_hint("fp4", "12.0a")


def _build_hint_emulated() -> str:
    return build_hint("fp4", "9.0a", "SAGE3_FP4_EMULATED=1 ")


def _checked(result):
    """The extension's entry points return their result, or an error message str (csrc/common/binding_errors.h)."""
    if isinstance(result, str):
        raise RuntimeError(f"{FP4_EXT.name}: {result}")
    return result


def build_info() -> dict[str, bool]:
    """Device images compiled into _C_fp4 ({} when it is not built)."""
    ext = FP4_EXT.module()
    return dict(ext.build_info()) if ext is not None else {}


def smoothing_terms(q: torch.Tensor, k: torch.Tensor):
    """(q_mean [B,Hq,nQB,D], k_mean [B,Hkv,1,D], delta_s [B,Hq,nQB,Skv]) exactly as `sage3_quantize` computes
    them (same torch ops, so the kernels' quantized tensors are bit-identical to the specification's)."""
    qf, kf = q.float(), k.float()
    k_mean = kf.mean(dim=-2, keepdim=True)
    ks = kf - k_mean
    q_mean = block_means(qf, SAGE3_Q_BLOCK)
    delta_s = q_mean @ expand_kv_heads(ks, q.shape[1]).transpose(-1, -2)
    return q_mean, k_mean, delta_s


# ΔS = q̄_b·K'ᵀ is [B, Hq, ceil(Sq/128), Skv] fp32 (10.6 GB for one HunyuanVideo-720p call): it is computed and
# consumed a chunk of query tiles at a time, at most this many bytes per chunk.
DELTA_S_CHUNK_BYTES = 512 << 20


def _delta_s(q_mean: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """q_mean [B, Hq, n, D] @ ks [B, Hkv, Skv, D]ᵀ -> [B, Hq, n, Skv] fp32, GQA without copying K'."""
    b, hq, n, d = q_mean.shape
    hkv, skv = ks.shape[1], ks.shape[2]
    if hkv == hq:
        return q_mean @ ks.transpose(-1, -2)
    grouped = q_mean.reshape(b, hkv, (hq // hkv) * n, d)  # query head h = kv head h // G, group member h % G
    return (grouped @ ks.transpose(-1, -2)).view(b, hq, n, skv)


@torch.library.custom_op("sage3::fp4_attn", mutates_args=())
def fp4_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool, sm_scale: float,
             return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SageAttention3 NVFP4 attention. out: q's shape, dtype and layout (contiguous); lse [B, Hq, Sq] fp32,
    natural log (an empty tensor unless return_lse)."""
    ext = FP4_EXT.require()
    p = describe_problem(q, k, v, layout, is_causal, return_lse, None)
    # The op serves both device images: the emulated one on Hopper, the native one on Blackwell.
    (CudaFp4EmulatedBackend() if p.capability == (9, 0) else CudaSm120Fp4Backend()).check_call(p)
    qh, kh, vh = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
    b, hq, sq, _ = qh.shape
    skv = kh.shape[2]
    # The specification's smoothing terms (same torch ops as sage3_quantize, so the quantization is bit-exact).
    k_mean = kh.float().mean(dim=-2, keepdim=True)
    q_mean = block_means(qh.float(), SAGE3_Q_BLOCK)
    quantized = _checked(ext.quantize(qh, kh, vh, q_mean, k_mean))
    ks = kh.float() - k_mean
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in the caller's layout
    lse2 = torch.empty((b, hq, sq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    n_qt = q_mean.shape[2]
    per_tile = max(1, 4 * b * hq * skv)
    chunk = max(1, min(n_qt, DELTA_S_CHUNK_BYTES // per_tile))
    for t0 in range(0, n_qt, chunk):
        t1 = min(n_qt, t0 + chunk)
        _checked(ext.attention(quantized, _delta_s(q_mean[:, :, t0:t1], ks), to_hnd(out, layout), lse2, skv,
                               bool(is_causal), float(sm_scale), t0))
    if not return_lse:
        return out, lse2
    # Natural-log LSE of sm_scale·Q·Kᵀ with the unsmoothed K: the kernel's log2 part plus sm_scale·q·k̄ᵀ.
    k_mean_q = expand_kv_heads(k_mean, hq)
    lse = lse2 * LN2 + sm_scale * (qh.float() @ k_mean_q.transpose(-1, -2)).squeeze(-1)
    return out, lse


@fp4_attn.register_fake
def _(q, k, v, layout, is_causal, sm_scale, return_lse):
    return fake_attention_outputs(q, layout, return_lse)


class _CudaFp4Backend(CudaKernelBackend):
    family = "fp4"
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    supports_causal = True
    supports_lse = True
    supports_mask = False
    supports_gqa = True

    def _image_reasons(self) -> list[str]:
        return []

    def unavailable_reasons(self) -> list[str]:
        if FP4_EXT.module() is None:
            return [f"extension _C_fp4 not built ({FP4_EXT.error})"]
        reasons = self._image_reasons()
        if not torch.cuda.is_available():
            reasons.append("no CUDA device available")
        return reasons

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None, kv_lens=None):
        if attn_mask is not None:
            raise ValueError(f"{self.name} does not take attn_mask")
        if kv_lens is not None:
            raise ValueError(f"{self.name} does not take kv_lens (per-sample key lengths): the NVFP4 kernel has no "
                             "key-length mask; use an int8_fp8 backend or sdpa")
        out, lse = torch.ops.sage3.fp4_attn(q, k, v, layout, bool(is_causal), float(sm_scale), bool(return_lse))
        return (out, lse) if return_lse else out


class CudaSm120Fp4Backend(_CudaFp4Backend):
    name = "cuda_sm120_fp4"
    priority = 100
    description = ("Blackwell sm_120a/121a CUDA kernel: SageAttention3 NVFP4 attention with the block-scaled FP4 "
                   "mma.sync (kind::mxf4nvf4, scale_vec::4X, ue4m3)")
    verified = ("compiled for sm_120a (SASS has OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X, csrc/fp4/check_sass.sh); numerics "
                "verified through the emulated build on Hopper (tests/gpu/test_cuda_fp4.py); "
                "not yet run on Blackwell hardware")
    cuda_capabilities = _NATIVE_CAPS

    def _image_reasons(self) -> list[str]:
        info = build_info()
        if not (info.get("sm_120a") or info.get("sm_121a")):
            only = (" (it holds only the sm_90a emulated MMA build: for numerics tests, not speed)"
                    if info.get("sm_90a_emulated") else "")
            return [f"extension _C_fp4 built without sm_120a/sm_121a{only}; {_build_hint_native()}"]
        return []

    def _capability_reason(self, cap: str) -> str:
        if cap == "sm_90" and build_info().get("sm_90a_emulated"):
            return ("needs an sm_120/121 GPU (Blackwell RTX class), this GPU is sm_90; the sm_90a image of _C_fp4 is "
                    "the emulated MMA build: for numerics tests, not speed (backend cuda_fp4_emulated)")
        return f"needs an sm_120/121 GPU (Blackwell RTX class: hardware FP4 mma.sync), this GPU is {cap}"


class CudaFp4EmulatedBackend(_CudaFp4Backend):
    name = "cuda_fp4_emulated"
    priority = 0
    auto_eligible = False
    description = ("test build: the sm_120a NVFP4 kernel compiled for sm_90a with the FP4 MMA emulated in software "
                   "(emulated MMA build: for numerics tests, not speed)")
    verified = ("run on H100 and H200 against the SageAttention3 reference (tests/gpu/test_cuda_fp4.py): quantized tensors "
                "bit-exact, output cos sim >= 0.9999 on odd shapes")
    cuda_capabilities = ((9, 0),)

    def _image_reasons(self) -> list[str]:
        if not build_info().get("sm_90a_emulated"):
            return [f"extension _C_fp4 built without the emulated sm_90a image ({_build_hint_emulated()})"]
        return []

    def _capability_reason(self, cap: str) -> str:
        return f"the emulated MMA build runs on sm_90 (Hopper) only, this GPU is {cap}"


BACKENDS = [CudaSm120Fp4Backend, CudaFp4EmulatedBackend]

