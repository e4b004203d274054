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
from . import head_chunks
from .base import (CompiledExtension, CudaKernelBackend, build_hint, describe_problem, fake_attention_outputs,
                   run_op)

SM90_EXT = CompiledExtension("sage3_diffusers._C_sm90")


_plans: dict = {}  # call signature -> key/value heads per chunk (None: one piece), for signatures that passed the checks


def _plan_once(q, k, v, layout, is_causal, return_lse) -> int | None:
    """`check_call` and the head-chunk plan (head_chunks.py) once per call signature; a repeated call is one
    dictionary lookup."""
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, layout, is_causal,
           return_lse)
    try:
        return _plans[key]
    except KeyError:
        pass
    CudaSm90Int8Fp8Backend().check_call(describe_problem(q, k, v, layout, is_causal, return_lse, None))
    if len(_plans) >= 4096:  # dynamic resolutions: bounded like the dispatcher's cache
        _plans.clear()
    step = _plans[key] = head_chunks.kv_heads_per_chunk(q, k, layout == "NHD")
    return step


def _sm90_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool, sm_scale: float,
                  return_lse: bool, kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out (q's layout and dtype, contiguous) and lse [B, Hq, Sq] fp32 (None unless return_lse).
    kv_lens: None, or int32 [B] on q's device: batch entry b attends to its first kv_lens[b] keys (right padding,
    read by the kernel: no host sync); kv_lens[b] == 0 gives zero rows and LSE -inf. The quantization still sees
    the padding keys (K mean, V scales), so they must be finite."""
    ext = SM90_EXT.require()
    step = _plan_once(q, k, v, layout, is_causal, return_lse)
    if kv_lens is not None:
        kv_lens = kv_lens_for_kernel(kv_lens, q.shape[0], q.device)
    nhd = layout == "NHD"
    if step is None:
        # The extension copies inputs the kernels cannot read in place (channel stride != 1, rows not 16-byte
        # aligned, a misaligned base such as ring attention's chunk of an all-gathered buffer).
        return _ext_call(ext, q, k, v, nhd, is_causal, sm_scale, return_lse, kv_lens)
    return head_chunks.forward_in_head_chunks(
        lambda qc, kc, vc, oc: _ext_call(ext, qc, kc, vc, nhd, is_causal, sm_scale, return_lse, kv_lens, out=oc),
        q, k, v, nhd, return_lse, step)


def _ext_call(ext, q, k, v, nhd, is_causal, sm_scale, return_lse, kv_lens, out=None):
    res = ext.forward(q, k, v, nhd, is_causal, float(sm_scale), return_lse, kv_lens, out=out)
    if isinstance(res, str):  # the extension reports C++ errors as a message (see csrc/sm90/binding.cpp)
        raise RuntimeError(f"{SM90_EXT.name}: {res}")
    return res


@torch.library.custom_op("sage3::sm90_int8fp8_attn", mutates_args=())
def sm90_int8fp8_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool,
                      sm_scale: float, return_lse: bool,
                      kv_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_sm90_forward` as a custom op (torch.compile, torch.export and dispatch modes see it as one opaque op); its
    lse is an empty tensor unless return_lse."""
    out, lse = _sm90_forward(q, k, v, layout, is_causal, sm_scale, return_lse, kv_lens)
    return out, (lse if lse is not None else q.new_empty((0,), dtype=torch.float32))


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
        out, lse = run_op(torch.ops.sage3.sm90_int8fp8_attn, _sm90_forward, q, k, v,
                          layout, bool(is_causal), float(sm_scale), bool(return_lse), kv_lens)
        return (out, lse) if return_lse else out


BACKENDS = [CudaSm90Int8Fp8Backend]
