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


_plans: dict = {}  # call signature -> key/value heads per chunk (None: one piece), for signatures that passed the checks


def _plan_once(q, k, v, layout, is_causal, return_lse) -> int | None:
    """`check_call` and `kv_heads_per_chunk` once per call signature; a repeated call is one dictionary lookup."""
    key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, layout, is_causal,
           return_lse)
    try:
        return _plans[key]
    except KeyError:
        pass
    CudaSm90Int8Fp8Backend().check_call(describe_problem(q, k, v, layout, is_causal, return_lse, None))
    if len(_plans) >= 4096:  # dynamic resolutions: bounded like the dispatcher's cache
        _plans.clear()
    step = _plans[key] = kv_heads_per_chunk(q, k, layout == "NHD")
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
    return _forward_in_head_chunks(ext, q, k, v, nhd, is_causal, sm_scale, return_lse, kv_lens, step)


def _ext_call(ext, q, k, v, nhd, is_causal, sm_scale, return_lse, kv_lens, out=None):
    res = ext.forward(q, k, v, nhd, is_causal, float(sm_scale), return_lse, kv_lens, out=out)
    if isinstance(res, str):  # the extension reports C++ errors as a message (see csrc/sm90/binding.cpp)
        raise RuntimeError(f"{SM90_EXT.name}: {res}")
    return res


# One call quantizes q, k and v into 1-byte copies (1.5x the bf16 output) before its attention launch. Above this
# workspace the call runs over chunks of CHUNK_KV_HEADS key/value heads (with their query heads), each writing its
# slice of one output, so the copies exist for one chunk at a time. Every quantization statistic is per head, so
# the output is bit-identical to the one-launch call. Measured on an H100 (bench/sm90_head_chunks.py,
# docs/results): chunks of 4 heads cost ~1% at HunyuanVideo-720p and Wan 2.1 14B 720p and cut the call's extra
# memory from 2.5x SDPA's to 1.15-1.25x; chunks of 1-2 heads cost 4-8% (too few CTAs per launch).
WORKSPACE_CHUNK_BYTES = 256 << 20
CHUNK_KV_HEADS = 4


def kv_heads_per_chunk(q: torch.Tensor, k: torch.Tensor, nhd: bool) -> int | None:
    """Key/value heads per chunk for this call, or None to run it in one piece (small workspace, few heads)."""
    b, d = q.shape[0], q.shape[3]
    (hq, sq), (hkv, skv) = ((q.shape[2], q.shape[1]), (k.shape[2], k.shape[1])) if nhd else \
        ((q.shape[1], q.shape[2]), (k.shape[1], k.shape[2]))
    workspace = b * d * (hq * sq + 2 * hkv * skv)
    if workspace <= WORKSPACE_CHUNK_BYTES or hkv <= CHUNK_KV_HEADS:
        return None
    return CHUNK_KV_HEADS


def _forward_in_head_chunks(ext, q, k, v, nhd, is_causal, sm_scale, return_lse, kv_lens, step):
    head_dim = 2 if nhd else 1
    hkv, group = k.shape[head_dim], q.shape[head_dim] // k.shape[head_dim]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((q.shape[0], q.shape[head_dim], q.shape[3 - head_dim]), dtype=torch.float32) \
        if return_lse else None
    pick = (lambda t, s: t[:, :, s]) if nhd else (lambda t, s: t[:, s])
    for h0 in range(0, hkv, step):
        kv_heads, q_heads = slice(h0, min(h0 + step, hkv)), slice(h0 * group, min(h0 + step, hkv) * group)
        _, chunk_lse = _ext_call(ext, pick(q, q_heads), pick(k, kv_heads), pick(v, kv_heads), nhd, is_causal,
                                 sm_scale, return_lse, kv_lens, out=pick(out, q_heads))
        if return_lse:
            lse[:, q_heads] = chunk_lse
    return out, lse


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
