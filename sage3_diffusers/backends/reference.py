"""The reference numerics run as backends: slow, any device, for accuracy studies and CPU tests.
Never chosen by kernel="auto"; used when named, or for a family when fallback="emulate".

They run through the custom op `torch.ops.sage3.reference_attn` (with a fake implementation), so a
torch.compile'd model or a `torch.export`ed program holds one opaque call per attention, shape-polymorphic,
instead of the reference's Python tile loops traced into the graph.

Per-sample key lengths (`kv_lens`) follow the backend contract (`AttentionBackend.forward`): sample b is the
reference on its first kv_lens[b] keys, so padded keys enter no quantization statistic (K mean, key groups,
key tiles' second-level scales, V channel scales). Samples with equal lengths share one call. Reading the lengths
is a host sync: acceptable for an emulation, never done by the kernels.
"""
from __future__ import annotations

import torch

from ..numerics import sage2pp_attention_reference, sage3_attention_reference
from .base import AttentionBackend, fake_attention_outputs, from_hnd, to_hnd

_REFERENCES = {"fp4": sage3_attention_reference, "int8_fp8": sage2pp_attention_reference}


def _reference_hnd(q, k, v, kv_lens, fn, is_causal, sm_scale, return_lse):
    if kv_lens is None:
        return fn(q, k, v, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse)
    seq_kv = k.shape[2]
    lens = kv_lens.tolist()
    bad = [n for n in lens if not 1 <= n <= seq_kv]
    if bad:
        raise ValueError(f"kv_lens values must be in [1, {seq_kv}] (the key sequence length), got {bad}")
    outs, lses, b = [], [], 0
    while b < len(lens):
        e = b + 1
        while e < len(lens) and lens[e] == lens[b]:
            e += 1
        n = lens[b]
        res = fn(q[b:e], k[b:e, :, :n], v[b:e, :, :n], is_causal=is_causal, sm_scale=sm_scale,
                 return_lse=return_lse)
        outs.append(res[0] if return_lse else res)
        if return_lse:
            lses.append(res[1])
        b = e
    out = torch.cat(outs)
    return (out, torch.cat(lses)) if return_lse else out


@torch.library.custom_op("sage3::reference_attn", mutates_args=())
def reference_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None, family: str,
                   layout: str, is_causal: bool, sm_scale: float, return_lse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's layout and dtype, contiguous) and lse [B, Hq, Sq] fp32 (an empty tensor unless return_lse)."""
    # Contiguous copies: the fp32 reductions then see one memory order whatever the caller's strides, so the
    # quantization (rounding boundaries amplify a last-bit difference to an e4m3/int8 step) is layout-invariant.
    qh, kh, vh = (to_hnd(t, layout).contiguous() for t in (q, k, v))
    res = _reference_hnd(qh, kh, vh, kv_lens, _REFERENCES[family], is_causal, sm_scale, return_lse)
    out, lse = res if return_lse else (res, q.new_empty((0,), dtype=torch.float32))
    return from_hnd(out, layout).contiguous(), lse


@reference_attn.register_fake
def _(q, k, v, kv_lens, family, layout, is_causal, sm_scale, return_lse):
    return fake_attention_outputs(q, layout, return_lse)


class _ReferenceBackend(AttentionBackend):
    priority = -10
    auto_eligible = False
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dims = None
    supports_kv_lens = True
    verified = "is the specification (pure torch); unit-tested against hand-computed values and fp64 SDPA"

    def forward(self, q, k, v, *, layout, is_causal, sm_scale, return_lse, attn_mask=None, kv_lens=None):
        if attn_mask is not None:
            raise ValueError(f"{self.name} does not take attn_mask (use kv_lens for right-padding key masks)")
        out, lse = torch.ops.sage3.reference_attn(q, k, v, kv_lens, self.family, layout, bool(is_causal),
                                                  float(sm_scale), bool(return_lse))
        return (out, lse) if return_lse else out


class ReferenceFp4Backend(_ReferenceBackend):
    name = "reference_fp4"
    family = "fp4"
    description = "SageAttention3 NVFP4 numerics emulated in torch (slow)"


class ReferenceInt8Fp8Backend(_ReferenceBackend):
    name = "reference_int8_fp8"
    family = "int8_fp8"
    description = "SageAttention2++ INT8-QK/FP8-PV numerics emulated in torch (slow)"


BACKENDS = [ReferenceFp4Backend, ReferenceInt8Fp8Backend]
