// SageAttention2++-numerics forward attention for Hopper (sm_90a): INT8 QK^T and FP8 (E4M3) PV on wgmma.
//
// One CTA = 128 query rows of one (batch, query head), 3 warpgroups:
//   warpgroup 0: producer. One thread issues TMA loads of Q once and of K / V^T tiles into a STAGES-deep
//                shared-memory ring (full / empty mbarriers per stage; K and V have separate barriers so
//                QK^T can start before V lands). It gives its registers away (setmaxnreg.dec).
//   warpgroups 1, 2: consumers, 64 query rows each. Per 128-key tile: S = Q K^T (s8 wgmma, smem x smem),
//                dequantize with one Q scale per thread and one K scale per thread (the "per_thread"
//                groups match the accumulator layout), online softmax in the log2 domain with the fixed
//                +8.807 offset, P -> e4m3 in registers, O_tile = P V (e4m3 wgmma, A from registers),
//                acc = acc * alpha + O_tile (two-level fp32 accumulation).
// P stays in registers because V^T's tokens were permuted [0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15] within
// each 16-token group by the quantization kernel: the accumulator columns a thread holds then line up
// with the A-fragment k positions it must supply.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdlib>
#include <type_traits>

#include "common/ptx_sm90.cuh"
#include "common/store_pair.cuh"
#include "common/wgmma_ops.cuh"
#include "sm90/api.h"
#include "sm90/trace.cuh"

namespace sage3::sm90 {

constexpr float kPOffsetLog2 = 8.807f;  // exp2 offset: the row max maps to ~447.8 <= 448 (E4M3 max)
constexpr float kLn2 = 0.69314718055994531f;

struct AttnParams {
  const float* q_scale;
  const float* k_scale;
  const float* v_scale;
  const float* q_kmean;
  void* out;
  int64_t o_sb, o_sh, o_ss;
  float* lse;
  int Hq, Hkv, Sq, Skv;
  int n_qgroups, n_ktiles;
  float sm_scale;       // natural-log domain scale (LSE correction term)
  float sm_scale_log2;  // float(sm_scale * log2(e)), as the reference rounds it
};

template <int D, int STAGES>
struct AttnTraits {
  static constexpr int kQkSwizzle = D == 128 ? 128 : 64;  // Q/K smem rows are D int8 bytes
  static constexpr int kVSwizzle = 128;                   // V^T smem rows are 128 tokens of e4m3
  static constexpr int kStages = STAGES;  // depth of the K / V^T shared-memory ring
  static constexpr int kQBytes = kCtaQ * D;
  static constexpr int kKBytes = kCtaK * D;
  static constexpr int kVBytes = D * kCtaK;
  static constexpr int kBarrierBytes = 256;
  static constexpr int kSmemBytes = 1024 /*alignment slack*/ + kQBytes + kStages * (kKBytes + kVBytes) + kBarrierBytes;
  static constexpr int kThreads = 384;
};

template <int D>
__device__ __forceinline__ void pv_wgmma(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t desc, int scale_d) {
  if constexpr (D == 128) {
    wgmma_m64n128k32_f32_e4m3_rs(o, a, desc, scale_d);
  } else {
    wgmma_m64n64k32_f32_e4m3_rs(o, a, desc, scale_d);
  }
}

template <int D, int STAGES, bool CAUSAL, bool RETURN_LSE, typename OutT>
__device__ __forceinline__ void consumer_loop(const AttnParams& p, uint8_t* s_q, uint8_t* s_k, uint8_t* s_v,
                                              const float* s_kscale, uint64_t* q_full, uint64_t* k_full, uint64_t* v_full,
                                              uint64_t* k_empty, uint64_t* v_empty, int q0, int hq, int b, int hkv,
                                              int n_tiles, int wg);

template <int D, int STAGES, bool CAUSAL, bool RETURN_LSE, typename OutT>
__global__ void __launch_bounds__(384, 1)
    attn_int8_fp8_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                         const __grid_constant__ CUtensorMap tm_v, const AttnParams p) {
  using T = AttnTraits<D, STAGES>;
  constexpr int S = T::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* s_q = smem;
  uint8_t* s_k = s_q + T::kQBytes;
  uint8_t* s_v = s_k + S * T::kKBytes;
  uint64_t* bars = reinterpret_cast<uint64_t*>(s_v + S * T::kVBytes);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;
  uint64_t* v_full = k_full + S;
  uint64_t* k_empty = v_full + S;
  uint64_t* v_empty = k_empty + S;
  float* s_kscale = reinterpret_cast<float*>(bars + 16);  // [S][4]: the K-group scales of the tile in each stage

  const int q_tile = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;  // causal: longest rows first
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int q0 = q_tile * kCtaQ;
  int n_tiles = p.n_ktiles;
  if (CAUSAL) n_tiles = min(n_tiles, q_tile + 1);  // top-left causal: keys <= q0 + 127

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      mbar_init(&k_full[s], 2);  // TMA transaction arrival + the K-scale store
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], 8);  // one arrival per consumer warp
      mbar_init(&v_empty[s], 8);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ------------------------------ producer ------------------------------
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      tma_prefetch_desc(&tm_q);
      tma_prefetch_desc(&tm_k);
      tma_prefetch_desc(&tm_v);
      mbar_arrive_expect_tx(q_full, T::kQBytes);
      tma_load_4d(s_q, &tm_q, q_full, 0, q0, hq, b);
      const float4* k_scale_tiles =
          reinterpret_cast<const float4*>(p.k_scale + (int64_t)(b * p.Hkv + hkv) * p.n_ktiles * 4);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % S;
        const uint32_t empty_parity = ((j / S) + 1) & 1;  // phase (j/S - 1) of the empty barrier
        // The tile's 4 K-group scales travel through the ring with K (k_full's second arrival), so the
        // consumers read them from shared memory instead of waiting on a global load every tile.
        const float4 ks = k_scale_tiles[j];
        if (j >= S) mbar_wait(&k_empty[s], empty_parity);
        mbar_arrive_expect_tx(&k_full[s], T::kKBytes);
        tma_load_4d(s_k + s * T::kKBytes, &tm_k, &k_full[s], 0, j * kCtaK, hkv, b);
        if (j >= S) mbar_wait(&v_empty[s], empty_parity);
        mbar_arrive_expect_tx(&v_full[s], T::kVBytes);
        tma_load_4d(s_v + s * T::kVBytes, &tm_v, &v_full[s], j * kCtaK, 0, hkv, b);
        st_shared_f32x4(s_kscale + 4 * s, ks);
        mbar_arrive(&k_full[s]);  // release: the store above is visible to whoever waits on k_full[s]
      }
    }
  } else {
    setmaxnreg_inc<240>();
    consumer_loop<D, STAGES, CAUSAL, RETURN_LSE, OutT>(p, s_q, s_k, s_v, s_kscale, q_full, k_full, v_full, k_empty,
                                                           v_empty, q0, hq, b, hkv, n_tiles, wg);
  }
}

template <int D, int STAGES, bool CAUSAL, bool RETURN_LSE, typename OutT>
__device__ __forceinline__ void consumer_loop(const AttnParams& p, uint8_t* s_q, uint8_t* s_k, uint8_t* s_v,
                                              const float* s_kscale, uint64_t* q_full, uint64_t* k_full, uint64_t* v_full,
                                              uint64_t* k_empty, uint64_t* v_empty, int q0, int hq, int b, int hkv,
                                              int n_tiles, int wg) {
  using T = AttnTraits<D, STAGES>;
  constexpr int S = T::kStages;
  // ------------------------------ consumers ------------------------------
  const int cw = wg - 1;               // consumer warpgroup: rows q0 + 64*cw ...
  const int t = threadIdx.x % 128;
  const int warp = t / 32, lane = t % 32;
  const int g = lane / 4, tg = lane % 4;
  const int wg_row0 = q0 + cw * 64;
  const int row_a = wg_row0 + warp * 16 + g;  // accumulator rows of this thread: row_a and row_a + 8
  const int row_b = row_a + 8;

  // Q group (t//16)*8 + t%8 of rows row_a and row_b: one scale per thread.
  const float q_scaled =
      p.q_scale[(int64_t)(b * p.Hq + hq) * p.n_qgroups + (wg_row0 / 16 + warp) * 8 + g] * p.sm_scale_log2;

  // Shared-memory descriptors are computed once; inside the loop a stage / k-step offset is one 64-bit add
  // on the start-address field (addresses < 256 KB, so the 14-bit field never carries).
  const uint64_t q_desc = make_smem_desc<T::kQkSwizzle>(smem_addr(s_q + cw * 64 * D));
  const uint64_t k_desc0 = make_smem_desc<T::kQkSwizzle>(smem_addr(s_k));
  const uint64_t v_desc0 = make_smem_desc<T::kVSwizzle>(smem_addr(s_v));

  float m_a = -INFINITY, m_b = -INFINITY;  // running row max (log2 domain)
  float l_a = 0.f, l_b = 0.f;              // this thread's share of the row sums
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;

  mbar_wait(q_full, 0);

  // Pipelined per warpgroup: while the softmax of tile j runs on the CUDA cores, the tensor cores compute
  // S_{j+1} = Q K_{j+1}^T; then P_j V_j is issued and both are awaited together.
  int32_t sacc[64];
  float k_sc_next;  // K-group scale (group (t%8)//2 == tg of this thread's columns) of the tile last issued
  auto issue_qk = [&](int j) {
    const int s = j % S;
    mbar_wait(&k_full[s], (j / S) & 1);
    k_sc_next = ld_shared_f32(s_kscale + 4 * s + tg);  // read before this stage's k_empty arrival (which releases it)
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
      wgmma_m64n128k32_s32_s8_ss(sacc, desc_advance(q_desc, kk * 32),
                                 desc_advance(k_desc0, s * T::kKBytes + kk * 32), kk > 0);
    }
    wgmma_commit();
  };
  issue_qk(0);
  // Ping-pong: the two consumer warpgroups take turns issuing their tensor-core work (named barriers 1 and
  // 2), so one warpgroup's softmax runs while the other's GEMMs occupy the tensor cores.
  if (cw == 1) named_barrier_arrive(1, 256);  // warpgroup 0 goes first
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 64; ++i) reg_fence(sacc[i]);
  __syncwarp();
  if (lane == 0) mbar_arrive(&k_empty[0]);

  // has_next is a compile-time constant: an asm that writes sacc under a run-time branch makes ptxas
  // serialize the wgmma pipeline (register merges at the join), so the last tile is peeled.
  auto step = [&](const int j, auto has_next_c) {
    constexpr bool has_next = decltype(has_next_c)::value;
    const int s = j % S;
    const float k_sc = k_sc_next;  // before issue_qk(j + 1) overwrites it

    SAGE3_TRACE(cw, j, kTraceStepStart);
    // ---- row max on the integer scores ----
    // One positive scale per thread (its Q group x its K group), so this thread's max of t = s * qk_scale
    // is its integer max times qk_scale, exactly (rounding is monotone): VIMNMX3 takes two scores per
    // instruction, and no score is dequantized before the max.
    const float qk_scale = q_scaled * k_sc;  // (the reference rounds (s*q)*k; one product: <= 1 ulp of t)
    const int kv0 = j * kCtaK;
    const bool need_mask = (kv0 + kCtaK > p.Skv) || (CAUSAL && kv0 + kCtaK - 1 > wg_row0);
    auto masked = [&](int i, int e) {
      const int col = kv0 + 8 * i + 2 * tg + (e & 1);
      return col >= p.Skv || (CAUSAL && col > (e < 2 ? row_a : row_b));
    };
    int imx_a = INT_MIN, imx_b = INT_MIN;
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        imx_a = __vimax3_s32(imx_a, masked(i, 0) ? INT_MIN : sacc[4 * i], masked(i, 1) ? INT_MIN : sacc[4 * i + 1]);
        imx_b = __vimax3_s32(imx_b, masked(i, 2) ? INT_MIN : sacc[4 * i + 2], masked(i, 3) ? INT_MIN : sacc[4 * i + 3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        imx_a = __vimax3_s32(imx_a, sacc[4 * i], sacc[4 * i + 1]);
        imx_b = __vimax3_s32(imx_b, sacc[4 * i + 2], sacc[4 * i + 3]);
      }
    }
    // int -> fp32 is exact (|s| <= 127*127*128 < 2^24); on sm_90 it is I2FP, an ALU op (not the MUFU/XU
    // pipe that exp2 saturates), and one instruction where the magic-number trick needed two.
    float sf[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) sf[i] = __int2float_rn(sacc[i]);

    // All-masked (INT_MIN) thread rows contribute -inf, as a masked score does in the reference.
    float mx_a = fmaxf(m_a, imx_a == INT_MIN ? -INFINITY : __int2float_rn(imx_a) * qk_scale);
    float mx_b = fmaxf(m_b, imx_b == INT_MIN ? -INFINITY : __int2float_rn(imx_b) * qk_scale);
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    // Rows that have seen only masked keys keep m = -inf; their P and alpha are 0 (as the reference).
    const float ms_a = mx_a == -INFINITY ? 0.f : mx_a;
    const float ms_b = mx_b == -INFINITY ? 0.f : mx_b;
    const float alpha_a = exp2_approx(m_a - ms_a);
    const float alpha_b = exp2_approx(m_b - ms_b);
    m_a = mx_a;
    m_b = mx_b;
    // P~ = exp2(t - m + 8.807) = exp2(s * qk_scale + bias): dequantization and both constants in one FFMA
    // (one rounding where the reference rounds t, then t - m: within 1 ulp of the argument).
    const float bias_a = kPOffsetLog2 - ms_a, bias_b = kPOffsetLog2 - ms_b;
    SAGE3_TRACE(cw, j, kTraceMaxDone);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      sf[4 * i + 0] = fmaf(sf[4 * i + 0], qk_scale, bias_a);
      sf[4 * i + 1] = fmaf(sf[4 * i + 1], qk_scale, bias_a);
      sf[4 * i + 2] = fmaf(sf[4 * i + 2], qk_scale, bias_b);
      sf[4 * i + 3] = fmaf(sf[4 * i + 3], qk_scale, bias_b);
    }
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (masked(i, e)) sf[4 * i + e] = -INFINITY;
    }
    float ps_a = 0.f, ps_b = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      sf[4 * i + 0] = exp2_approx(sf[4 * i + 0]);
      sf[4 * i + 1] = exp2_approx(sf[4 * i + 1]);
      sf[4 * i + 2] = exp2_approx(sf[4 * i + 2]);
      sf[4 * i + 3] = exp2_approx(sf[4 * i + 3]);
      ps_a += sf[4 * i + 0] + sf[4 * i + 1];
      ps_b += sf[4 * i + 2] + sf[4 * i + 3];
    }
    l_a = l_a * alpha_a + ps_a;
    l_b = l_b * alpha_b + ps_b;

    // ---- P -> e4m3 A fragments: k-step kk covers accumulator column blocks 4kk..4kk+3 ----
    uint32_t pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int i0 = 4 * (4 * kk), i1 = 4 * (4 * kk + 1), i2 = 4 * (4 * kk + 2), i3 = 4 * (4 * kk + 3);
      pa[kk][0] = pack_e4m3x4(sf[i0 + 0], sf[i0 + 1], sf[i1 + 0], sf[i1 + 1]);
      pa[kk][1] = pack_e4m3x4(sf[i0 + 2], sf[i0 + 3], sf[i1 + 2], sf[i1 + 3]);
      pa[kk][2] = pack_e4m3x4(sf[i2 + 0], sf[i2 + 1], sf[i3 + 0], sf[i3 + 1]);
      pa[kk][3] = pack_e4m3x4(sf[i2 + 2], sf[i2 + 3], sf[i3 + 2], sf[i3 + 3]);
    }

    SAGE3_TRACE(cw, j, kTraceSoftmaxDone);
    // ---- O_tile = P V (fresh fp32 accumulator), then acc = acc * alpha + O_tile ----
    // Issued 64 output channels at a time so only 32 accumulator registers are live next to S_{j+1}.
    auto add_half = [&](const float (&o)[32], int half) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int ai = 4 * (8 * half + i);
        acc[ai + 0] = acc[ai + 0] * alpha_a + o[4 * i + 0];
        acc[ai + 1] = acc[ai + 1] * alpha_a + o[4 * i + 1];
        acc[ai + 2] = acc[ai + 2] * alpha_b + o[4 * i + 2];
        acc[ai + 3] = acc[ai + 3] * alpha_b + o[4 * i + 3];
      }
    };
    auto issue_pv_half = [&](float (&o)[32], int half) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        wgmma_m64n64k32_f32_e4m3_rs(
            o, pa[kk], desc_advance(v_desc0, s * T::kVBytes + half * 64 * kCtaK + kk * 32), kk > 0);
      }
      wgmma_commit();
    };
    // Ping-pong turn: S_{j+1} = Q K_{j+1}^T and PV half 0, then the tensor cores go to the other warpgroup
    // (warpgroup 1 skips its last hand-over, which warpgroup 0 would never wait for: it got one extra at the
    // start). Half 1 is issued after half 0 has landed, outside the turn.
    named_barrier_sync(1 + cw, 256);
    SAGE3_TRACE(cw, j, kTraceTurnAcquired);
    if constexpr (has_next) issue_qk(j + 1);
    mbar_wait(&v_full[s], (j / S) & 1);
#pragma unroll
    for (int half = 0; half < D / 64; ++half) {
      float o[32];
      issue_pv_half(o, half);
      if (half == 0 && (has_next || cw == 0)) named_barrier_arrive(2 - cw, 256);
      if (half == 0) SAGE3_TRACE(cw, j, kTraceTurnReleased);
      wgmma_wait<0>();  // (first half: also S_{j+1}, committed earlier)
      if (half == 0) SAGE3_TRACE(cw, j, kTraceFirstWaitDone);
#pragma unroll
      for (int i = 0; i < 32; ++i) reg_fence(o[i]);
      if (half == 0) {
#pragma unroll
        for (int i = 0; i < 64; ++i) reg_fence(sacc[i]);
        __syncwarp();
        if (lane == 0 && has_next) mbar_arrive(&k_empty[(j + 1) % S]);
      }
      if (half == D / 64 - 1) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) reg_fence(pa[kk][r]);
        __syncwarp();
        if (lane == 0) mbar_arrive(&v_empty[s]);
      }
      add_half(o, half);
    }
    SAGE3_TRACE(cw, j, kTraceStepEnd);
  };
  for (int j = 0; j + 1 < n_tiles; ++j) step(j, std::true_type{});
  step(n_tiles - 1, std::false_type{});

  // ------------------------------ epilogue ------------------------------
  // V channel scales of this thread's columns, all loaded before any store (the compiler cannot move a
  // load above a store it might alias, which serialized 16 global-load latencies here).
  const float2* vs = reinterpret_cast<const float2*>(p.v_scale + (int64_t)(b * p.Hkv + hkv) * D);
  float2 v_sc_pairs[D / 8];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) v_sc_pairs[i] = vs[4 * i + tg];
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);

  OutT* out = static_cast<OutT*>(p.out) + (int64_t)b * p.o_sb + (int64_t)hq * p.o_sh;
  const bool ok_a = row_a < p.Sq, ok_b = row_b < p.Sq;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = 8 * i + 2 * tg;
    const float2 v_sc = v_sc_pairs[i];
    if (ok_a) store_pair<OutT>(out + (int64_t)row_a * p.o_ss + col, acc[4 * i] / l_a * v_sc.x, acc[4 * i + 1] / l_a * v_sc.y);
    if (ok_b) store_pair<OutT>(out + (int64_t)row_b * p.o_ss + col, acc[4 * i + 2] / l_b * v_sc.x, acc[4 * i + 3] / l_b * v_sc.y);
  }
  if constexpr (RETURN_LSE) {
    if (tg == 0) {
      const int64_t base = (int64_t)(b * p.Hq + hq) * p.Sq;
      if (ok_a) p.lse[base + row_a] = (m_a + log2f(l_a) - kPOffsetLog2) * kLn2 + p.sm_scale * p.q_kmean[base + row_a];
      if (ok_b) p.lse[base + row_b] = (m_b + log2f(l_b) - kPOffsetLog2) * kLn2 + p.sm_scale * p.q_kmean[base + row_b];
    }
  }
}

// ------------------------------ host side ------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn get_encode_tiled() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiledFn>(nullptr);
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// 4-D uint8 map over a contiguous [d3, d2, d1, d0] tensor, box {box0, box1, 1, 1}.
inline bool make_map_4d(CUtensorMap* map, const void* base, uint64_t d0, uint64_t d1, uint64_t d2, uint64_t d3,
                        uint32_t box0, uint32_t box1, CUtensorMapSwizzle swizzle) {
  EncodeTiledFn encode = get_encode_tiled();
  if (!encode) return false;
  cuuint64_t dims[4] = {d0, d1, d2, d3};
  cuuint64_t strides[3] = {d0, d0 * d1, d0 * d1 * d2};  // bytes, dims 1..3
  cuuint32_t box[4] = {box0, box1, 1, 1};
  cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void*>(base), dims, strides, box,
                      elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

template <int D, int STAGES, bool CAUSAL, bool LSE, typename OutT>
cudaError_t launch_attn_variant(const AttnArgs& a, cudaStream_t stream, const CUtensorMap& tq, const CUtensorMap& tk,
                                const CUtensorMap& tv, const AttnParams& prm) {
  using T = AttnTraits<D, STAGES>;
  auto kernel = attn_int8_fp8_kernel<D, STAGES, CAUSAL, LSE, OutT>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (e != cudaSuccess) return e;
  dim3 grid(ceil_div(a.s.Sq, kCtaQ), a.s.Hq, a.s.B);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(tq, tk, tv, prm);
  return cudaGetLastError();
}

template <int D>
cudaError_t launch_attn(const AttnArgs& a, cudaStream_t stream, const char** err) {
  const QuantShapes& s = a.s;
  if (s.D != D || s.Hkv <= 0 || s.Hq % s.Hkv != 0 || s.Sq <= 0 || s.Skv <= 0) {
    *err = "sm90 attention: bad shapes (need D matching the kernel, Hq % Hkv == 0, Sq >= 1, Skv >= 1)";
    return cudaErrorInvalidValue;
  }
  if (s.B > 65535 || s.Hq > 65535) {
    *err = "sm90 attention: batch and heads must be <= 65535";
    return cudaErrorInvalidValue;
  }
  constexpr CUtensorMapSwizzle qk_swz = D == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  CUtensorMap tq, tk, tv;
  bool ok = make_map_4d(&tq, a.q_i8, D, s.Sq, s.Hq, s.B, D, kCtaQ, qk_swz) &&
            make_map_4d(&tk, a.k_i8, D, s.Skv, s.Hkv, s.B, D, kCtaK, qk_swz) &&
            make_map_4d(&tv, a.v_t, s.skv_pad(), D, s.Hkv, s.B, kCtaK, D, CU_TENSOR_MAP_SWIZZLE_128B);
  if (!ok) {
    *err = "sm90 attention: cuTensorMapEncodeTiled failed (driver entry point missing or bad tensor geometry)";
    return cudaErrorInvalidValue;
  }
  AttnParams prm;
  prm.q_scale = a.q_scale;
  prm.k_scale = a.k_scale;
  prm.v_scale = a.v_scale;
  prm.q_kmean = a.q_kmean;
  prm.out = a.out;
  prm.o_sb = a.o_sb;
  prm.o_sh = a.o_sh;
  prm.o_ss = a.o_ss;
  prm.lse = a.lse;
  prm.Hq = s.Hq;
  prm.Hkv = s.Hkv;
  prm.Sq = s.Sq;
  prm.Skv = s.Skv;
  prm.n_qgroups = s.n_qgroups();
  prm.n_ktiles = s.n_ktiles();
  prm.sm_scale = static_cast<float>(a.sm_scale);
  prm.sm_scale_log2 = static_cast<float>(a.sm_scale * 1.4426950408889634);
  const bool lse = a.return_lse;
  if (lse && (a.lse == nullptr || a.q_kmean == nullptr)) {
    *err = "sm90 attention: return_lse needs lse and q_kmean buffers";
    return cudaErrorInvalidValue;
  }
  // K/V ring depth: 3 stages (measured fastest on H200, device run 4); SAGE3_SM90_STAGES=2 or 4 for A/B timing.
  const char* st_env = std::getenv("SAGE3_SM90_STAGES");
  const int stages = st_env && (st_env[0] == '2' || st_env[0] == '4') ? st_env[0] - '0' : 3;
#define SAGE3_LAUNCH_T(ST, C, L)                                                              \
  return a.out_bf16 ? launch_attn_variant<D, ST, C, L, __nv_bfloat16>(a, stream, tq, tk, tv, prm) \
                    : launch_attn_variant<D, ST, C, L, __half>(a, stream, tq, tk, tv, prm)
#define SAGE3_LAUNCH(C, L)                     \
  if (stages == 2) { SAGE3_LAUNCH_T(2, C, L); } \
  if (stages == 4) { SAGE3_LAUNCH_T(4, C, L); } \
  SAGE3_LAUNCH_T(3, C, L)
  if (a.causal) {
    if (lse) { SAGE3_LAUNCH(true, true); } else { SAGE3_LAUNCH(true, false); }
  } else {
    if (lse) { SAGE3_LAUNCH(false, true); } else { SAGE3_LAUNCH(false, false); }
  }
#undef SAGE3_LAUNCH
#undef SAGE3_LAUNCH_T
}

}  // namespace sage3::sm90
