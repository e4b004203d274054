"""Host side of the Triton SageAttention2++ kernels: buffers, launches, and the small cached autotuner.

`int8fp8_attention(q, k, v, ...)` is the whole call (quantize K/V, quantize Q, attention).
`quantize_kv` + `attention_quantized` split it (for timing the attention kernel alone); `quantize_q` is the Q
quantization the attention kernel reads. Imports triton: import this module lazily.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from ...numerics.attention_common import LOG2E
from ...numerics.int8 import QK_QUANT_GRANULARITIES
from .int8fp8_attn import _int8fp8_attn_kernel
from .int8fp8_quant import _kv_finalize_kernel, _kv_quant_kernel, _kv_stats_kernel, _q_quant_kernel

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton < 3.4: pointer loads only
    TensorDescriptor = None

KV_TILE = 128          # BN of the attention kernel: the reference's kv_tile
_STATS_PROGRAMS = 2048  # aim for this many stats programs (a constant, so the K mean does not depend on the GPU)
_STATS_MAX_CHUNKS = 64
_STATS_BLOCK_S = 32
_QUANT_SUB = 32  # rows per chunk in the K/V quantization kernel (register budget: no spills at D=128)
_QUANT_UNROLL = 1  # chunk-loop unroll factor of that kernel
_QUANT_WARPS = 4


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters of the attention kernel (its numerics do not depend on them)."""

    block_m: int
    num_warps: int
    num_stages: int

    def __str__(self):
        return f"BM{self.block_m}_w{self.num_warps}_s{self.num_stages}"


# Small per-head-dim candidate sets (the first call per shape class compiles and times each once; results are
# cached per key). BM=64 / 4 warps was fastest on every shape measured; BM=128 / 8 warps 25-45% slower.
_CANDIDATES = {
    64: (AttnConfig(64, 4, 3), AttnConfig(64, 4, 4)),
    128: (AttnConfig(64, 4, 3), AttnConfig(64, 4, 2)),
}
_tuned: dict = {}


def has_fp8_dot(device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def has_tma(device) -> bool:
    return TensorDescriptor is not None and torch.cuda.get_device_capability(device) >= (9, 0)


def _bhsd_strides(x: torch.Tensor, layout: str):
    """(batch, head, seq, dim) strides of a 4-D tensor in `layout`."""
    sb, s1, s2, sd = x.stride()
    return (sb, s1, s2, sd) if layout == "HND" else (sb, s2, s1, sd)


def _bhsd_shape(x: torch.Tensor, layout: str):
    b, n1, n2, d = x.shape
    return (b, n1, n2, d) if layout == "HND" else (b, n2, n1, d)


@dataclass
class QuantizedKV:
    k_int8: torch.Tensor   # [B*Hkv*Skv, D] int8 (K - mean)
    k_scale: torch.Tensor  # [B*Hkv*Skv] fp32 per-token copy of its group's scale
    k_mean: torch.Tensor   # [B*Hkv, D] fp32
    v_q: torch.Tensor      # [B*Hkv*D, S_pad] fp8 e4m3 (or fp16), V / δv transposed
    v_scale: torch.Tensor  # [B*Hkv, D] fp32
    batch: int
    heads_kv: int
    seq_kv: int
    seq_pad: int
    head_dim: int
    pv_fp8: bool
    k_block: int = 128
    k_gran: str = "per_thread"

    def k_groups_per_tile(self) -> int:
        """Distinct K scales per key tile in the attention kernel's K-group layout: 4 (per_thread, k_block =
        tile), 1 (per_block, k_block a multiple of the tile), 0 (neither: no K-group fold)."""
        if self.k_gran == "per_thread" and self.k_block == KV_TILE:
            return 4
        if self.k_gran == "per_block" and self.k_block % KV_TILE == 0:
            return 1
        return 0


def _check_gran(qk_quant_gran: str, block: int, what: str):
    if qk_quant_gran not in QK_QUANT_GRANULARITIES:
        raise ValueError(f"unknown qk_quant_gran {qk_quant_gran!r}; allowed: {QK_QUANT_GRANULARITIES}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"{what} must be a power of two >= 16, got {block}")


def quantize_kv(k: torch.Tensor, v: torch.Tensor, *, layout: str = "HND", qk_quant_gran: str = "per_thread",
                k_block: int = 128, smooth_k: bool = True, pv_fp8: bool | None = None) -> QuantizedKV:
    _check_gran(qk_quant_gran, k_block, "k_block")
    b, hkv, skv, d = _bhsd_shape(k, layout)
    dev = k.device
    if pv_fp8 is None:
        pv_fp8 = has_fp8_dot(dev)
    bh = b * hkv
    n_chunks = max(1, min(_STATS_MAX_CHUNKS, triton.cdiv(_STATS_PROGRAMS, bh), triton.cdiv(skv, 2 * _STATS_BLOCK_S)))
    chunk = triton.cdiv(triton.cdiv(skv, n_chunks), _STATS_BLOCK_S) * _STATS_BLOCK_S
    n_chunks = triton.cdiv(skv, chunk)
    seq_pad = triton.cdiv(skv, 16) * 16  # 16-byte rows for the TMA descriptor of V
    f32 = dict(dtype=torch.float32, device=dev)
    ksum = torch.empty((bh, n_chunks, d), **f32)
    vmax = torch.empty((bh, n_chunks, d), **f32)
    k_int8 = torch.empty((bh * skv, d), dtype=torch.int8, device=dev)
    k_scale = torch.empty((bh * skv,), **f32)
    k_mean = torch.empty((bh, d), **f32)
    v_q = torch.empty((bh * d, seq_pad), dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16, device=dev)
    v_scale = torch.empty((bh, d), **f32)
    ks, vs = _bhsd_strides(k, layout), _bhsd_strides(v, layout)
    _kv_stats_kernel[(n_chunks, bh)](k, *ks, v, *vs, ksum, vmax, hkv, skv, chunk, n_chunks, D=d,
                                     BLOCK_S=_STATS_BLOCK_S, num_warps=4)
    _kv_finalize_kernel[(bh,)](ksum, vmax, k_mean, v_scale, skv, n_chunks, D=d, SMOOTH_K=smooth_k,
                               CHUNKS_P2=triton.next_power_of_2(n_chunks), num_warps=4)
    _kv_quant_kernel[(triton.cdiv(skv, k_block), bh, 2)](
        k, *ks, v, *vs, k_int8, k_scale, k_mean, v_q, v_scale, hkv, skv, seq_pad,
        D=d, K_BLOCK=k_block, SUB=min(k_block, _QUANT_SUB), K_PER_THREAD=qk_quant_gran == "per_thread",
        V_FP8=pv_fp8, UNROLL=_QUANT_UNROLL, num_warps=_QUANT_WARPS)
    return QuantizedKV(k_int8, k_scale, k_mean, v_q, v_scale, b, hkv, skv, seq_pad, d, pv_fp8, k_block,
                       qk_quant_gran)


def quantize_q(q: torch.Tensor, *, layout: str = "HND", qk_quant_gran: str = "per_thread", q_block: int = 128,
               block_m: int = 64):
    """The attention kernel's Q quantization, run alone: (int8 [B, H, Sq, D], scale [B, H, Sq] fp32)."""
    _check_gran(qk_quant_gran, q_block, "q_block")
    b, h, sq, d = _bhsd_shape(q, layout)
    qi = torch.empty((b, h, sq, d), dtype=torch.int8, device=q.device)
    qs = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    _q_quant_kernel[(triton.cdiv(sq, block_m), b * h)](q, *_bhsd_strides(q, layout), qi, qs, h, sq, D=d,
                                                         BM=block_m, PER_THREAD=qk_quant_gran == "per_thread",
                                                         Q_BLOCK=q_block, num_warps=4)
    return qi, qs


def _config_ok(cfg: AttnConfig, qk_quant_gran: str, q_block: int) -> bool:
    if qk_quant_gran == "per_block":
        small, big = sorted((cfg.block_m, q_block))
        return big % small == 0
    return cfg.block_m % 16 == 0


def _launch(q, kv: QuantizedKV, out, lse, *, layout, is_causal, sm_scale, return_lse, qk_quant_gran, q_block,
            cfg: AttnConfig, use_tma: bool, q_quant=None, kv_lens=None):
    b, hq, sq, d = _bhsd_shape(q, layout)
    if use_tma:
        k_desc = TensorDescriptor.from_tensor(kv.k_int8, [KV_TILE, d])
        v_desc = TensorDescriptor.from_tensor(kv.v_q, [d, KV_TILE])
    else:
        k_desc = v_desc = None
    if q_quant is None:
        q_quant = quantize_q(q, layout=layout, qk_quant_gran=qk_quant_gran, q_block=q_block)
    qi, qsc = q_quant
    qi = qi.view(b * hq * sq, d)
    qi_desc = TensorDescriptor.from_tensor(qi, [cfg.block_m, d]) if use_tma else None
    grid = (triton.cdiv(sq, cfg.block_m), b * hq)
    _int8fp8_attn_kernel[grid](
        q, *_bhsd_strides(q, layout), qi, qi_desc, qsc,
        kv.k_int8, k_desc, kv.k_scale, kv.v_q, v_desc, kv.v_scale, kv.k_mean,
        out, *_bhsd_strides(out, layout), lse, kv_lens, hq, kv.heads_kv, sq, kv.seq_kv, kv.seq_pad,
        sm_scale * LOG2E, sm_scale,
        D=d, BM=cfg.block_m, BN=KV_TILE, IS_CAUSAL=bool(is_causal), RETURN_LSE=bool(return_lse), PV_FP8=kv.pv_fp8,
        USE_TMA=use_tma, STAGES=cfg.num_stages, KG=kv.k_groups_per_tile(), HAS_KV_LENS=kv_lens is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _time_config(run, reps: int = 3) -> float:
    run()  # compile + warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def pick_config(q, kv, out, lse, *, layout, is_causal, sm_scale, return_lse, qk_quant_gran, q_block,
                use_tma, q_quant=None, kv_lens=None) -> AttnConfig:
    b, hq, sq, d = _bhsd_shape(q, layout)
    cands = [c for c in _CANDIDATES[d] if _config_ok(c, qk_quant_gran, q_block)]
    if not cands:
        raise ValueError(f"no kernel config fits qk_quant_gran={qk_quant_gran!r}, q_block={q_block}")
    key = (q.device.index, torch.cuda.get_device_capability(q.device), d, bool(is_causal), kv.pv_fp8, use_tma,
           kv.k_groups_per_tile(), kv_lens is not None,
           q.dtype, qk_quant_gran, q_block, _bucket(sq), _bucket(kv.seq_kv), _bucket(b * hq))
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    if len(cands) == 1 or torch.cuda.is_current_stream_capturing():
        return cands[0]  # no timing inside graph capture; not cached, so a later eager call still tunes
    times = {}
    for c in cands:
        times[c] = _time_config(lambda: _launch(q, kv, out, lse, layout=layout, is_causal=is_causal,
                                                sm_scale=sm_scale, return_lse=return_lse,
                                                qk_quant_gran=qk_quant_gran, q_block=q_block, cfg=c,
                                                use_tma=use_tma, q_quant=q_quant, kv_lens=kv_lens))
    cfg = _tuned[key] = min(times, key=times.get)
    return cfg


def attention_quantized(q: torch.Tensor, kv: QuantizedKV, *, layout: str = "HND", is_causal: bool = False,
                        sm_scale: float | None = None, return_lse: bool = False, qk_quant_gran: str = "per_thread",
                        q_block: int = 128, use_tma: bool | None = None, config: AttnConfig | None = None,
                        out: torch.Tensor | None = None, lse: torch.Tensor | None = None, q_quant=None,
                        kv_lens: torch.Tensor | None = None):
    """Attention on quantized K/V. Returns (out in q's layout, lse or None). Q is quantized here unless
    `q_quant` = `quantize_q(q, ...)` is given. `out` / `lse` may be given (tests poison them to check every
    element is written). `kv_lens`: int32 [B] on q's device, or None: batch entry b attends to keys
    [0, kv_lens[b]) (clamped to [0, Skv]; 0 gives zero rows and LSE -inf)."""
    _check_gran(qk_quant_gran, q_block, "q_block")
    b, hq, sq, d = _bhsd_shape(q, layout)
    if d not in (64, 128):
        raise ValueError(f"head_dim {d} not supported by the Triton INT8/FP8 kernel (64 or 128)")
    if hq % kv.heads_kv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({kv.heads_kv})")
    if use_tma is None:
        use_tma = has_tma(q.device)
    if sm_scale is None:
        sm_scale = d ** -0.5
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype}")
    if lse is None or not return_lse:
        lse = torch.empty((b, hq, sq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    elif lse.shape != (b, hq, sq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 tensor of shape {(b, hq, sq)}")
    if config is None:
        config = pick_config(q, kv, out, lse, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
                             return_lse=return_lse, qk_quant_gran=qk_quant_gran, q_block=q_block, use_tma=use_tma,
                             q_quant=q_quant, kv_lens=kv_lens)
    elif not _config_ok(config, qk_quant_gran, q_block):
        raise ValueError(f"config {config} does not fit q_block={q_block}")
    _launch(q, kv, out, lse, layout=layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse,
            qk_quant_gran=qk_quant_gran, q_block=q_block, cfg=config, use_tma=use_tma, q_quant=q_quant,
            kv_lens=kv_lens)
    return out, (lse if return_lse else None)


def int8fp8_attention(q, k, v, *, layout: str = "HND", is_causal: bool = False, sm_scale: float | None = None,
                      return_lse: bool = False, qk_quant_gran: str = "per_thread", q_block: int = 128,
                      k_block: int = 128, smooth_k: bool = True, pv_fp8: bool | None = None,
                      use_tma: bool | None = None, config: AttnConfig | None = None,
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      kv_lens: torch.Tensor | None = None):
    """SageAttention2++ attention. q/k/v in `layout` ("HND" (B,H,S,D) or "NHD" (B,S,H,D)), fp16/bf16, any
    strides (read in place, never modified). Returns (out, lse or None); out is a new tensor in q's layout
    and dtype, lse fp32 (B, Hq, Sq) natural log. `kv_lens` (int32 [B] on q's device): per-sample key lengths
    (right padding); the K mean and V scales still include the padding keys (exact for the mean under
    softmax, coarser scales otherwise), so padding must be finite."""
    kv = quantize_kv(k, v, layout=layout, qk_quant_gran=qk_quant_gran, k_block=k_block, smooth_k=smooth_k,
                     pv_fp8=pv_fp8)
    return attention_quantized(q, kv, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
                               return_lse=return_lse, qk_quant_gran=qk_quant_gran, q_block=q_block,
                               use_tma=use_tma, config=config, out=out, lse=lse, kv_lens=kv_lens)
