// SageAttention2++-numerics forward attention for Hopper (sm_90a): INT8 QK^T and FP8 (E4M3) PV on wgmma.
//
// One CTA = 128 query rows of one (batch, query head), 3 warpgroups:
//   warpgroup 0: producer. One thread issues TMA loads of Q once and of K / V^T tiles into a kStages-deep
//                shared-memory ring (full / empty mbarriers per stage; K and V have separate barriers so
//                QK^T can start before V lands). It gives its registers away (setmaxnreg.dec).
//   warpgroups 1, 2: consumers, 64 query rows each. Per 128-key tile: S = Q K^T (s8 wgmma, smem x smem),
//                dequantize with one Q scale per thread and one K scale per thread (the "per_thread"
//                groups match the accumulator layout), online softmax in the log2 domain with the fixed
//                +8.807 offset, P -> e4m3 in registers, O_tile = P [V | 1] (e4m3 wgmma, A from registers,
//                N = D + 8: eight rows of ones under V^T in shared memory make the tensor core return the
//                row sums of the e4m3 P with the tile, so the softmax adds no row sums itself),
//                acc = acc * alpha + O_tile, l = l * alpha + rowsum (two-level fp32 accumulation).
//                Each consumer is software-pipelined by one tile (the softmax of tile j+1 runs while its
//                O_j = P_j V_j is on the tensor cores); at hd64 the two consumers also take turns on the
//                exponentials (ping-pong on the MUFU): see consumer_loop.
// P stays in registers because V^T's tokens were permuted [0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15] within
// each 16-token group by the quantization kernel: the accumulator columns a thread holds then line up
// with the A-fragment k positions it must supply.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "common/ptx_sm90.cuh"
#include "common/store_pair.cuh"
#include "common/wgmma_ops.cuh"
#include "sm90/api.h"

// Phase-timeline hooks for kernel work: SAGE3_TRACE(cw, tile, point) records clock64() only in the standalone
// harness tools/sm90_attn_trace.cu built with -DSAGE3_SM90_TRACE=1 -Itools; everywhere else it is empty.
#if defined(SAGE3_SM90_TRACE) && SAGE3_SM90_TRACE
#include "sm90_trace.cuh"
#else
#define SAGE3_TRACE(cw, tile, point) \
  do {                               \
  } while (0)
#endif

namespace sage3::sm90 {

constexpr float kPOffsetLog2 = 8.807f;  // exp2 offset: the row max maps to ~447.8 <= 448 (E4M3 max)
constexpr float kLn2 = 0.69314718055994531f;

// The two consumer warpgroups can take turns on the exponentials of a tile (the MUFU-bound part of the
// softmax: 16 exp2/clk/SM, as much time as the tile's two GEMMs on the tensor cores), so their exp2 phases
// alternate instead of competing. Warpgroup cw waits on named barrier 1 + cw for its turn and hands over on
// 2 - cw. Whether it pays depends on the head dim (AttnTraits::kExpTurn).
template <bool kTurn>
__device__ __forceinline__ void exp_turn_wait(int cw) {
  if constexpr (kTurn) named_barrier_sync(1 + cw, 256);
}
template <bool kTurn>
__device__ __forceinline__ void exp_turn_handover(int cw) {
  if constexpr (kTurn) named_barrier_arrive(2 - cw, 256);
}
// ptxas moves arithmetic freely across bar.sync / bar.arrive, but not memory operations: storing a value to
// shared memory right before a named barrier keeps the work that produced it on its side of the barrier.
template <bool kTurn>
__device__ __forceinline__ void pin_before_barrier(float* slot, float value) {
  if constexpr (kTurn) st_shared_f32(slot, value);
}

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
  const int* kv_lens;   // KV_LENS kernels: [B] valid keys per batch entry (keys >= kv_lens[b] are masked)
};

template <int D>
struct AttnTraits {
  static constexpr int kQkSwizzle = D == 128 ? 128 : 64;  // Q/K smem rows are D int8 bytes
  static constexpr int kVSwizzle = 128;                   // V^T smem rows are 128 tokens of e4m3
  // Depth of the K / V^T shared-memory ring: 2 stages leave the tensor cores waiting on TMA (15-30% slower),
  // 4 measure the same as 3 and take more shared memory.
  static constexpr int kStages = 3;
  static constexpr int kQBytes = kCtaQ * D;
  static constexpr int kKBytes = kCtaK * D;
  static constexpr int kVRows = D + 8;                 // V^T rows in a stage: D channels, then 8 rows of ones
  static constexpr int kVBytes = kVRows * kCtaK;       // stage stride of the V^T ring
  static constexpr int kVLoadBytes = D * kCtaK;        // what TMA writes per stage (the ones stay)
  static constexpr int kPvN = D + 8;                   // N of the PV wgmma; column D of its output is the row sum
  static constexpr int kBarrierBytes = 256;
  static constexpr int kPinBytes = 256 * 4;  // one float per consumer thread, see pin_before_barrier
  static constexpr int kSmemBytes =
      1024 /*alignment slack*/ + kQBytes + kStages * (kKBytes + kVBytes) + kBarrierBytes + kPinBytes;
  static constexpr int kThreads = 384;
  // Turns on the exponentials (exp_turn_wait), measured with the kernel alone: at hd64 they gain ~5%, at hd128
  // (twice the tensor-core work per exponential) the handovers cost 3-10%.
  static constexpr bool kExpTurn = D == 64;
};

// O (+)= P [V | 1]^T for one 32-key step (N = D + 8); kFirst starts a fresh accumulator (write-only registers,
// see gen_wgmma.py).
template <int D, bool kFirst>
__device__ __forceinline__ void pv_wgmma(float (&o)[D / 2 + 4], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (D == 128) {
    if constexpr (kFirst) wgmma_m64n136k32_f32_e4m3_rs_zero(o, a, desc); else wgmma_m64n136k32_f32_e4m3_rs(o, a, desc, 1);
  } else {
    if constexpr (kFirst) wgmma_m64n72k32_f32_e4m3_rs_zero(o, a, desc); else wgmma_m64n72k32_f32_e4m3_rs(o, a, desc, 1);
  }
}

// Output rows q0 .. q0 + kCtaQ - 1 of (b, hq) for a batch entry with no keys: zeros, and LSE -inf.
template <int D, bool RETURN_LSE, typename OutT>
__device__ __forceinline__ void write_empty_rows(const AttnParams& p, int q0, int hq, int b) {
  OutT* out = static_cast<OutT*>(p.out) + (int64_t)b * p.o_sb + (int64_t)hq * p.o_sh;
  for (int i = threadIdx.x; i < kCtaQ * (D / 2); i += blockDim.x) {
    const int row = q0 + i / (D / 2), col = 2 * (i % (D / 2));
    if (row < p.Sq) store_pair<OutT>(out + (int64_t)row * p.o_ss + col, 0.f, 0.f);
  }
  if constexpr (RETURN_LSE) {
    for (int r = threadIdx.x; r < kCtaQ; r += blockDim.x)
      if (q0 + r < p.Sq) p.lse[(int64_t)(b * p.Hq + hq) * p.Sq + q0 + r] = -INFINITY;
  }
}

template <int D, bool CAUSAL, bool RETURN_LSE, bool KV_LENS, typename OutT>
__device__ __forceinline__ void consumer_loop(const AttnParams& p, uint8_t* s_q, uint8_t* s_k, uint8_t* s_v,
                                              const float* s_kscale, float* s_pin, uint64_t* q_full, uint64_t* k_full, uint64_t* v_full,
                                              uint64_t* k_empty, uint64_t* v_empty, int q0, int hq, int b, int hkv,
                                              int n_tiles, int kv_len, int wg);

template <int D, bool CAUSAL, bool RETURN_LSE, bool KV_LENS, typename OutT>
__global__ void __launch_bounds__(384, 1)
    attn_int8_fp8_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                         const __grid_constant__ CUtensorMap tm_v, const AttnParams p) {
  using T = AttnTraits<D>;
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
  // [S][4]: the K-group scales of the tile in each stage, after the 1 + 4S barriers (17 at S = 4).
  float* s_kscale = reinterpret_cast<float*>(bars + 20);
  static_assert(20 * 8 + S * 16 <= T::kBarrierBytes && 1 + 4 * S <= 20, "barriers and K scales overlap");
  float* s_pin = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(bars) + T::kBarrierBytes);  // [256]

  const int q_tile = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;  // causal: longest rows first
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int q0 = q_tile * kCtaQ;
  // Keys this CTA attends to: all Skv, or the first kv_lens[b] (clamped to [0, Skv]) of its batch entry.
  const int kv_len = KV_LENS ? max(0, min(p.Skv, __ldg(p.kv_lens + b))) : p.Skv;
  int n_tiles = KV_LENS ? ceil_div(kv_len, kCtaK) : p.n_ktiles;
  if (CAUSAL) n_tiles = min(n_tiles, q_tile + 1);  // top-left causal: keys <= q0 + 127
  if (KV_LENS && n_tiles == 0) {
    // No keys at all (kv_lens[b] <= 0): the output rows are zeros and their LSE is -inf (a softmax over no
    // keys); the CTA leaves before any barrier or TMA is set up.
    write_empty_rows<D, RETURN_LSE, OutT>(p, q0, hq, b);
    return;
  }

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
  // The rows of ones under each V^T stage (e4m3 1.0 = 0x38; the 128B swizzle permutes 16-byte chunks within a
  // row, so a row of equal bytes needs none). TMA never writes them; made visible to wgmma (async proxy) here.
  for (int i = threadIdx.x; i < S * 8 * kCtaK / 16; i += blockDim.x) {
    const int s = i / (8 * kCtaK / 16), c = i % (8 * kCtaK / 16);
    st_shared_splat_u32x4(s_v + s * T::kVBytes + T::kVLoadBytes + 16 * c, 0x38383838u);
  }
  fence_proxy_async_smem();
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
        mbar_arrive_expect_tx(&v_full[s], T::kVLoadBytes);
        tma_load_4d(s_v + s * T::kVBytes, &tm_v, &v_full[s], j * kCtaK, 0, hkv, b);
        st_shared_f32x4(s_kscale + 4 * s, ks);
        mbar_arrive(&k_full[s]);  // release: the store above is visible to whoever waits on k_full[s]
      }
    }
  } else {
    setmaxnreg_inc<240>();
    consumer_loop<D, CAUSAL, RETURN_LSE, KV_LENS, OutT>(p, s_q, s_k, s_v, s_kscale, s_pin + (threadIdx.x - 128), q_full, k_full, v_full, k_empty,
                                                           v_empty, q0, hq, b, hkv, n_tiles, kv_len, wg);
  }
}

template <int D, bool CAUSAL, bool RETURN_LSE, bool KV_LENS, typename OutT>
__device__ __forceinline__ void consumer_loop(const AttnParams& p, uint8_t* s_q, uint8_t* s_k, uint8_t* s_v,
                                              const float* s_kscale, float* s_pin, uint64_t* q_full, uint64_t* k_full, uint64_t* v_full,
                                              uint64_t* k_empty, uint64_t* v_empty, int q0, int hq, int b, int hkv,
                                              int n_tiles, int kv_len, int wg) {
  using T = AttnTraits<D>;
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
  float l_a = 0.f, l_b = 0.f;              // row sums of the e4m3 P (whole rows: from the PV wgmma's ones columns)
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;

  mbar_wait(q_full, 0);

  int32_t sacc[64];
  float k_sc_next;  // K-group scale (group (t%8)//2 == tg of this thread's columns) of the tile last issued
  auto issue_qk = [&](int j) {
    const int s = j % S;
    mbar_wait(&k_full[s], (j / S) & 1);
    k_sc_next = ld_shared_f32(s_kscale + 4 * s + tg);  // read before this stage's k_empty arrival (which releases it)
    wgmma_fence();
    const uint64_t k_desc = desc_advance(k_desc0, s * T::kKBytes);
    wgmma_m64n128k32_s32_s8_ss_zero(sacc, q_desc, k_desc);
#pragma unroll
    for (int kk = 1; kk < D / 32; ++kk)
      wgmma_m64n128k32_s32_s8_ss(sacc, desc_advance(q_desc, kk * 32), desc_advance(k_desc, kk * 32), 1);
    wgmma_commit();
  };
  // S_j has landed in sacc: fence its registers against the wgmma and release K stage j.
  auto s_landed = [&](int j) {
#pragma unroll
    for (int i = 0; i < 64; ++i) reg_fence(sacc[i]);
    __syncwarp();
    if (lane == 0) mbar_arrive(&k_empty[j % S]);
  };

  // Softmax of tile j (scores in sacc, K-group scale k_sc): updates m, leaves P~_j = exp2(...) in sf (fp32) and
  // the factor alpha = exp2(m_{j-1} - m_j) that rescales acc and l before O_j and its row sums are added.
  auto softmax = [&](const int j, const float k_sc, float (&sf)[64], float& alpha_a, float& alpha_b) {
    SAGE3_TRACE(cw, j, kTraceStepStart);
    // ---- row max on the integer scores ----
    // One positive scale per thread (its Q group x its K group), so this thread's max of t = s * qk_scale
    // is its integer max times qk_scale, exactly (rounding is monotone): VIMNMX3 takes two scores per
    // instruction, and no score is dequantized before the max.
    const float qk_scale = q_scaled * k_sc;  // (the reference rounds (s*q)*k; one product: <= 1 ulp of t)
    const int kv0 = j * kCtaK;
    // Causal: with kCtaK == kCtaQ only the tile on the CTA's own diagonal (kv0 == q0) has keys after a row. The
    // tests use offsets from q0 (warp-uniform) and the thread's row within the CTA (from the thread index), not
    // row_a / wg_row0, so no extra value stays live across the tile loop (240-register budget): +5% causal.
    static_assert(kCtaK == kCtaQ, "causal masking assumes square tiles");
    const bool need_mask = (kv0 + kCtaK > kv_len) || (CAUSAL && kv0 >= q0);
    auto masked = [&](int i, int e) {
      const int col = kv0 + 8 * i + 2 * tg + (e & 1);
      const int lrow = ((threadIdx.x - 128) >> 5) * 16 + ((threadIdx.x & 31) >> 2);  // row_a - q0
      return col >= kv_len || (CAUSAL && col - q0 > (e < 2 ? lrow : lrow + 8));
    };
    // Four independent VIMNMX3 chains per row (then combined), so the dependent chain is 4 + 2 deep, not 16.
    int ma[4] = {INT_MIN, INT_MIN, INT_MIN, INT_MIN}, mb[4] = {INT_MIN, INT_MIN, INT_MIN, INT_MIN};
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        ma[i % 4] = __vimax3_s32(ma[i % 4], masked(i, 0) ? INT_MIN : sacc[4 * i], masked(i, 1) ? INT_MIN : sacc[4 * i + 1]);
        mb[i % 4] = __vimax3_s32(mb[i % 4], masked(i, 2) ? INT_MIN : sacc[4 * i + 2], masked(i, 3) ? INT_MIN : sacc[4 * i + 3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        ma[i % 4] = __vimax3_s32(ma[i % 4], sacc[4 * i], sacc[4 * i + 1]);
        mb[i % 4] = __vimax3_s32(mb[i % 4], sacc[4 * i + 2], sacc[4 * i + 3]);
      }
    }
    const int imx_a = __vimax3_s32(__vimax3_s32(ma[0], ma[1], ma[2]), ma[3], INT_MIN);
    const int imx_b = __vimax3_s32(__vimax3_s32(mb[0], mb[1], mb[2]), mb[3], INT_MIN);
    // int -> fp32 is exact (|s| <= 127*127*128 < 2^24); on sm_90 it is I2FP, an ALU op (not the MUFU/XU
    // pipe that exp2 saturates), and one instruction where the magic-number trick needed two.
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
    alpha_a = exp2_approx(m_a - ms_a);
    alpha_b = exp2_approx(m_b - ms_b);
    m_a = mx_a;
    m_b = mx_b;
    // P~ = exp2(t - m + 8.807) = exp2(s * qk_scale + bias): dequantization and both constants in one FFMA
    // (one rounding where the reference rounds t, then t - m: within 1 ulp of the argument).
    const float bias_a = kPOffsetLog2 - ms_a, bias_b = kPOffsetLog2 - ms_b;
    SAGE3_TRACE(cw, j, kTraceMaxDone);
    pin_before_barrier<T::kExpTurn>(s_pin, bias_a + bias_b);  // the row max is done before the turn is taken
    exp_turn_wait<T::kExpTurn>(cw);
    SAGE3_TRACE(cw, j, kTraceTurnAcquired);
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
#pragma unroll
    for (int i = 0; i < 64; ++i) sf[i] = exp2_approx(sf[i]);
    if constexpr (T::kExpTurn) {
      // Every exp2 of the tile is done before the hand-over: pinned by a store of the XOR of their bits (the row
      // sums come from the PV wgmma, so nothing else consumes every exp2 here). A second packing of P or an
      // integer max as the pin, or no pin at all (ptxas then hands over after the first MUFU), measure 1-15%
      // slower.
      uint32_t x = 0;
#pragma unroll
      for (int i = 0; i < 64; i += 2) x ^= __float_as_uint(sf[i]) ^ __float_as_uint(sf[i + 1]);
      pin_before_barrier<T::kExpTurn>(s_pin, __uint_as_float(x));
    }
    exp_turn_handover<T::kExpTurn>(cw);

    SAGE3_TRACE(cw, j, kTraceSoftmaxDone);
  };
  // P -> e4m3 A fragments: k-step kk covers accumulator column blocks 4kk..4kk+3.
  auto pack_p = [&](const float (&sf)[64], uint32_t (&pa)[4][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int i0 = 4 * (4 * kk), i1 = 4 * (4 * kk + 1), i2 = 4 * (4 * kk + 2), i3 = 4 * (4 * kk + 3);
      pa[kk][0] = pack_e4m3x4(sf[i0 + 0], sf[i0 + 1], sf[i1 + 0], sf[i1 + 1]);
      pa[kk][1] = pack_e4m3x4(sf[i0 + 2], sf[i0 + 3], sf[i1 + 2], sf[i1 + 3]);
      pa[kk][2] = pack_e4m3x4(sf[i2 + 0], sf[i2 + 1], sf[i3 + 0], sf[i3 + 1]);
      pa[kk][3] = pack_e4m3x4(sf[i2 + 2], sf[i2 + 3], sf[i3 + 2], sf[i3 + 3]);
    }
  };

  // O_j = P_j V_j into a fresh fp32 accumulator (the first level of the two-level accumulation).
  auto issue_pv = [&](const int j, const uint32_t (&pa)[4][4], float (&o)[T::kPvN / 2]) {
    const int s = j % S;
    mbar_wait(&v_full[s], (j / S) & 1);
    wgmma_fence();
    const uint64_t v_desc = desc_advance(v_desc0, s * T::kVBytes);
    pv_wgmma<D, true>(o, pa[0], v_desc);
#pragma unroll
    for (int kk = 1; kk < 4; ++kk) pv_wgmma<D, false>(o, pa[kk], desc_advance(v_desc, kk * 32));
    wgmma_commit();
  };
  // O_j has landed: release V stage j (and P_j's registers), then acc = acc * alpha_j + O_j and
  // l = l * alpha_j + rowsum(P_j) (output column D, the first ones column: o[D/2] row a, o[D/2 + 2] row b).
  auto add_pv = [&](const int j, float (&o)[T::kPvN / 2], uint32_t (&pa)[4][4], float alpha_a, float alpha_b) {
#pragma unroll
    for (int i = 0; i < T::kPvN / 2; ++i) reg_fence(o[i]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) reg_fence(pa[kk][r]);
    __syncwarp();
    if (lane == 0) mbar_arrive(&v_empty[j % S]);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      acc[4 * i + 0] = acc[4 * i + 0] * alpha_a + o[4 * i + 0];
      acc[4 * i + 1] = acc[4 * i + 1] * alpha_a + o[4 * i + 1];
      acc[4 * i + 2] = acc[4 * i + 2] * alpha_b + o[4 * i + 2];
      acc[4 * i + 3] = acc[4 * i + 3] * alpha_b + o[4 * i + 3];
    }
    l_a = l_a * alpha_a + o[D / 2];
    l_b = l_b * alpha_b + o[D / 2 + 2];
  };

  // Schedule per consumer warpgroup, software-pipelined by one tile (FlashAttention-3's intra-warpgroup overlap):
  //   issue S_{j+1} = Q K_{j+1}^T and O_j = P_j V_j; wait for S_{j+1} only; softmax of tile j+1 (its
  //   exponentials in this warpgroup's turn at hd64, see exp_turn_wait) while O_j is on the tensor cores; then wait
  //   for O_j, fold it into acc and pack P_{j+1}.
  // P_{j+1} is packed into the A-fragment registers only after O_j has landed (until then the wgmma reads P_j
  // from those registers; softmax(j+1) leaves its values in fp32), so one register set holds P. (A second
  // set plus a copy lets ptxas coalesce the two and serialize every wgmma, C7513; two sets without a copy,
  // i.e. the loop unrolled by two, spill at the 240-register budget.)
  uint32_t pa[4][4];
  float alpha_a, alpha_b;  // rescale of acc for the pending O_j
  issue_qk(0);
  if (cw == 1) exp_turn_handover<T::kExpTurn>(cw);  // warpgroup 0 takes the first turn
  wgmma_wait<0>();
  s_landed(0);
  {
    float sf[64];
    softmax(0, k_sc_next, sf, alpha_a, alpha_b);
    pack_p(sf, pa);
  }
  // The last tile is peeled: an asm that writes sacc under a run-time branch makes ptxas serialize the wgmma
  // pipeline (register merges at the join).
  for (int j = 0; j + 1 < n_tiles; ++j) {
    float o[T::kPvN / 2];
    SAGE3_TRACE(cw, j, kTraceIssueStart);
    issue_qk(j + 1);
    issue_pv(j, pa, o);
    SAGE3_TRACE(cw, j, kTraceIssueDone);
    wgmma_wait<1>();  // S_{j+1}; O_j may still run
    SAGE3_TRACE(cw, j, kTraceNextScoresLanded);
    s_landed(j + 1);
    float sf[64], alpha_next_a, alpha_next_b;
    softmax(j + 1, k_sc_next, sf, alpha_next_a, alpha_next_b);
    wgmma_wait<0>();  // O_j
    add_pv(j, o, pa, alpha_a, alpha_b);
    pack_p(sf, pa);
    SAGE3_TRACE(cw, j, kTraceStepEnd);
    alpha_a = alpha_next_a;
    alpha_b = alpha_next_b;
  }
  {
    const int j = n_tiles - 1;
    float o[T::kPvN / 2];
    issue_pv(j, pa, o);
    wgmma_wait<0>();
    add_pv(j, o, pa, alpha_a, alpha_b);
  }
  // Warpgroup 1 handed over once before its first turn (so warpgroup 0 could start): warpgroup 0 takes that
  // extra hand-over here, so no barrier is left with a pending arrival.
  if (cw == 0) exp_turn_wait<T::kExpTurn>(cw);
  // ------------------------------ epilogue ------------------------------
  // V channel scales of this thread's columns, all loaded before any store (the compiler cannot move a
  // load above a store it might alias, which serialized 16 global-load latencies here).
  const float2* vs = reinterpret_cast<const float2*>(p.v_scale + (int64_t)(b * p.Hkv + hkv) * D);
  float2 v_sc_pairs[D / 8];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) v_sc_pairs[i] = vs[4 * i + tg];

  OutT* out = static_cast<OutT*>(p.out) + (int64_t)b * p.o_sb + (int64_t)hq * p.o_sh;
  const bool ok_a = row_a < p.Sq, ok_b = row_b < p.Sq;
  // One IEEE division per row, then multiplies (a division per element compiled to a MUFU.RCP + Newton + slow-path
  // branch each: ~10 instructions x D/2 per thread in the epilogue).
  const float inv_l_a = 1.f / l_a, inv_l_b = 1.f / l_b;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = 8 * i + 2 * tg;
    const float2 v_sc = v_sc_pairs[i];
    if (ok_a) store_pair<OutT>(out + (int64_t)row_a * p.o_ss + col, acc[4 * i] * inv_l_a * v_sc.x, acc[4 * i + 1] * inv_l_a * v_sc.y);
    if (ok_b) store_pair<OutT>(out + (int64_t)row_b * p.o_ss + col, acc[4 * i + 2] * inv_l_b * v_sc.x, acc[4 * i + 3] * inv_l_b * v_sc.y);
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

template <int D, bool CAUSAL, bool LSE, bool KV_LENS, typename OutT>
cudaError_t launch_attn_variant(const AttnArgs& a, cudaStream_t stream, const CUtensorMap& tq, const CUtensorMap& tk,
                                const CUtensorMap& tv, const AttnParams& prm) {
  using T = AttnTraits<D>;
  auto kernel = attn_int8_fp8_kernel<D, CAUSAL, LSE, KV_LENS, OutT>;
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
  prm.kv_lens = a.kv_lens;
  const bool kv_lens = a.kv_lens != nullptr;
#define SAGE3_LAUNCH_T(C, L, KL)                                                                  \
  return a.out_bf16 ? launch_attn_variant<D, C, L, KL, __nv_bfloat16>(a, stream, tq, tk, tv, prm) \
                    : launch_attn_variant<D, C, L, KL, __half>(a, stream, tq, tk, tv, prm)
#define SAGE3_LAUNCH(C, L)                       \
  if (kv_lens) { SAGE3_LAUNCH_T(C, L, true); } \
  SAGE3_LAUNCH_T(C, L, false)
  if (a.causal) {
    if (lse) { SAGE3_LAUNCH(true, true); } else { SAGE3_LAUNCH(true, false); }
  } else {
    if (lse) { SAGE3_LAUNCH(false, true); } else { SAGE3_LAUNCH(false, false); }
  }
#undef SAGE3_LAUNCH
#undef SAGE3_LAUNCH_T
}

}  // namespace sage3::sm90
