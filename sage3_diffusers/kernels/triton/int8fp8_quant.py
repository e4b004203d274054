"""Triton quantization kernels for SageAttention2++ (INT8 Q/K, FP8 E4M3 V); numerics of `numerics/sage2pp_reference.py`.

Importing this module imports triton; `kernels/triton/__init__.py` keeps the package importable without it.

Two launches per call, both reading the caller's Q/K/V through their strides (never copied or modified):
1. `_kv_stats_kernel`: per (batch, kv-head, chunk of tokens) partial column sums of K and column amax of |V|.
   Partials, not atomics, so the K mean is deterministic and independent of the GPU. A separate launch: the
   K mean and V scales depend on every token of the head.
2. `_qkv_quant_kernel`: one 1-D grid of K tiles, V tiles and Q tiles. A K or V program first reduces its head's
   partials to the K mean / V per-channel scale (`_kv_mean`, `_v_scale`; the program of tile 0 stores them),
   then quantizes its tile of `k_block` tokens: K - mean -> INT8 with per-group scales; V -> FP8 E4M3 (FP16 where
   the GPU has no FP8 dot) with per-channel scales, stored transposed (B*Hkv, D, S_pad) so the PV dot reads V
   K-major. A Q program writes INT8 Q and its scales, which the attention kernel reads.
"""
from __future__ import annotations

import triton
import triton.language as tl

INT8_MAX = tl.constexpr(127.0)
E4M3_MAX = tl.constexpr(448.0)
# 1.5 * 2**23: adding and subtracting it rounds an fp32 |x| < 2**22 to the nearest integer, ties to even
# (the hardware's default rounding), without libdevice (which the Triton CPU interpreter lacks).
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _rne_int8(x):
    """fp32 -> nearest integer (ties to even) clamped to [-127, 127], still fp32."""
    r = (x + _RNE_MAGIC) - _RNE_MAGIC
    return tl.minimum(tl.maximum(r, -INT8_MAX), INT8_MAX)


@triton.jit
def _row_amax(x):
    """max |x| along axis 1; NaN anywhere in a row gives NaN (tl.max alone would drop it)."""
    amax = tl.max(tl.abs(x), axis=1)
    has_nan = tl.max((x != x).to(tl.int32), axis=1)
    return tl.where(has_nan > 0, float("nan"), amax)


@triton.jit
def _group_max_nan(vals, nan_flags):
    amax = tl.max(vals)
    return tl.where(tl.max(nan_flags) > 0, float("nan"), amax)


@triton.jit
def quantize_q_tile(q, row_amax, BM: tl.constexpr, PER_THREAD: tl.constexpr, Q_BLOCK: tl.constexpr,
                    block_amax):
    """INT8-quantize a [BM, D] fp32 Q tile whose first row index is a multiple of 16 (and of Q_BLOCK for
    per_block when Q_BLOCK <= BM). Returns (int8 tile, per-row scale [BM] fp32).

    per_thread: rows t and t+8 of each 16-row slice share a scale (group (t//16)*8 + t%8).
    per_block:  Q_BLOCK consecutive rows share a scale; when Q_BLOCK > BM the caller passes the group's amax
                (`block_amax`, computed over all its rows), else it is computed here.
    """
    if PER_THREAD:
        a = tl.reshape(row_amax, [BM // 16, 2, 8])
        nan = (a != a).to(tl.int32)
        g = tl.max(a, axis=1)
        g = tl.where(tl.max(nan, axis=1) > 0, float("nan"), g)
        scale = tl.reshape(tl.broadcast_to(tl.expand_dims(g, 1), [BM // 16, 2, 8]), [BM])
    else:
        if Q_BLOCK <= BM:
            a = tl.reshape(row_amax, [BM // Q_BLOCK, Q_BLOCK])
            nan = (a != a).to(tl.int32)
            g = tl.max(a, axis=1)
            g = tl.where(tl.max(nan, axis=1) > 0, float("nan"), g)
            scale = tl.reshape(tl.broadcast_to(tl.expand_dims(g, 1), [BM // Q_BLOCK, Q_BLOCK]), [BM])
        else:
            scale = tl.zeros([BM], dtype=tl.float32) + block_amax
    scale = tl.math.div_rn(scale, tl.full([BM], INT8_MAX, tl.float32))
    s = tl.expand_dims(scale, 1)
    safe = tl.where(s == 0, 1.0, s)
    qi = tl.where(s == 0, 0.0, _rne_int8(tl.math.div_rn(q, tl.broadcast_to(safe, q.shape))))
    # A NaN scale stays in `scale` (scores become NaN, never silently finite); the int8 values are then moot.
    qi = tl.where(qi != qi, 0.0, qi)
    return qi.to(tl.int8), scale


@triton.jit
def q_block_amax(q_ptr, stride_qs, stride_qd, start_m, Sq, BM: tl.constexpr, D: tl.constexpr,
                 Q_BLOCK: tl.constexpr):
    """amax over the Q_BLOCK-row group that contains row start_m (per_block with Q_BLOCK > BM)."""
    g0 = (start_m // Q_BLOCK) * Q_BLOCK
    offs_d = tl.arange(0, D)
    amax = 0.0
    nan = 0
    for c in range(0, Q_BLOCK, BM):
        rows = g0 + c + tl.arange(0, BM)
        x = tl.load(q_ptr + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=rows[:, None] < Sq, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x)))
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32)))
    return tl.where(nan > 0, float("nan"), amax)


@triton.jit
def _quant_q_tile(q_ptr, stride_qb, stride_qh, stride_qs, stride_qd, qi_ptr, qs_ptr, H, Sq, pid_m, bh,
                  D: tl.constexpr, BM: tl.constexpr, PER_THREAD: tl.constexpr, Q_BLOCK: tl.constexpr):
    """Q quantization of rows [pid_m*BM, pid_m*BM + BM) of head bh with the attention kernel's own tile code.
    Writes int8 [B*H, Sq, D] and per-row scales [B*H, Sq] (without sm_scale)."""
    b = bh // H
    h = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=rows[:, None] < Sq,
                other=0.0).to(tl.float32)
    block_amax = 0.0
    if not PER_THREAD:
        if Q_BLOCK > BM:
            block_amax = q_block_amax(base, stride_qs, stride_qd, pid_m * BM, Sq, BM, D, Q_BLOCK)
    qi, scale = quantize_q_tile(q, _row_amax(q), BM, PER_THREAD, Q_BLOCK, block_amax)
    rmask = rows < Sq
    tl.store(qi_ptr + (bh * Sq + rows)[:, None] * D + offs_d[None, :], qi, mask=rmask[:, None])
    tl.store(qs_ptr + bh * Sq + rows, scale, mask=rmask)


@triton.jit
def _kv_stats_kernel(k_ptr, stride_kb, stride_kh, stride_ks, stride_kd,
                     v_ptr, stride_vb, stride_vh, stride_vs, stride_vd,
                     ksum_ptr, vmax_ptr, H, S, CHUNK, N_CHUNKS,
                     D: tl.constexpr, BLOCK_S: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    # element-wise accumulators, reduced over rows once at the end: no cross-warp reduction per step
    ksum = tl.zeros([BLOCK_S, D], dtype=tl.float32)
    vmax = tl.zeros([BLOCK_S, D], dtype=tl.float32)
    start = c * CHUNK
    for i in tl.range(0, CHUNK, BLOCK_S, num_stages=3):  # CHUNK is a multiple of BLOCK_S
        rows = start + i + tl.arange(0, BLOCK_S)
        m = rows[:, None] < S
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=m, other=0.0)
        ksum += k.to(tl.float32)
        v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=m, other=0.0)
        va = tl.abs(v.to(tl.float32))
        # NaN sticks: tl.maximum drops a NaN operand on the GPU, so keep it explicitly
        vmax = tl.where((va != va) | (vmax != vmax), float("nan"), tl.maximum(vmax, va))
    vmax_d = tl.max(vmax, axis=0)
    vmax_d = tl.where(tl.max((vmax != vmax).to(tl.int32), axis=0) > 0, float("nan"), vmax_d)
    ksum = tl.sum(ksum, axis=0)
    out = (bh * N_CHUNKS + c) * D + offs_d
    tl.store(ksum_ptr + out, ksum)
    tl.store(vmax_ptr + out, vmax_d)


@triton.jit
def _kv_mean(ksum_ptr, bh, S, N_CHUNKS, D: tl.constexpr, SMOOTH_K: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """K mean [D] of head bh from the partial sums of `_kv_stats_kernel`, summed over the chunks in the order
    that the register layout of the partials load gives. The load is [CHUNKS_P2, 1, D]: Triton gives a load the
    layout of the widest access among the same-shaped memory operations of the kernel, and no tile of this
    kernel has that shape, so its layout is the one a [CHUNKS_P2, D] load has alone (the middle axis takes no
    thread): the summation order, and the bits of the mean, do not depend on the tiles around it."""
    offs_d = tl.arange(0, D)
    if SMOOTH_K:
        cidx = tl.arange(0, CHUNKS_P2)
        part = (bh * N_CHUNKS + cidx)[:, None, None] * D + offs_d[None, None, :]
        parts = tl.load(ksum_ptr + part, mask=cidx[:, None, None] < N_CHUNKS, other=0.0)
        kmean = tl.reshape(tl.sum(parts, axis=0), [D]) / S
    else:
        kmean = tl.zeros([D], dtype=tl.float32)
    return kmean


@triton.jit
def _v_scale(vmax_ptr, bh, N_CHUNKS, D: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """V per-channel scale [D] of head bh (amax / 448) from the partial amax of `_kv_stats_kernel`; NaN sticks."""
    offs_d = tl.arange(0, D)
    cidx = tl.arange(0, CHUNKS_P2)
    part = (bh * N_CHUNKS + cidx)[:, None] * D + offs_d[None, :]
    vparts = tl.load(vmax_ptr + part, mask=cidx[:, None] < N_CHUNKS, other=0.0)
    vamax = tl.max(vparts, axis=0)
    vamax = tl.where(tl.max((vparts != vparts).to(tl.int32), axis=0) > 0, float("nan"), vamax)
    return tl.math.div_rn(vamax, tl.full([D], E4M3_MAX, tl.float32))


@triton.jit
def _k_group_amax(x, SUB: tl.constexpr, K_PER_THREAD: tl.constexpr):
    """Group amax of a [SUB, D] K chunk (SUB a multiple of 8 at a multiple-of-8 offset): [4] for per_thread
    (tokens with equal (t % 8) // 2 share a scale: view t as [t // 8, (t % 8) // 2, t % 2]), [1] per_block.
    NaN propagates."""
    amax = _row_amax(x)
    if K_PER_THREAD:
        a = tl.reshape(amax, [SUB // 8, 4, 2])
        g = tl.max(tl.max(a, axis=2), axis=0)
        nan = tl.max(tl.max((a != a).to(tl.int32), axis=2), axis=0)
    else:
        g = tl.zeros([1], dtype=tl.float32) + tl.max(amax)
        nan = tl.zeros([1], dtype=tl.int32) + tl.max((amax != amax).to(tl.int32))
    return tl.where(nan > 0, float("nan"), g)


@triton.jit
def _k_rows_scale(g, SUB: tl.constexpr, K_PER_THREAD: tl.constexpr):
    """Per-row copy [SUB] of the group scales g."""
    if K_PER_THREAD:
        return tl.reshape(tl.broadcast_to(tl.expand_dims(tl.expand_dims(g, 0), 2), [SUB // 8, 4, 2]), [SUB])
    else:
        return tl.reshape(tl.broadcast_to(tl.expand_dims(g, 0), [SUB, 1]), [SUB])


@triton.jit
def _quant_k_tile(k_ptr, stride_kb, stride_kh, stride_ks, stride_kd, kq_ptr, kscale_ptr, kmean_ptr, ksum_ptr,
                  H, S, N_CHUNKS, t, bh,
                  D: tl.constexpr, K_BLOCK: tl.constexpr, SUB: tl.constexpr, K_PER_THREAD: tl.constexpr,
                  UNROLL: tl.constexpr, SMOOTH_K: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """K tile t (K_BLOCK tokens) of head bh in chunks of SUB rows, in two passes: group amax, then quantize (the
    second pass re-reads the tile from L2)."""
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    row0 = t * K_BLOCK
    kmean = _kv_mean(ksum_ptr, bh, S, N_CHUNKS, D, SMOOTH_K, CHUNKS_P2)
    if t == 0:
        tl.store(kmean_ptr + bh * D + offs_d, kmean)  # for the attention kernel's LSE term
    k_base = k_ptr + b * stride_kb + h * stride_kh
    if K_PER_THREAD:
        g = tl.zeros([4], dtype=tl.float32)
    else:
        g = tl.zeros([1], dtype=tl.float32)
    for c in tl.range(0, K_BLOCK, SUB, loop_unroll_factor=UNROLL):  # unrolled: several chunk loads in flight
        rows = row0 + c + tl.arange(0, SUB)
        rmask = rows < S
        x = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        x = tl.where(rmask[:, None], x - kmean[None, :], 0.0)
        gc = _k_group_amax(x, SUB, K_PER_THREAD)
        g = tl.where((gc != gc) | (g != g), float("nan"), tl.maximum(g, gc))  # NaN sticks
    scale_g = tl.math.div_rn(g, tl.zeros_like(g) + INT8_MAX)
    for c in tl.range(0, K_BLOCK, SUB, loop_unroll_factor=UNROLL):  # unrolled: several chunk loads in flight
        rows = row0 + c + tl.arange(0, SUB)
        rmask = rows < S
        x = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=rmask[:, None],
                    other=0.0).to(tl.float32)
        x = x - kmean[None, :]
        scale = _k_rows_scale(scale_g, SUB, K_PER_THREAD)
        s = scale[:, None]
        safe = tl.where(s == 0, 1.0, s)
        ki = tl.where(s == 0, 0.0, _rne_int8(tl.math.div_rn(x, tl.broadcast_to(safe, x.shape))))
        ki = tl.where(ki != ki, 0.0, ki)
        tl.store(kq_ptr + (bh * S + rows)[:, None] * D + offs_d[None, :], ki.to(tl.int8), mask=rmask[:, None])
        tl.store(kscale_ptr + bh * S + rows, scale, mask=rmask)


@triton.jit
def _quant_v_tile(v_ptr, stride_vb, stride_vh, stride_vs, stride_vd, vq_ptr, vscale_ptr, vmax_ptr,
                  H, S, S_PAD, N_CHUNKS, t, bh,
                  D: tl.constexpr, K_BLOCK: tl.constexpr, SUB: tl.constexpr, V_FP8: tl.constexpr,
                  UNROLL: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """V tile t (K_BLOCK tokens) of head bh in chunks of SUB rows, divided by the per-channel scale, stored
    transposed."""
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    row0 = t * K_BLOCK
    vscale = _v_scale(vmax_ptr, bh, N_CHUNKS, D, CHUNKS_P2)
    if t == 0:
        tl.store(vscale_ptr + bh * D + offs_d, vscale)
    vs = vscale[None, :]
    vsafe = tl.where(vs == 0, 1.0, vs)
    for c in tl.range(0, K_BLOCK, SUB, loop_unroll_factor=UNROLL):  # unrolled: several chunk loads in flight
        rows = row0 + c + tl.arange(0, SUB)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + rows[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=(rows < S)[:, None], other=0.0).to(tl.float32)
        vq = tl.where(vs == 0, 0.0, tl.math.div_rn(v, tl.broadcast_to(vsafe, v.shape)))
        vq = tl.minimum(tl.maximum(vq, -E4M3_MAX), E4M3_MAX)  # |v| = amax can divide to 448 + 1 ulp
        if V_FP8:
            vq = vq.to(tl.float8e4nv)
        else:
            vq = vq.to(tl.float16)
        # transposed store; columns in [S, S_PAD) get zeros (rows >= S were loaded as 0)
        tl.store(vq_ptr + (bh * D + offs_d)[:, None] * S_PAD + rows[None, :], tl.trans(vq),
                 mask=(rows < S_PAD)[None, :])


@triton.jit
def _qkv_quant_kernel(q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
                      k_ptr, stride_kb, stride_kh, stride_ks, stride_kd,
                      v_ptr, stride_vb, stride_vh, stride_vs, stride_vd,
                      ksum_ptr, vmax_ptr, qi_ptr, qs_ptr, kq_ptr, kscale_ptr, kmean_ptr, vq_ptr, vscale_ptr,
                      Hq, Sq, Hkv, S, S_PAD, N_CHUNKS, K_TILES, KV_PROGRAMS, Q_TILES,
                      D: tl.constexpr, K_BLOCK: tl.constexpr, SUB: tl.constexpr, K_PER_THREAD: tl.constexpr,
                      V_FP8: tl.constexpr, UNROLL: tl.constexpr, SMOOTH_K: tl.constexpr, CHUNKS_P2: tl.constexpr,
                      BM: tl.constexpr, Q_PER_THREAD: tl.constexpr, Q_BLOCK: tl.constexpr):
    """One 1-D grid: programs [0, KV_PROGRAMS) are K tiles, [KV_PROGRAMS, 2*KV_PROGRAMS) V tiles (tile index
    fastest, then head: KV_PROGRAMS = K_TILES * B*Hkv), the rest Q tiles of BM rows (Q_TILES per head)."""
    pid = tl.program_id(0)
    if pid < 2 * KV_PROGRAMS:
        kv = pid % KV_PROGRAMS
        t = kv % K_TILES
        bh = kv // K_TILES
        if pid < KV_PROGRAMS:
            _quant_k_tile(k_ptr, stride_kb, stride_kh, stride_ks, stride_kd, kq_ptr, kscale_ptr, kmean_ptr,
                          ksum_ptr, Hkv, S, N_CHUNKS, t, bh, D, K_BLOCK, SUB, K_PER_THREAD, UNROLL, SMOOTH_K,
                          CHUNKS_P2)
        else:
            _quant_v_tile(v_ptr, stride_vb, stride_vh, stride_vs, stride_vd, vq_ptr, vscale_ptr, vmax_ptr,
                          Hkv, S, S_PAD, N_CHUNKS, t, bh, D, K_BLOCK, SUB, V_FP8, UNROLL, CHUNKS_P2)
    else:
        r = pid - 2 * KV_PROGRAMS
        _quant_q_tile(q_ptr, stride_qb, stride_qh, stride_qs, stride_qd, qi_ptr, qs_ptr, Hq, Sq, r % Q_TILES,
                      r // Q_TILES, D, BM, Q_PER_THREAD, Q_BLOCK)
