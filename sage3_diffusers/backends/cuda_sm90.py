"""Hopper (sm_90a) CUDA backend: INT8 QK^T / FP8 PV attention with SageAttention2++ numerics.

The kernels live in the compiled extension `sage3_diffusers._C_sm90` (csrc/sm90). One call is three
launches: K-mean / V-amax partials, fused Q/K/V quantization, the warp-specialized wgmma attention.
It is exposed as the torch.library custom op `torch.ops.sage3.sm90_int8fp8_attn` (with a fake
implementation, so torch.compile and CUDA graphs see through it) and as the dispatcher backend
`cuda_sm90_int8_fp8`, which calls the op's implementation directly in eager calls (`through_custom_op`).
"""
from __future__ import annotations

import torch

from ..kernels import kv_lens_for_kernel
from .base import (CompiledExtension, CudaKernelBackend, build_hint, describe_problem, fake_attention_outputs,
                   run_op)

SM90_EXT = CompiledExtension("sage3_diffusers._C_sm90")


_validated: set = set()  # call signatures that passed `check_call` (a repeated call skips the Python checks)


def _check_once(q, k, v, layout, is_causal, return_lse) -> None:
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, layout, is_causal,
           return_lse)
    if key not in _validated:
        CudaSm90Int8Fp8Backend().check_call(describe_problem(q, k, v, layout, is_causal, return_lse, None))
        if len(_validated) >= 4096:  # dynamic resolutions: bounded like the dispatcher's cache
            _validated.clear()
        _validated.add(key)


def _sm90_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool, sm_scale: float,
                  return_lse: bool, kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's layout and dtype, contiguous) and lse [B, Hq, Sq] fp32 (an empty tensor unless return_lse).
    kv_lens: None, or int32 [B] on q's device: batch entry b attends to its first kv_lens[b] keys (right padding,
    read by the kernel: no host sync); kv_lens[b] == 0 gives zero rows and LSE -inf. The quantization still sees
    the padding keys (K mean, V scales), so they must be finite."""
    ext = SM90_EXT.require()
    _check_once(q, k, v, layout, is_causal, return_lse)
    if kv_lens is not None:
        kv_lens = kv_lens_for_kernel(kv_lens, q.shape[0], q.device)
    # The extension copies inputs the kernels cannot read in place (channel stride != 1, rows not 16-byte
    # aligned, a misaligned base such as ring attention's chunk of an all-gathered buffer).
    res = ext.forward(q, k, v, layout == "NHD", is_causal, float(sm_scale), return_lse, kv_lens)
    if isinstance(res, str):  # the extension reports C++ errors as a message (see csrc/sm90/binding.cpp)
        raise RuntimeError(f"{SM90_EXT.name}: {res}")
    out, lse = res
    if not return_lse:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("sage3::sm90_int8fp8_attn", mutates_args=())
def sm90_int8fp8_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                      sm_scale: float, return_lse: bool,
                      kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sm90_forward` as a custom op (torch.compile, torch.export and dispatch modes see it as one opaque op)."""
    return _sm90_forward(q, k, v, layout, is_causal, sm_scale, return_lse, kv_lens)


@sm90_int8fp8_attn.register_fake
def _(q, k, v, layout, is_causal, sm_scale, return_lse, kv_lens=None):
    return fake_attention_outputs(q, layout, return_lse)


class CudaSm90Int8Fp8Backend(CudaKernelBackend):
    name = "cuda_sm90_int8_fp8"
    family = "int8_fp8"
    priority = 100
    description = "Hopper sm_90a CUDA kernel: INT8 QK^T + FP8 PV wgmma, TMA, warp-specialized (SageAttention2++)"
    verified = ("run on H100 and H200 against the SageAttention2++ reference (row_sum='quantized_p'): "
                "tests/gpu/test_cuda_sm90.py (odd shapes, GQA, causal, NHD, non-contiguous, 128k tokens, per-sample "
                "key lengths, quantizer bit-exactness) and compute-sanitizer memcheck")
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    supports_causal = True
    supports_lse = True
    supports_mask = False
    supports_gqa = True
    supports_kv_lens = True
    cuda_capabilities = ((9, 0),)

    def unavailable_reasons(self) -> list[str]:
        if SM90_EXT.module() is None:
            return [f"extension _C_sm90 not built ({SM90_EXT.error}); {build_hint('sm90', '9.0a')}"]
        if not torch.cuda.is_available():
            return ["no CUDA device available"]
        return []

    def _capability_reason(self, cap: str) -> str:
        return f"needs sm_90 (Hopper), this GPU is {cap}"

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None, kv_lens=None):
        if attn_mask is not None:
            raise ValueError(f"{self.name} does not take attn_mask (per-sample key lengths: kv_lens)")
        out, lse = run_op("sage3::sm90_int8fp8_attn", torch.ops.sage3.sm90_int8fp8_attn, _sm90_forward, q, k, v,
                          layout, bool(is_causal), float(sm_scale), bool(return_lse), kv_lens)
        return (out, lse) if return_lse else out


BACKENDS = [CudaSm90Int8Fp8Backend]
