"""One attention call run over chunks of key/value heads, to bound the memory of its quantized copies.

The INT8/FP8 paths (the sm90 kernel, the Triton kernels) quantize q, k and v into 1-byte copies (1.5x the bf16
output) before their attention launch, so one call's peak extra memory is about 2.5x SDPA's (whose extra memory is
its output). Above WORKSPACE_CHUNK_BYTES of copies, a call runs over chunks of CHUNK_KV_HEADS key/value heads (with
their query heads), each chunk writing its slice of one output, so the copies exist for one chunk at a time. Every
quantization statistic is per head, so the output is bit-identical to the one-piece call's.

Measured on an H100 for the sm90 kernel (bench/sm90_head_chunks.py, docs/results): chunks of 4 heads cost ~1% at
HunyuanVideo-720p and Wan 2.1 14B 720p and cut the call's extra memory from 2.5x SDPA's to 1.15-1.25x; chunks of
1-2 heads cost 4-8% (a launch of few CTAs leaves a partial last wave).
"""
from __future__ import annotations

from typing import Callable

import torch

WORKSPACE_CHUNK_BYTES = 256 << 20
CHUNK_KV_HEADS = 4


def kv_heads_per_chunk(q: torch.Tensor, k: torch.Tensor, nhd: bool) -> int | None:
    """Key/value heads per chunk for this call, or None to run it in one piece (small copies, few heads)."""
    b, d = q.shape[0], q.shape[3]
    (hq, sq), (hkv, skv) = ((q.shape[2], q.shape[1]), (k.shape[2], k.shape[1])) if nhd else \
        ((q.shape[1], q.shape[2]), (k.shape[1], k.shape[2]))
    copies = b * d * (hq * sq + 2 * hkv * skv)
    if copies <= WORKSPACE_CHUNK_BYTES or hkv <= CHUNK_KV_HEADS:
        return None
    return CHUNK_KV_HEADS


def forward_in_head_chunks(call: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nhd: bool,
                           return_lse: bool, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse or None) of one attention call run `step` key/value heads at a time. `call(q, k, v, out)` runs one
    chunk (views of the caller's tensors, `out` the chunk's slice of the output, written in place) and returns
    (out, lse of the chunk or None)."""
    head_dim = 2 if nhd else 1
    hkv, group = k.shape[head_dim], q.shape[head_dim] // k.shape[head_dim]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((q.shape[0], q.shape[head_dim], q.shape[3 - head_dim]), dtype=torch.float32) \
        if return_lse else None
    pick = (lambda t, s: t[:, :, s]) if nhd else (lambda t, s: t[:, s])
    for h0 in range(0, hkv, step):
        kv_heads, q_heads = slice(h0, min(h0 + step, hkv)), slice(h0 * group, min(h0 + step, hkv) * group)
        _, chunk_lse = call(pick(q, q_heads), pick(k, kv_heads), pick(v, kv_heads), pick(out, q_heads))
        if return_lse:
            lse[:, q_heads] = chunk_lse
    return out, lse
