"""Triton attention kernel for SageAttention2++ numerics: INT8 QKᵀ, FP8 E4M3 P·V, online softmax in exp2.

One program = BM query rows of one (batch, query head). INT8 Q and its scales come from `_q_quant_kernel` (read
once per program: a Q quantized in registers would be re-gathered byte by byte every key tile); K (INT8,
[B*Hkv*Skv, D]) and V (FP8, transposed [B*Hkv*D, S_pad]) come from `int8fp8_quant.py`. Key tiles are BN = 128
tokens aligned at 0, as the reference's `kv_tile`, so the running max, P̃ and its FP8 rounding are those of the
reference. Per tile: t = int_dot·δq·δk (sm_scale·log2e folded into δq), P̃ = exp2(t − m + 8.807) ≤ 448,
l += ΣP̃ (fp32), acc = acc·α + dot(fp8(P̃), V̂) (fresh fp32 accumulator per tile, added on CUDA cores: two-level
accumulation). The product δq·δk is folded into the exp2 argument as one FMA per score: per K scale group where
K's grouping allows it (KG = 4 or 1 scales per key tile), else after one multiply by δk per score (KG = 0). The
int32 scores convert to fp32 with one conversion each (exact: |s| <= 127·127·D < 2**24).
Epilogue: O = acc / l · δv; LSE = (m + log2 l − 8.807)·ln2 + sm_scale·q·k̄.
With per-sample key lengths (HAS_KV_LENS) batch entry b attends to keys [0, kv_lens[b]) (clamped to [0, Skv]);
an entry with no keys gives zero rows and LSE −inf.
On sm_90+ K and V tiles arrive by TMA (host tensor descriptors); elsewhere by pointer loads. Without FP8
dot support (sm_80/86) P and V are FP16 (V still divided by its per-channel scale).
"""
from __future__ import annotations

import triton
import triton.language as tl


P_OFFSET_LOG2 = tl.constexpr(8.807)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_k(k_ptr, k_desc, kh_row0, start_n, offs_n, kv_len, D: tl.constexpr, USE_TMA: tl.constexpr):
    """INT8 K tile [BN, D] of keys start_n.. (rows past kv_len read as 0 without TMA; with TMA rows past Skv are
    zero-filled and rows in [kv_len, Skv) are masked by the caller)."""
    if USE_TMA:
        k = k_desc.load([kh_row0 + start_n, 0])
    else:
        offs_d = tl.arange(0, D)
        k = tl.load(k_ptr + (kh_row0 + offs_n)[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < kv_len,
                    other=0)
    return k


@triton.jit
def _valid_keys(offs_m, offs_n, kv_len, IS_CAUSAL: tl.constexpr):
    """[BM, BN] mask of the keys each query row may attend to (in range, and at or before the row if causal)."""
    valid = offs_n[None, :] < kv_len
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _accumulate_pv(acc, l_i, m_i, m_new, p, vh_row0, start_n, offs_n, S_PAD, v_ptr, v_desc,
                   D: tl.constexpr, PV_FP8: tl.constexpr, USE_TMA: tl.constexpr):
    """Online-softmax update with this tile's P̃: l = l·α + ΣP̃ (fp32; the reference's row_sum="p_tilde"),
    acc = acc·α + dot(P, V̂) with P = P̃ rounded to the PV operand type (fresh fp32 accumulator for the tile's
    product, added on CUDA cores: the two-level accumulation). Summing the rounded P instead (row_sum=
    "quantized_p", what the sm90 CUDA kernel gets from its tensor core) costs +20% instructions per key tile here
    (fp8 -> fp32 conversions; 772 vs 645 SASS instructions at hd128) and measures ~10% slower; a dot with a ones
    tile +8%."""
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_TMA:
        vt = v_desc.load([vh_row0, start_n])
    else:
        offs_d = tl.arange(0, D)
        vt = tl.load(v_ptr + (vh_row0 + offs_d)[:, None] * S_PAD + offs_n[None, :],
                     mask=offs_n[None, :] < S_PAD, other=0.0)
    if PV_FP8:
        pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
    else:
        pv = tl.dot(p.to(tl.float16), tl.trans(vt))
    acc = acc * alpha[:, None] + pv
    return acc, l_i


@triton.jit
def _attn_tile(acc, l_i, m_i, q_i8, qs, offs_m, start_n, kh_row0, vh_row0, kv_len, S_PAD,
               k_ptr, k_desc, ks_ptr, v_ptr, v_desc,
               D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
               PV_FP8: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile with per-key K scales (any K grouping): u = s·δk per score, then exp2(u·qs + (8.807 − m)) as
    one FMA. qs >= 0 per row, so max_j(u·qs) = qs·max_j(u)."""
    offs_n = start_n + tl.arange(0, BN)
    k = _load_k(k_ptr, k_desc, kh_row0, start_n, offs_n, kv_len, D, USE_TMA)
    ks = tl.load(ks_ptr + kh_row0 + offs_n, mask=offs_n < kv_len, other=0.0)
    s = tl.dot(q_i8, tl.trans(k))  # int32, exact
    u = s.to(tl.float32) * ks[None, :]
    if MASK:
        u = tl.where(_valid_keys(offs_m, offs_n, kv_len, IS_CAUSAL), u, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(u, axis=1) * qs)
    bias = P_OFFSET_LOG2 + (0.0 - m_new)
    p = tl.math.exp2(u * qs[:, None] + bias[:, None])
    acc, l_i = _accumulate_pv(acc, l_i, m_i, m_new, p, vh_row0, start_n, offs_n, S_PAD, v_ptr, v_desc,
                              D, PV_FP8, USE_TMA)
    return acc, l_i, m_new


@triton.jit
def _attn_tile_kgroup(acc, l_i, m_i, q_i8, qs, offs_m, start_n, kh_row0, vh_row0, kv_len, S_PAD,
                      k_ptr, k_desc, ks_ptr, v_ptr, v_desc,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, KG4: tl.constexpr):
    """`_attn_tile` with the K scale folded into the exp2 FMA's coefficient: one FFMA per score instead of FMUL +
    FFMA. Valid when the tile's K scales take 4 or 1 distinct values laid out as the quantizer makes them:
    KG4 (per_thread, k_block = BN: key j of the tile has group (j % 8) // 2), else one scale per tile (per_block
    with k_block a multiple of BN). Coefficient c = qs·δk per (row, group) >= 0, so max_j(s_j·c) = c·max_j(s_j) exactly:
    the row max is taken on the integer-valued scores before any scaling."""
    offs_n = start_n + tl.arange(0, BN)
    k = _load_k(k_ptr, k_desc, kh_row0, start_n, offs_n, kv_len, D, USE_TMA)
    if not KG4:
        ks1 = tl.load(ks_ptr + kh_row0 + start_n)  # start_n < kv_len <= Skv always
    else:
        # group g's scale sits on its first token, key start_n + 2g (valid whenever any key of the group is)
        offs_g = start_n + 2 * tl.arange(0, 4)
        ks = tl.load(ks_ptr + kh_row0 + offs_g, mask=offs_g < kv_len, other=0.0)
    s = tl.dot(q_i8, tl.trans(k))  # int32, exact
    sf = s.to(tl.float32)
    if MASK:
        valid = _valid_keys(offs_m, offs_n, kv_len, IS_CAUSAL)
        sm = tl.where(valid, sf, float("-inf"))
    else:
        sm = sf
    if not KG4:
        c = qs * ks1  # [BM]
        g = tl.max(sm, axis=1)
        m_t = tl.where(g == float("-inf"), float("-inf"), g * c)  # -inf·0 would be NaN
        m_new = tl.maximum(m_i, m_t)
        bias = P_OFFSET_LOG2 + (0.0 - m_new)
        x = sf * c[:, None] + bias[:, None]
        if MASK:
            x = tl.where(valid, x, float("-inf"))
        p = tl.math.exp2(x)
    else:
        c = qs[:, None] * ks[None, :]  # [BM, 4]
        g = tl.max(tl.max(tl.reshape(sm, [BM, BN // 8, 4, 2]), axis=3), axis=1)  # [BM, 4]
        m_t = tl.max(tl.where(g == float("-inf"), float("-inf"), g * c), axis=1)
        m_new = tl.maximum(m_i, m_t)
        bias = P_OFFSET_LOG2 + (0.0 - m_new)
        c4 = tl.expand_dims(tl.expand_dims(c, 1), 3)
        b4 = tl.expand_dims(tl.expand_dims(tl.expand_dims(bias, 1), 2), 3)
        x = tl.reshape(tl.reshape(sf, [BM, BN // 8, 4, 2]) * c4 + b4, [BM, BN])
        if MASK:
            x = tl.where(valid, x, float("-inf"))
        p = tl.math.exp2(x)
    acc, l_i = _accumulate_pv(acc, l_i, m_i, m_new, p, vh_row0, start_n, offs_n, S_PAD, v_ptr, v_desc,
                              D, PV_FP8, USE_TMA)
    return acc, l_i, m_new


@triton.jit
def _int8fp8_attn_kernel(q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
                         qi_ptr, qi_desc, qsc_ptr,
                         k_ptr, k_desc, ks_ptr, v_ptr, v_desc, vs_ptr, kmean_ptr,
                         o_ptr, stride_ob, stride_oh, stride_os, stride_od, lse_ptr, kv_lens_ptr,
                         Hq, Hkv, Sq, Skv, S_PAD, qk_scale, sm_scale,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         RETURN_LSE: tl.constexpr, PV_FP8: tl.constexpr, USE_TMA: tl.constexpr,
                         STAGES: tl.constexpr, KG: tl.constexpr, HAS_KV_LENS: tl.constexpr):
    # KG (host: `QuantizedKV.k_groups_per_tile()`): 4 or 1 distinct K scales per key tile -> `_attn_tile_kgroup`
    # (K scale folded into the exp2 FMA); 0 -> `_attn_tile`.
    n_m = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m  # the longest rows first: better tail balance
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    bhk = b * Hkv + h // (Hq // Hkv)
    kh_row0 = bhk * Skv
    vh_row0 = bhk * D
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.maximum(tl.load(kv_lens_ptr + b), 0), Skv)
    else:
        kv_len = Skv

    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    if USE_TMA:
        q_i8 = qi_desc.load([bh * Sq + start_m, 0])
    else:
        q_i8 = tl.load(qi_ptr + (bh * Sq + offs_m)[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < Sq,
                       other=0)
    q_scale = tl.load(qsc_ptr + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    if RETURN_LSE:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=offs_m[:, None] < Sq, other=0.0).to(tl.float32)
        kmean = tl.load(kmean_ptr + bhk * D + offs_d)
        q_kmean = tl.sum(q * kmean[None, :], axis=1)
    qs = q_scale * qk_scale

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)

    if IS_CAUSAL:
        hi = tl.minimum(kv_len, start_m + BM)
        # tiles whose every key is visible to every row of this block (and inside kv_len)
        full_hi = tl.minimum((kv_len // BN) * BN, ((start_m + 1) // BN) * BN)
    else:
        hi = kv_len
        full_hi = (kv_len // BN) * BN
    if KG > 0:
        for start_n in tl.range(0, full_hi, BN, num_stages=STAGES):
            acc, l_i, m_i = _attn_tile_kgroup(acc, l_i, m_i, q_i8, qs, offs_m, start_n, kh_row0, vh_row0, kv_len,
                                              S_PAD, k_ptr, k_desc, ks_ptr, v_ptr, v_desc, D, BM, BN, False,
                                              IS_CAUSAL, PV_FP8, USE_TMA, KG == 4)
        for start_n in range(full_hi, hi, BN):
            acc, l_i, m_i = _attn_tile_kgroup(acc, l_i, m_i, q_i8, qs, offs_m, start_n, kh_row0, vh_row0, kv_len,
                                              S_PAD, k_ptr, k_desc, ks_ptr, v_ptr, v_desc, D, BM, BN, True,
                                              IS_CAUSAL, PV_FP8, USE_TMA, KG == 4)
    else:
        for start_n in tl.range(0, full_hi, BN, num_stages=STAGES):
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q_i8, qs, offs_m, start_n, kh_row0, vh_row0, kv_len, S_PAD,
                                       k_ptr, k_desc, ks_ptr, v_ptr, v_desc, D, BN, False, IS_CAUSAL, PV_FP8,
                                       USE_TMA)
        for start_n in range(full_hi, hi, BN):
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q_i8, qs, offs_m, start_n, kh_row0, vh_row0, kv_len, S_PAD,
                                       k_ptr, k_desc, ks_ptr, v_ptr, v_desc, D, BN, True, IS_CAUSAL, PV_FP8,
                                       USE_TMA)

    vscale = tl.load(vs_ptr + bhk * D + offs_d)
    out = acc / l_i[:, None] * vscale[None, :]
    if HAS_KV_LENS:
        out = tl.where(l_i[:, None] > 0, out, 0.0)  # an entry with no keys: zero rows (0/0 otherwise)
    row_ok = offs_m < Sq
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = (m_i + tl.math.log2(l_i) - P_OFFSET_LOG2) * LN2 + sm_scale * q_kmean
        tl.store(lse_ptr + bh * Sq + offs_m, lse, mask=row_ok)
