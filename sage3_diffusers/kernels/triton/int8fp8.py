"""Host side of the Triton SageAttention2++ kernels: launch plans, the workspace, and the small cached autotuner.

`int8fp8_attention(q, k, v, ...)` is the whole call: K/V statistics, one launch that quantizes Q, K and V,
attention. `quantize` + `attention_quantized` split it (for timing the attention kernel alone). Host cost per
call is kept to a lookup: everything derived from a call signature (grids, strides, constexprs, the workspace
layout, device facts, the tuned config) is computed on its first call and cached. Imports triton: import this
module lazily.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton

from ...numerics.attention_common import LOG2E
from ...numerics.int8 import QK_QUANT_GRANULARITIES
from .int8fp8_attn import _int8fp8_attn_kernel
from .int8fp8_quant import _kv_stats_kernel, _qkv_quant_kernel
from .launch import Address, KernelLaunch, aligned, current_stream, direct_state

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
_Q_QUANT_BM = 64  # Q rows per program of the quantization launch (any q_block works with it)
_MAX_PLANS = 1024  # cached call signatures per cache; a cache that outgrows it starts over


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


_WS_ALIGN = 256  # byte alignment of each buffer carved from the workspace (TMA needs 16, vector loads 16)


class _QuantPlan:
    """What one call signature (shapes, strides, dtypes, device, options) of the quantization needs, computed
    once: the two launches' grids, arguments and constexprs, and the workspace layout that holds every
    intermediate (one allocation per call, carved into views with one split)."""

    def __init__(self, q, k, v, layout, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8):
        if layout not in ("HND", "NHD"):
            raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}")
        _check_gran(qk_quant_gran, k_block, "k_block")
        _check_gran(qk_quant_gran, q_block, "q_block")
        b, hq, sq, d = _bhsd_shape(q, layout)
        bk, hkv, skv, dk = _bhsd_shape(k, layout)
        if _bhsd_shape(v, layout) != (bk, hkv, skv, dk) or (bk, dk) != (b, d):
            raise ValueError(f"k and v must have shape (B, Hkv, Skv, {d}) in layout {layout} with q's batch {b}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if d not in (64, 128):
            raise ValueError(f"head_dim {d} not supported by the Triton INT8/FP8 kernel (64 or 128)")
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        dev = q.device
        if pv_fp8 is None:
            pv_fp8 = has_fp8_dot(dev)
        self.device, self.pv_fp8 = dev, pv_fp8
        self.shape_q, self.shape_kv = (b, hq, sq, d), (b, hkv, skv, d)
        self.k_block, self.k_gran = k_block, qk_quant_gran
        bh = b * hkv
        n_chunks = max(1, min(_STATS_MAX_CHUNKS, triton.cdiv(_STATS_PROGRAMS, bh),
                              triton.cdiv(skv, 2 * _STATS_BLOCK_S)))
        chunk = triton.cdiv(triton.cdiv(skv, n_chunks), _STATS_BLOCK_S) * _STATS_BLOCK_S
        n_chunks = triton.cdiv(skv, chunk)
        self.seq_pad = seq_pad = triton.cdiv(skv, 16) * 16  # 16-byte rows for the TMA descriptor of V
        v_dtype = torch.float8_e4m3fn if pv_fp8 else torch.float16
        # (dtype, element count) of each intermediate, in the order `views` returns them
        bufs = ((torch.float32, bh * n_chunks * d),  # ksum partials
                (torch.float32, bh * n_chunks * d),  # vmax partials
                (torch.int8, b * hq * sq * d),       # q_int8
                (torch.float32, b * hq * sq),        # q_scale
                (torch.int8, bh * skv * d),          # k_int8
                (torch.float32, bh * skv),           # k_scale
                (torch.float32, bh * d),             # k_mean
                (v_dtype, bh * d * seq_pad),         # v_q
                (torch.float32, bh * d))             # v_scale
        self.dtypes = tuple(dt for dt, _ in bufs)
        sizes = []
        for dt, n in bufs:
            nbytes = n * dt.itemsize
            padded = triton.cdiv(nbytes, _WS_ALIGN) * _WS_ALIGN
            sizes += [nbytes, padded - nbytes] if padded > nbytes else [nbytes]
        self.split_sizes = sizes
        # split index of each buffer (padding pieces in between are dropped)
        idx, i = [], 0
        for dt, n in bufs:
            idx.append(i)
            i += 2 if triton.cdiv(n * dt.itemsize, _WS_ALIGN) * _WS_ALIGN > n * dt.itemsize else 1
        self.split_index = tuple(idx)
        self.offsets = tuple(sum(sizes[:i]) for i in idx)  # byte offset of each buffer in the workspace
        self.ws_bytes = sum(sizes)
        qs_, ks_, vs_ = _bhsd_strides(q, layout), _bhsd_strides(k, layout), _bhsd_strides(v, layout)
        self.stats_grid = (n_chunks, bh)
        self.stats_args = (ks_, vs_, (hkv, skv, chunk, n_chunks))
        self.stats_meta = dict(D=d, BLOCK_S=_STATS_BLOCK_S, num_warps=4)
        k_tiles, q_tiles = triton.cdiv(skv, k_block), triton.cdiv(sq, _Q_QUANT_BM)
        self.quant_grid = (2 * k_tiles * bh + q_tiles * b * hq,)
        self.quant_args = (qs_, ks_, vs_, (hq, sq, hkv, skv, seq_pad, n_chunks, k_tiles, k_tiles * bh, q_tiles))
        per_thread = qk_quant_gran == "per_thread"
        self.quant_meta = dict(D=d, K_BLOCK=k_block, SUB=min(k_block, _QUANT_SUB), K_PER_THREAD=per_thread,
                               V_FP8=pv_fp8, UNROLL=_QUANT_UNROLL, SMOOTH_K=smooth_k,
                               CHUNKS_P2=triton.next_power_of_2(n_chunks), BM=_Q_QUANT_BM, Q_PER_THREAD=per_thread,
                               Q_BLOCK=q_block, num_warps=_QUANT_WARPS)
        self.stats_launch = KernelLaunch(_kv_stats_kernel, self.stats_grid, self.stats_meta)
        self.quant_launch = KernelLaunch(_qkv_quant_kernel, self.quant_grid, self.quant_meta)

    def views(self, ws: torch.Tensor):
        """The intermediates as flat typed views of the uint8 workspace `ws` (self.ws_bytes long)."""
        parts = ws.split_with_sizes(self.split_sizes)
        return [parts[i].view(dt) for i, dt in zip(self.split_index, self.dtypes)]

    def addresses(self, ws: torch.Tensor):
        """The device addresses of the intermediates in `ws`, in the order `views` returns them."""
        base = ws.data_ptr()
        return [base + off for off in self.offsets]

    def keys(self, q, k, v, ws):
        """(stats key, quantization key, workspace alignment): what a call varies in that Triton specializes the
        two launches on. The plan fixes every dtype and integer argument; what remains is the 16-byte alignment
        of each caller tensor and of the workspace (its buffers sit at multiples of 256 bytes from its start)."""
        k_al, v_al, ws_al = aligned(k), aligned(v), aligned(ws)
        return (k_al, v_al, ws_al), (aligned(q), k_al, v_al, ws_al), ws_al

    def stats_arguments(self, k, v, ksum, vmax):
        ks_, vs_, ints = self.stats_args
        return (k, *ks_, v, *vs_, ksum, vmax, *ints)

    def quant_arguments(self, q, k, v, ksum, vmax, qi, qsc, k_int8, k_scale, k_mean, v_q, v_scale):
        qs_, ks_, vs_, ints = self.quant_args
        return (q, *qs_, k, *ks_, v, *vs_, ksum, vmax, qi, qsc, k_int8, k_scale, k_mean, v_q, v_scale, *ints)

    def run(self, q, k, v, ws=None):
        """Both launches; returns (QuantizedKV, (q_int8 flat, q_scale flat), whether the workspace that holds all
        of them is 16-byte aligned). `ws`: the workspace, when the caller already allocated it."""
        if ws is None:
            ws = torch.empty(self.ws_bytes, dtype=torch.uint8, device=self.device)
        ksum, vmax, qi, qsc, k_int8, k_scale, k_mean, v_q, v_scale = self.views(ws)
        stats_key, quant_key, ws_al = self.keys(q, k, v, ws)
        self.stats_launch.launch(stats_key, *self.stats_arguments(k, v, ksum, vmax))
        self.quant_launch.launch(quant_key, *self.quant_arguments(q, k, v, ksum, vmax, qi, qsc, k_int8, k_scale,
                                                                  k_mean, v_q, v_scale))
        b, hkv, skv, d = self.shape_kv
        kv = QuantizedKV(k_int8, k_scale, k_mean, v_q, v_scale, b, hkv, skv, self.seq_pad, d, self.pv_fp8,
                         self.k_block, self.k_gran)
        return kv, (qi, qsc), ws_al


_quant_plans: dict = {}


def _quant_plan(q, k, v, layout, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8) -> _QuantPlan:
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           layout, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8)
    plan = _quant_plans.get(key)
    if plan is None:
        if len(_quant_plans) >= _MAX_PLANS:
            _quant_plans.clear()
        plan = _quant_plans[key] = _QuantPlan(q, k, v, layout, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8)
    return plan


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "HND",
             qk_quant_gran: str = "per_thread", q_block: int = 128, k_block: int = 128, smooth_k: bool = True,
             pv_fp8: bool | None = None):
    """Q, K and V quantized as the attention kernel reads them (two launches: K/V statistics, then Q, K and V
    together). Returns (QuantizedKV, (q_int8 [B*Hq*Sq*D] int8, q_scale [B*Hq*Sq] fp32)); Q rows are ordered
    (batch, head, token) whatever the layout."""
    kv, q_quant, _ = _quant_plan(q, k, v, layout, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8).run(q, k, v)
    return kv, q_quant


def _config_ok(cfg: AttnConfig, qk_quant_gran: str, q_block: int) -> bool:
    if qk_quant_gran == "per_block":
        small, big = sorted((cfg.block_m, q_block))
        return big % small == 0
    return cfg.block_m % 16 == 0


def _descriptor(base, shape, strides, block_shape):
    """A TensorDescriptor without its per-construction checks (half the host cost of the attention launch's
    arguments): the plan fixes what they check. Every base is a workspace buffer at a 256-byte offset, its
    rows are D or S_pad (a multiple of 16) elements of 1 or 2 bytes, the last stride is 1, the block shapes are
    powers of two."""
    if not _DESCRIPTOR_FIELDS_KNOWN:  # a Triton whose descriptor has other fields: its own constructor
        return TensorDescriptor(base, shape, strides, block_shape)
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = base, shape, strides, block_shape, "zero"
    return desc


# `_descriptor` fills exactly these fields; a Triton whose TensorDescriptor has others gets its constructor.
_DESCRIPTOR_FIELDS_KNOWN = (TensorDescriptor is not None and dataclasses.is_dataclass(TensorDescriptor) and
                            [f.name for f in dataclasses.fields(TensorDescriptor)] ==
                            ["base", "shape", "strides", "block_shape", "padding"])


class _AttnPlan:
    """The attention launch of one call signature for one config: grid, strides, constexprs, descriptor
    shapes."""

    def __init__(self, q, layout, kv: QuantizedKV, *, is_causal, return_lse, use_tma, cfg: AttnConfig,
                 has_kv_lens):
        b, hq, sq, d = _bhsd_shape(q, layout)
        self.grid = (triton.cdiv(sq, cfg.block_m), b * hq)
        self.q_strides = _bhsd_strides(q, layout)
        # strides of an `out` allocated by us (contiguous, q's shape); a caller's `out` brings its own
        self.out_strides = _bhsd_strides(torch.empty(q.shape, device="meta"), layout)
        self.ints = (hq, kv.heads_kv, sq, kv.seq_kv, kv.seq_pad)
        self.use_tma = use_tma
        rows_k = kv.batch * kv.heads_kv * kv.seq_kv
        self.k_desc = ([rows_k, d], [d, 1], [KV_TILE, d])
        self.v_desc = ([kv.batch * kv.heads_kv * d, kv.seq_pad], [kv.seq_pad, 1], [d, KV_TILE])
        self.q_desc = ([b * hq * sq, d], [d, 1], [cfg.block_m, d])
        self.meta = dict(D=d, BM=cfg.block_m, BN=KV_TILE, IS_CAUSAL=bool(is_causal), RETURN_LSE=bool(return_lse),
                         PV_FP8=kv.pv_fp8, USE_TMA=use_tma, STAGES=cfg.num_stages, KG=kv.k_groups_per_tile(),
                         HAS_KV_LENS=has_kv_lens, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.launch = KernelLaunch(_int8fp8_attn_kernel, self.grid, self.meta)
        # direct launches pass the workspace's buffers as addresses; a descriptor built by Triton's own
        # constructor (another Triton's TensorDescriptor) would want a tensor
        self.direct_ok = not use_tma or _DESCRIPTOR_FIELDS_KNOWN

    def key(self, q, out, out_strides, lse_aligned, kv_lens, ws_aligned):
        """What a call varies in that Triton specializes the launch on: q's dtype (the plan serves both), the
        strides of a caller's out, the 16-byte alignment of each tensor (`ws_aligned`: of the quantized
        tensors), kv_lens' dtype."""
        return (q.dtype, out_strides, ws_aligned, aligned(q), aligned(out), lse_aligned,
                None if kv_lens is None else (kv_lens.dtype, aligned(kv_lens)))

    def arguments(self, q, qi, qsc, k_int8, k_scale, k_mean, v_q, v_scale, out, out_strides, lse, kv_lens,
                  sm_scale, base=lambda x: x):
        """The kernel's arguments; `base(x)` is what a tensor descriptor is given for buffer x."""
        if self.use_tma:
            k_desc = _descriptor(base(k_int8), *self.k_desc)
            v_desc = _descriptor(base(v_q), *self.v_desc)
            qi_desc = _descriptor(base(qi), *self.q_desc)
        else:
            k_desc = v_desc = qi_desc = None
        sm_scale = float(sm_scale)  # an int scale would specialize the kernel (1 becomes a constant)
        return (q, *self.q_strides, qi, qi_desc, qsc, k_int8, k_desc, k_scale, v_q, v_desc, v_scale, k_mean,
                out, *out_strides, lse, kv_lens, *self.ints, sm_scale * LOG2E, sm_scale)

    def run(self, q, kv: QuantizedKV, q_quant, out, out_strides, lse, kv_lens, sm_scale, ws_aligned=None):
        """One launch. `ws_aligned`: whether kv and q_quant are views of one workspace whose start has that
        16-byte alignment (as `_QuantPlan.run` returns them); None: their addresses are checked one by one."""
        qi, qsc = q_quant
        if ws_aligned is None:
            ws_aligned = (aligned(qi), aligned(qsc), aligned(kv.k_int8), aligned(kv.k_scale), aligned(kv.v_q),
                          aligned(kv.v_scale), aligned(kv.k_mean))
        key = self.key(q, out, out_strides, aligned(lse), kv_lens, ws_aligned)
        self.launch.launch(key, *self.arguments(q, qi, qsc, kv.k_int8, kv.k_scale, kv.k_mean, kv.v_q, kv.v_scale,
                                                out, out_strides, lse, kv_lens, sm_scale))


_attn_plans: dict = {}


def _attn_plan(q, layout, kv, is_causal, return_lse, use_tma, cfg, has_kv_lens) -> _AttnPlan:
    key = (q.shape, q.stride(), kv.k_int8.shape, kv.heads_kv, kv.seq_kv, kv.pv_fp8, kv.k_block, kv.k_gran, layout,
           is_causal, return_lse, use_tma, cfg, has_kv_lens)
    plan = _attn_plans.get(key)
    if plan is None:
        if len(_attn_plans) >= _MAX_PLANS:
            _attn_plans.clear()
        plan = _attn_plans[key] = _AttnPlan(q, layout, kv, is_causal=is_causal, return_lse=return_lse,
                                            use_tma=use_tma, cfg=cfg, has_kv_lens=has_kv_lens)
    return plan


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


def _pick_config(q, kv, q_quant, out, out_strides, lse, kv_lens, *, layout, is_causal, sm_scale, return_lse, qk_quant_gran,
                 q_block, use_tma):
    """(config, settled): the fastest candidate for this shape class, timed once per class on first use;
    settled is False for the untimed pick made during CUDA graph capture (a later eager call still tunes)."""
    b, hq, sq, d = _bhsd_shape(q, layout)
    cands = [c for c in _CANDIDATES[d] if _config_ok(c, qk_quant_gran, q_block)]
    if not cands:
        raise ValueError(f"no kernel config fits qk_quant_gran={qk_quant_gran!r}, q_block={q_block}")
    key = (q.device.index, _device_facts(q.device).capability, d, bool(is_causal), kv.pv_fp8, use_tma,
           kv.k_groups_per_tile(), kv_lens is not None,
           q.dtype, qk_quant_gran, q_block, _bucket(sq), _bucket(kv.seq_kv), _bucket(b * hq))
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg, True
    if len(cands) == 1:
        return cands[0], True
    if torch.cuda.is_current_stream_capturing():
        return cands[0], False  # no timing inside graph capture
    times = {}
    for c in cands:
        plan = _attn_plan(q, layout, kv, is_causal, return_lse, use_tma, c, kv_lens is not None)
        times[c] = _time_config(lambda: plan.run(q, kv, q_quant, out, out_strides, lse, kv_lens, sm_scale))
    cfg = _tuned[key] = min(times, key=times.get)
    return cfg, True


@dataclass(frozen=True)
class _DeviceFacts:
    capability: tuple
    fp8_dot: bool
    tma: bool


_devices: dict = {}


def _device_facts(device) -> _DeviceFacts:
    facts = _devices.get(device)
    if facts is None:
        cap = torch.cuda.get_device_capability(device)
        facts = _devices[device] = _DeviceFacts(cap, cap >= (8, 9), TensorDescriptor is not None and cap >= (9, 0))
    return facts


def has_fp8_dot(device) -> bool:
    return _device_facts(device).fp8_dot


def has_tma(device) -> bool:
    return _device_facts(device).tma


def _check_out(out, lse, q, b, hq, sq, return_lse):
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype}")
    if return_lse and lse is not None and (lse.shape != (b, hq, sq) or lse.dtype != torch.float32
                                           or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous fp32 tensor of shape {(b, hq, sq)}")


def attention_quantized(q: torch.Tensor, kv: QuantizedKV, *, q_quant, layout: str = "HND", is_causal: bool = False,
                        sm_scale: float | None = None, return_lse: bool = False, qk_quant_gran: str = "per_thread",
                        q_block: int = 128, use_tma: bool | None = None, config: AttnConfig | None = None,
                        out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                        kv_lens: torch.Tensor | None = None):
    """Attention on quantized Q/K/V (`kv, q_quant = quantize(q, k, v, ...)` with the same layout, granularity and
    q_block). Returns (out in q's layout, lse or None). `out` / `lse` may be given (tests poison them to check
    every element is written). `kv_lens`: int32 [B] on q's device, or None: batch entry b attends to keys
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
    _check_out(out, lse, q, b, hq, sq, return_lse)
    if not return_lse:
        lse = q_quant[1]  # a pointer the kernel never touches without RETURN_LSE
    elif lse is None:
        lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    out_strides = _bhsd_strides(out, layout)
    if config is None:
        config, _ = _pick_config(q, kv, q_quant, out, out_strides, lse, kv_lens, layout=layout, is_causal=is_causal,
                                 sm_scale=sm_scale, return_lse=return_lse, qk_quant_gran=qk_quant_gran,
                                 q_block=q_block, use_tma=use_tma)
    elif not _config_ok(config, qk_quant_gran, q_block):
        raise ValueError(f"config {config} does not fit q_block={q_block}")
    plan = _attn_plan(q, layout, kv, is_causal, return_lse, use_tma, config, kv_lens is not None)
    plan.run(q, kv, q_quant, out, out_strides, lse, kv_lens, sm_scale)
    return out, (lse if return_lse else None)


class _CallPlan:
    """Everything `int8fp8_attention` decides per call signature: the quantization plan, the resolved device
    defaults, and (once settled: given, or tuned) the attention config and its launch plan."""

    def __init__(self, q, k, v, layout, is_causal, return_lse, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8,
                 use_tma, config):
        self.quant = _quant_plan(q, k, v, layout, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8)
        if config is not None and not _config_ok(config, qk_quant_gran, q_block):
            raise ValueError(f"config {config} does not fit q_block={q_block}")
        b, hq, sq, d = self.quant.shape_q
        self.use_tma = has_tma(q.device) if use_tma is None else use_tma
        self.default_scale = d ** -0.5
        self.lse_shape = (b, hq, sq)
        self.config = config
        self.attn = None  # _AttnPlan, set once the config is settled


_calls: dict = {}


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
    softmax, coarser scales otherwise), so padding must be finite.

    Three launches (K/V statistics; Q, K and V quantization; attention). The host work of a repeated call
    signature is one dictionary lookup, one workspace allocation and the launches: every decision (shapes,
    grids, strides, device facts, the tuned config) is cached per signature, and once each launch's key (the
    alignment of the caller's tensors) has been launched through Triton, the three go straight to their compiled
    kernels' launchers with the workspace's buffers as addresses (launch.py)."""
    has_lens = kv_lens is not None
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           layout, is_causal, return_lse, qk_quant_gran, q_block, k_block, smooth_k, pv_fp8, use_tma, config,
           has_lens)
    call = _calls.get(key)
    if call is None:
        if len(_calls) >= _MAX_PLANS:
            _calls.clear()
        call = _calls[key] = _CallPlan(q, k, v, layout, is_causal, return_lse, qk_quant_gran, q_block, k_block,
                                       smooth_k, pv_fp8, use_tma, config)
    if sm_scale is None:
        sm_scale = call.default_scale
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out_strides = None
    else:
        b, hq, sq, _ = call.quant.shape_q
        _check_out(out, lse, q, b, hq, sq, return_lse)
        out_strides = _bhsd_strides(out, layout)
    if return_lse and lse is None:
        lse = torch.empty(call.lse_shape, dtype=torch.float32, device=q.device)
    quant, attn = call.quant, call.attn
    ws = torch.empty(quant.ws_bytes, dtype=torch.uint8, device=quant.device)
    if attn is not None and attn.direct_ok:
        state = direct_state()
        if state is not None and _launch_direct(quant, attn, state, ws, q, k, v, out, out_strides,
                                                lse if return_lse else None, kv_lens, sm_scale):
            return out, (lse if return_lse else None)
    kv, q_quant, ws_aligned = quant.run(q, k, v, ws)
    if not return_lse:
        lse = q_quant[1]  # a pointer the kernel never touches without RETURN_LSE
    if attn is None:
        cfg, settled = (call.config, True) if call.config is not None else _pick_config(
            q, kv, q_quant, out, out_strides or _bhsd_strides(out, layout), lse, kv_lens, layout=layout, is_causal=is_causal, sm_scale=sm_scale,
            return_lse=return_lse, qk_quant_gran=qk_quant_gran, q_block=q_block, use_tma=call.use_tma)
        attn = _attn_plan(q, layout, kv, is_causal, return_lse, call.use_tma, cfg, has_lens)
        if settled:
            call.attn = attn
    attn.run(q, kv, q_quant, out, attn.out_strides if out_strides is None else out_strides, lse, kv_lens, sm_scale,
             ws_aligned)
    return out, (lse if return_lse else None)


def _launch_direct(quant: _QuantPlan, attn: _AttnPlan, state, ws, q, k, v, out, out_strides, lse, kv_lens,
                   sm_scale) -> bool:
    """The three launches of `int8fp8_attention` straight through their compiled kernels' launchers, with the
    workspace's buffers as addresses (no tensor views); False (nothing launched) unless all three were launched
    through Triton before with the same keys. `lse` None: no LSE (the kernel gets an address it never touches)."""
    stats_key, quant_key, ws_al = quant.keys(q, k, v, ws)
    if out_strides is None:
        out_strides = attn.out_strides
    ksum, vmax, qi, qsc, k_int8, k_scale, k_mean, v_q, v_scale = quant.addresses(ws)
    attn_key = attn.key(q, out, out_strides, ws_al if lse is None else aligned(lse), kv_lens, ws_al)
    stats_run = quant.stats_launch.entry(state, stats_key)
    quant_run = quant.quant_launch.entry(state, quant_key)
    attn_run = attn.launch.entry(state, attn_key)
    if stats_run is None or quant_run is None or attn_run is None:
        return False
    stream = current_stream(state)
    quant.stats_launch.run_direct(stats_run, stream, *quant.stats_arguments(k, v, ksum, vmax))
    quant.quant_launch.run_direct(quant_run, stream, *quant.quant_arguments(q, k, v, ksum, vmax, qi, qsc, k_int8,
                                                                            k_scale, k_mean, v_q, v_scale))
    attn.launch.run_direct(attn_run, stream, *attn.arguments(q, qi, qsc, k_int8, k_scale, k_mean, v_q, v_scale,
                                                             out, out_strides, qsc if lse is None else lse,
                                                             kv_lens, sm_scale, base=Address))
    return True
