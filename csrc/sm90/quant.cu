// Quantization kernels feeding the sm90 attention (SageAttention2++ numerics, see
// sage3_diffusers/numerics/sage2pp_reference.py). Two launches:
//   1. kv_stats: per (batch, kv head, token chunk) partial K sums and V |max| per channel.
//   2. quantize_qkv: one grid with three kinds of blocks:
//      Q blocks (64 tokens): INT8 with one scale per "per_thread" group (t//16)*8 + t%8, RNE rounding;
//                            optionally q . k_mean per token (the LSE correction).
//      K blocks (128 tokens): K - mean (mean reduced from the partials), INT8 with 4 groups per 128-token
//                            tile: group (t%8)//2.
//      V blocks (128 tokens): E4M3 per channel (scale = channel amax / 448), transposed to [D, tokens] and
//                            tokens permuted [0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15] in each 16-token group.
// Inputs are read in the caller's layout (any batch/head/token strides, channels contiguous).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/ptx_sm90.cuh"
#include "sm90/api.h"

namespace sage3::sm90 {
namespace {

constexpr int kStatsThreads = 256;

// Round-to-nearest-even to int8 in [-127, 127] of x / scale; 0 when scale == 0 (as int8.py).
__device__ __forceinline__ int quant_int8(float x, float scale) {
  if (scale == 0.f) return 0;
  const int q = __float2int_rn(__fdiv_rn(x, scale));
  return max(-127, min(127, q));
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&x)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    } else {
      f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    }
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Token at permuted position p (0..15) of a 16-token group: [0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15].
__device__ __forceinline__ constexpr int perm_token(int p) { return (p >> 2) * 2 + (p & 1) + ((p & 2) ? 8 : 0); }

// Performance notes (the outputs are fixed by the reference; these choices only change speed):
//   * every block stages its 128-token tile into shared memory with cp.async (no registers held by loads in
//     flight), then reads it twice (amax pass, quantize pass): ~40-48 registers, 4-5 blocks per SM, so an SM
//     keeps loads in flight while other blocks compute.
//   * the exact division x / scale (IEEE RNE, then RNE to int8) of Q and K takes a reciprocal fast path with an
//     exactness test; the few elements the test cannot prove fall back to __fdiv_rn (proof at quant_i8x8). V
//     (e4m3) brackets the quotient between two products and divides exactly only where the bracket straddles an
//     e4m3 rounding boundary (proof at e4m3_bracket).
//   * kv_stats keeps 4 token rows of K and V in flight per thread (summation order fixed: see kv_stats_kernel).
//   * the K/V blocks run first, in reverse (batch, head) order, so they start on what kv_stats read last (L2).

constexpr int kThreads = 256;

// NaN-propagating max in one instruction (FMNMX.NAN); same result as nan_max (canonical NaN 0x7fffffff) on the
// non-negative values it is used for here.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
constexpr int kUnroll = 4;  // kv_stats: token rows per thread in flight

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  // src-size 0 zero-fills the 16 bytes (padding rows read as +0).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem), "r"(pred ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Tile rows [t0, t0 + kCtaK) of one head -> s_tile[kCtaK][D] (rows >= n_valid zero-filled).
template <int D, typename T>
__device__ __forceinline__ void stage_tile(T* s_tile, const T* base, int64_t ss, int t0, int n_valid) {
  constexpr int CPR = D / 8;                      // 16-byte chunks per row
  constexpr int ITER = kCtaK * CPR / kThreads;    // 8 (D=128) or 4 (D=64) copies per thread
#pragma unroll
  for (int i = 0; i < ITER; ++i) {
    const int idx = i * kThreads + threadIdx.x;
    const int r = idx / CPR, c = idx % CPR;
    const bool ok = r < n_valid;
    cp_async16(s_tile + r * D + c * 8, ok ? base + (int64_t)(t0 + r) * ss + c * 8 : base, ok);
  }
}

// Reciprocal used by the INT8 (Q, K) fast path, or NaN where it is not allowed (scale 0, subnormal, huge, inf,
// NaN): NaN makes the exactness test in quant_i8x8 fail, so those groups take the exact __fdiv_rn path.
__device__ __forceinline__ float fast_rcp(float scale) {
  return (scale >= 0x1p-126f && scale <= 0x1p126f) ? __frcp_rn(scale) : __int_as_float(0x7fffffff);
}

// Eight values -> eight int8 = clamp(rne(__fdiv_rn(x, scale)), -127, 127), packed little-endian.
// Fast path, for rcp = fl(1/scale) with scale in [2^-126, 2^126] and |x| <= amax, scale = fl(amax / 127):
//   p = x * rcp (exact real), |p - x/scale| <= |x/scale| 2^-24 < 2^-17 (|x/scale| <= 127 / (1 - 2^-24)).
//   f = fl(x/scale) (what the reference rounds): |f - x/scale| <= ulp/2 <= 2^-18.
//   t = fl(p + M), M = 1.5 * 2^23: one rounding of the exact FMA on the grid of integers -> t = M + n,
//   n = rne(p), |n| <= 127; so t - M = n exactly and t's low byte is n as int8.
//   d = fl(p - n) (FMA, |p - n| <= 1/2 -> error <= 2^-25). If |d| <= 1/2 - 2^-14 then
//   |f - n| <= 1/2 - 2^-14 + 2^-25 + 2^-17 + 2^-18 < 1/2, so rne(f) = n (and no clamp is needed).
//   Otherwise (about 2^-13 of elements, or rcp NaN) the thread redoes its eight values with __fdiv_rn.
constexpr float kMagic = 12582912.f;          // 1.5 * 2^23
constexpr float kTieLimit = 0.5f - 0x1p-14f;  // exactly representable

__device__ __forceinline__ uint2 quant_i8x8(const float (&x)[8], float scale, float rcp) {
  uint32_t tb[8];
  bool bad[8], any = false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float t = __fmaf_rn(x[i], rcp, kMagic);
    const float n = __fsub_rn(t, kMagic);
    const float d = __fmaf_rn(x[i], rcp, -n);
    bad[i] = !(fabsf(d) <= kTieLimit);
    any |= bad[i];
    tb[i] = __float_as_uint(t);
  }
  // bf16 inputs hit exact ties often (x / scale = k + 1/2 exactly): ~0.4% of elements in a CPU emulation on
  // scaled randn data, so the exact path is taken per element (a warp pays for slot i only if a lane needs it).
  if (__builtin_expect(any, 0)) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (bad[i]) tb[i] = (uint32_t)quant_int8(x[i], scale);  // only the low byte is packed
  }
  const uint32_t w0 = __byte_perm(__byte_perm(tb[0], tb[1], 0x0040), __byte_perm(tb[2], tb[3], 0x0040), 0x5410);
  const uint32_t w1 = __byte_perm(__byte_perm(tb[4], tb[5], 0x0040), __byte_perm(tb[6], tb[7], 0x0040), 0x5410);
  return make_uint2(w0, w1);
}

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    lo = f.x;
    hi = f.y;
  }
}

template <int D>
__device__ __forceinline__ void reduce_partials(const QuantArgs& a, int b, int h, bool is_mean, float* s_out) {
  if (threadIdx.x < D) {
    const int nc = a.s.n_chunks();  // <= 16: all loads issued before the (ordered) reduction
    const float* src = (is_mean ? a.partial_ksum : a.partial_vamax) + (int64_t)(b * a.s.Hkv + h) * nc * D + threadIdx.x;
    float v[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) v[c] = c < nc ? src[(int64_t)c * D] : 0.f;
    float acc = 0.f;
#pragma unroll
    for (int c = 0; c < 16; ++c)
      if (c < nc) acc = is_mean ? acc + v[c] : max_nan(acc, v[c]);
    s_out[threadIdx.x] = is_mean ? acc / (float)a.s.Skv : acc / 448.f;
  }
}

// ------------------------------ launch 1: partial K sums, V amax ------------------------------
template <int D, typename T>
__global__ void __launch_bounds__(kStatsThreads) kv_stats_kernel(QuantArgs a) {
  constexpr int LPR = D / 8;
  constexpr int RPI = kStatsThreads / LPR;
  __shared__ float s_sum[RPI][D + 1];
  __shared__ float s_amax[RPI][D + 1];
  const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int c8 = threadIdx.x % LPR, r = threadIdx.x / LPR;
  const int len = a.s.chunk_len();
  const int t_begin = chunk * len, t_end = min(a.s.Skv, t_begin + len);
  const T* kp = static_cast<const T*>(a.k) + (int64_t)b * a.k_sb + (int64_t)h * a.k_sh + c8 * 8;
  const T* vp = static_cast<const T*>(a.v) + (int64_t)b * a.v_sb + (int64_t)h * a.v_sh + c8 * 8;
  float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0}, amax[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int t0 = t_begin + r; t0 < t_end; t0 += kUnroll * RPI) {
    uint4 rk[kUnroll], rv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first (rows past t_end read as 0 and are skipped below)
      const int t = t0 + u * RPI;
      rk[u] = t < t_end ? *reinterpret_cast<const uint4*>(kp + (int64_t)t * a.k_ss) : make_uint4(0, 0, 0, 0);
      rv[u] = t < t_end ? *reinterpret_cast<const uint4*>(vp + (int64_t)t * a.v_ss) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // fixed token order per thread: t0, t0 + RPI, ...
      if (t0 + u * RPI < t_end) {
        float xk[8], xv[8];
        unpack8<T>(rk[u], xk);
        unpack8<T>(rv[u], xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          sum[i] += xk[i];
          amax[i] = max_nan(amax[i], fabsf(xv[i]));
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    s_sum[r][c8 * 8 + i] = sum[i];
    s_amax[r][c8 * 8 + i] = amax[i];
  }
  __syncthreads();
  if (threadIdx.x < D) {
    float tot = 0.f, mx = 0.f;
    for (int i = 0; i < RPI; ++i) {
      tot += s_sum[i][threadIdx.x];
      mx = max_nan(mx, s_amax[i][threadIdx.x]);
    }
    const int64_t o = ((int64_t)(b * a.s.Hkv + h) * a.s.n_chunks() + chunk) * D + threadIdx.x;
    a.partial_ksum[o] = tot;
    a.partial_vamax[o] = mx;
  }
}

// ------------------------------ launch 2: Q / K / V quantization ------------------------------
struct Smem {
  float vec[kCtaK];      // k_mean (K blocks, Q blocks with q_kmean) or V scales (D <= 128)
  float row_amax[kCtaK];
  float2 grp[kCtaK / 2]; // (scale, fast reciprocal) per Q group (64 per tile) or K group (4)
};

template <int D, typename T>
__device__ void q_block(const QuantArgs& a, int idx, Smem& sm, const T* s_tile) {
  constexpr int LPR = D / 8, RPP = 32 / LPR, PASSES = 16 / RPP;
  const int tiles_per_head = a.s.n_qgroups() / 8 * 16 / kQuantQRows;
  const int tile = idx % tiles_per_head, bh = idx / tiles_per_head;
  const int b = bh / a.s.Hq, h = bh % a.s.Hq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rsub = lane / LPR, c8 = lane % LPR;
  const int t0 = tile * kQuantQRows;
  const bool want_kmean = a.q_kmean != nullptr;
  stage_tile<D, T>(const_cast<T*>(s_tile), static_cast<const T*>(a.q) + (int64_t)b * a.q_sb + (int64_t)h * a.q_sh,
                   a.q_ss, t0, min(kQuantQRows, a.s.Sq - t0));
  if (want_kmean) reduce_partials<D>(a, b, h / (a.s.Hq / a.s.Hkv), true, sm.vec);
  cp_async_wait_all();
  __syncthreads();
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {  // pass 1: row |max| (and q . k_mean)
    const int r = warp * 16 + ps * RPP + rsub;
    const int t = t0 + r;
    float x[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(s_tile + r * D + c8 * 8), x);
    float mx = 0.f, dot = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      mx = max_nan(mx, fabsf(x[i]));
      if (want_kmean) dot += x[i] * sm.vec[c8 * 8 + i];
    }
#pragma unroll
    for (int off = LPR / 2; off > 0; off /= 2) {
      mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      if (want_kmean) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    }
    if (c8 == 0) {
      sm.row_amax[r] = mx;
      if (want_kmean && t < a.s.Sq) a.q_kmean[(int64_t)bh * a.s.Sq + t] = dot;
    }
  }
  __syncwarp();
  if (lane < 8) {  // group lane of this warp's 16 rows: rows lane and lane + 8
    const int base = warp * 16;
    const float scale = max_nan(sm.row_amax[base + lane], sm.row_amax[base + lane + 8]) / 127.f;
    a.q_scale[(int64_t)bh * a.s.n_qgroups() + (t0 + base) / 16 * 8 + lane] = scale;
    sm.grp[warp * 8 + lane] = make_float2(scale, fast_rcp(scale));
  }
  __syncwarp();
  int8_t* qo = a.q_i8 + (int64_t)bh * a.s.Sq * D + c8 * 8;
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {  // pass 2: quantize
    const int r = warp * 16 + ps * RPP + rsub;
    const int t = t0 + r;
    if (t < a.s.Sq) {
      const float2 g = sm.grp[warp * 8 + (r & 7)];
      float x[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(s_tile + r * D + c8 * 8), x);
      *reinterpret_cast<uint2*>(qo + (int64_t)t * D) = quant_i8x8(x, g.x, g.y);
    }
  }
}

template <int D, typename T>
__device__ void k_block(const QuantArgs& a, int kv, Smem& sm, const T* s_tile) {
  constexpr int LPR = D / 8, RPP = 32 / LPR, PASSES = 16 / RPP;
  const int nt = a.s.n_ktiles();
  const int tile = kv % nt, bh = kv / nt;
  const int b = bh / a.s.Hkv, h = bh % a.s.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rsub = lane / LPR, c8 = lane % LPR;
  const int t0 = tile * kCtaK;
  stage_tile<D, T>(const_cast<T*>(s_tile), static_cast<const T*>(a.k) + (int64_t)b * a.k_sb + (int64_t)h * a.k_sh,
                   a.k_ss, t0, min(kCtaK, a.s.Skv - t0));
  reduce_partials<D>(a, b, h, true, sm.vec);
  cp_async_wait_all();
  __syncthreads();
  if (tile == 0 && threadIdx.x < D) a.k_mean[(int64_t)bh * D + threadIdx.x] = sm.vec[threadIdx.x];
  float mean[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) mean[i] = sm.vec[c8 * 8 + i];
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int r = warp * 16 + ps * RPP + rsub;
    float x[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(s_tile + r * D + c8 * 8), x);
    float mx = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) mx = max_nan(mx, fabsf(__fsub_rn(x[i], mean[i])));
#pragma unroll
    for (int off = LPR / 2; off > 0; off /= 2) mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (c8 == 0) sm.row_amax[r] = t0 + r < a.s.Skv ? mx : 0.f;  // padding rows (0 - mean) must not count
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    const int j = threadIdx.x;  // group j: tokens with (t % 8) // 2 == j
    float mx = 0.f;
    for (int r8 = 0; r8 < kCtaK; r8 += 8) mx = max_nan(mx, max_nan(sm.row_amax[r8 + 2 * j], sm.row_amax[r8 + 2 * j + 1]));
    const float scale = mx / 127.f;
    sm.grp[j] = make_float2(scale, fast_rcp(scale));
    a.k_scale[(int64_t)bh * nt * 4 + tile * 4 + j] = scale;
  }
  __syncthreads();
  int8_t* ko = a.k_i8 + (int64_t)bh * a.s.Skv * D + c8 * 8;
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int r = warp * 16 + ps * RPP + rsub;
    const int t = t0 + r;
    if (t < a.s.Skv) {
      const float2 g = sm.grp[(r % 8) / 2];
      float x[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(s_tile + r * D + c8 * 8), x);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = __fsub_rn(x[i], mean[i]);
      *reinterpret_cast<uint2*>(ko + (int64_t)t * D) = quant_i8x8(x, g.x, g.y);
    }
  }
}

// ---- V: e4m3 by bracket ----
// Reciprocal bracket for the V fast path: y = fl(1/scale) and y * (1 -+ 2^-20) rounded, or fast = false where the
// proof's range assumption fails (scale 0, subnormal, huge, inf, NaN).
struct RcpBracket {
  float lo, hi;
  bool fast;
};
__device__ __forceinline__ RcpBracket rcp_bracket(float scale) {
  RcpBracket r;
  r.fast = scale >= 0x1p-120f && scale <= 0x1p120f;  // false for NaN too
  const float y = __frcp_rn(r.fast ? scale : 1.f);
  r.lo = __fmul_rn(y, 1.f - 0x1p-20f);
  r.hi = __fmul_rn(y, 1.f + 0x1p-20f);
  return r;
}

// Exact e4m3(__fdiv_rn(x[e], scale)) of the elements whose byte is set in `redo` (0xff per byte), merged into w;
// elements with bit e of `zero` set give 0x00 (padding token / channel scale 0). Out of line: rarely run, and the
// inlined __fdiv_rn expansions would make the kernel (three block kinds sharing the instruction cache) larger.
__device__ __noinline__ uint32_t e4m3_exact(uint32_t w, uint32_t redo, float x0, float x1, float x2, float x3,
                                            float scale, uint32_t zero) {
  const float x[4] = {x0, x1, x2, x3};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if ((redo >> (8 * e)) & 0xffu) {
      const float q = (zero >> e) & 1u ? 0.f : __fdiv_rn(x[e], scale);
      w = (w & ~(0xffu << (8 * e))) | ((pack_e4m3x4(q, 0.f, 0.f, 0.f) & 0xffu) << (8 * e));
    }
  }
  return w;
}

// Four values -> e4m3(fl(x / scale)) (fl = __fdiv_rn, then RNE to e4m3, satfinite), packed little-endian.
// Let z = x / scale (real), f = fl(z), and y = fl(1/scale) with 2^-120 <= scale <= 2^120 (|y - 1/scale| <= 2^-24 / scale).
// |x| <= amax (the channel's |max|) and scale = fl(amax / 448), so |z| <= 448 (1 + 2^-23): nothing overflows.
//   lo = fl(x * fl(y (1 - 2^-20))), hi = fl(x * fl(y (1 + 2^-20))).
//   If |z| >= 2^-12, every product is normal and each of the four roundings is relative <= 2^-24, so
//   |lo| <= |z| (1 - 2^-20 + 2^-22) < |z| (1 - 2^-24) <= |f| <= |z| (1 + 2^-24) < |z| (1 + 2^-20 - 2^-22) <= |hi|,
//   all with z's sign: f lies between lo and hi. e4m3 rounding (RNE + satfinite) is monotone, so
//   e4m3(lo) == e4m3(hi) implies e4m3(f) == e4m3(lo).
//   If |z| < 2^-12, |lo|, |hi|, |f| < 2^-11 (absolute rounding errors <= 2^-149) are all below the smallest e4m3
//   rounding boundary 2^-10, so all three give the signed zero of x's sign: again e4m3(f) == e4m3(lo).
// Where the bytes differ (an e4m3 tie or near tie inside the 2^-19-wide bracket: exact ties are common with bf16
// data, ~0.6% of elements in a CPU emulation) that element is redone with __fdiv_rn; the warp pays for slot e only
// if some lane needs it.
// Padding tokens are +0 in shared memory -> lo = hi = +0 -> 0x00, the exact path's value.
__device__ __forceinline__ uint32_t e4m3_bracket(const float (&x)[4], const RcpBracket& r, float scale) {
  const uint32_t wl = pack_e4m3x4(__fmul_rn(x[0], r.lo), __fmul_rn(x[1], r.lo), __fmul_rn(x[2], r.lo), __fmul_rn(x[3], r.lo));
  const uint32_t wh = pack_e4m3x4(__fmul_rn(x[0], r.hi), __fmul_rn(x[1], r.hi), __fmul_rn(x[2], r.hi), __fmul_rn(x[3], r.hi));
  if (__builtin_expect(wl != wh, 0)) return e4m3_exact(wl, wl ^ wh, x[0], x[1], x[2], x[3], scale, 0u);
  return wl;
}

// V: each thread owns one channel pair (2c, 2c+1) and 16-token groups; a warp reads 32 consecutive channel pairs
// of one token row (128 contiguous bytes, conflict-free) and writes 16 bytes per channel row. Each value is
// bracketed with two multiplies and only an element whose bracket straddles an e4m3 boundary is divided
// exactly, out of line (e4m3_bracket). Dividing every value with __fdiv_rn inline costs ~25 instructions per
// element (each division in its own branch region is expanded in full); redoing a whole group inline on a
// mismatch is slower too, since bf16 inputs hit exact e4m3 ties in ~0.6% of elements and nearly every warp
// would take it.
template <int D, typename T>
__device__ void v_block(const QuantArgs& a, int kv, Smem& sm, const T* s_tile) {
  constexpr int NP = D / 2;                                 // channel pairs
  constexpr int NG = kCtaK * NP / kThreads / 16;             // 16-token groups per thread: 2 (D=128), 1 (D=64)
  const int nt = a.s.n_ktiles();
  const int tile = kv % nt, bh = kv / nt;
  const int b = bh / a.s.Hkv, h = bh % a.s.Hkv;
  const int t0 = tile * kCtaK;
  stage_tile<D, T>(const_cast<T*>(s_tile), static_cast<const T*>(a.v) + (int64_t)b * a.v_sb + (int64_t)h * a.v_sh,
                   a.v_ss, t0, min(kCtaK, a.s.Skv - t0));
  reduce_partials<D>(a, b, h, false, sm.vec);
  cp_async_wait_all();
  __syncthreads();
  if (tile == 0 && threadIdx.x < D) a.v_scale[(int64_t)bh * D + threadIdx.x] = sm.vec[threadIdx.x];
  const int cp = threadIdx.x % NP, gbase = threadIdx.x / NP * NG;  // channel pair, first 16-token group
  const float sc[2] = {sm.vec[2 * cp], sm.vec[2 * cp + 1]};
  const RcpBracket rb[2] = {rcp_bracket(sc[0]), rcp_bracket(sc[1])};
  const bool fast = rb[0].fast && rb[1].fast;  // per thread; false only for degenerate channels (scale 0, inf, NaN)
  const uint32_t* s_words = reinterpret_cast<const uint32_t*>(s_tile);
  const int64_t pad = a.s.skv_pad();
  // Elements set to 0 instead of divided: channel scale 0, or a padding token (permuted position pos of the
  // 16-token group at tile row r0).
  auto zeroed = [&](int ch, int r0, int pos) { return sc[ch] == 0.f || t0 + r0 + perm_token(pos) >= a.s.Skv; };
  uint8_t* vo = a.v_t + ((int64_t)bh * D + 2 * cp) * pad + t0;
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const int r0 = (gbase + g) * 16;  // first token (tile row) of the group
    uint32_t wv[16];  // raw words (2 channels each), unpacked at use: 16 registers instead of 32
#pragma unroll
    for (int k = 0; k < 16; ++k) wv[k] = s_words[(r0 + k) * NP + cp];
    uint32_t out[2][4];
#pragma unroll
    for (int ch = 0; ch < 2; ++ch) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {  // output word w: positions 4w..4w+3 = tokens perm(4w), ..., perm(4w+3)
        float xv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v0, v1;
          unpack2<T>(wv[perm_token(4 * w + e)], v0, v1);
          xv[e] = ch == 0 ? v0 : v1;
        }
        // The bracket for regular channels; degenerate channels (scale 0, inf, NaN) divide exactly, out of line.
        if (__builtin_expect(fast, 1)) {
          out[ch][w] = e4m3_bracket(xv, rb[ch], sc[ch]);
        } else {
          uint32_t zero = 0;
#pragma unroll
          for (int e = 0; e < 4; ++e) zero |= (uint32_t)zeroed(ch, r0, 4 * w + e) << e;
          out[ch][w] = e4m3_exact(0u, 0xffffffffu, xv[0], xv[1], xv[2], xv[3], sc[ch], zero);
        }
      }
    }
#pragma unroll
    for (int ch = 0; ch < 2; ++ch)
      *reinterpret_cast<uint4*>(vo + ch * pad + r0) = make_uint4(out[ch][0], out[ch][1], out[ch][2], out[ch][3]);
  }
}

// Block order: K and V tiles interleaved, (batch, head) and tiles in reverse (kv_stats ends on the last heads,
// which are then still in L2), then the Q tiles.
// Blocks per SM quantize_qkv is compiled for (register cap 65536 / (256 * blocks)): 5 at D=64 (48 registers, no
// spills; 6-11% faster than 4), 4 at D=128 (5 would spill).
template <int D>
constexpr int kMinBlocks = D == 64 ? 5 : 4;

template <int D, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<D>) quantize_qkv_kernel(QuantArgs a, int n_q_blocks, int n_k_blocks) {
  __shared__ Smem sm;
  __shared__ __align__(16) T s_tile[kCtaK * D];
  const int idx = blockIdx.x;
  if (idx < 2 * n_k_blocks) {
    const int kv = n_k_blocks - 1 - idx / 2;
    if (idx % 2 == 0) k_block<D, T>(a, kv, sm, s_tile);
    else v_block<D, T>(a, kv, sm, s_tile);
  } else {
    q_block<D, T>(a, idx - 2 * n_k_blocks, sm, s_tile);
  }
}

// The two launches separately (tools/sm90_quant_bench.cu times each).
template <int D, typename T>
cudaError_t launch_stats(const QuantArgs& a, cudaStream_t stream) {
  dim3 stats_grid(a.s.n_chunks(), a.s.Hkv, a.s.B);
  kv_stats_kernel<D, T><<<stats_grid, kStatsThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// Block counts of quantize_qkv: Q tiles, K tiles (= V tiles); false if the grid does not fit.
inline bool qkv_blocks(const QuantShapes& s, int& n_q, int& n_k) {
  const int64_t q = (int64_t)s.B * s.Hq * (s.n_qgroups() / 8 * 16 / kQuantQRows);
  const int64_t k = (int64_t)s.B * s.Hkv * s.n_ktiles();
  if (q + 2 * k >= (int64_t)1 << 31) return false;
  n_q = (int)q;
  n_k = (int)k;
  return true;
}

template <int D, typename T>
cudaError_t launch_qkv(const QuantArgs& a, cudaStream_t stream) {
  int n_q, n_k;
  if (!qkv_blocks(a.s, n_q, n_k)) return cudaErrorInvalidValue;
  quantize_qkv_kernel<D, T><<<(unsigned)(n_q + 2 * n_k), kThreads, 0, stream>>>(a, n_q, n_k);
  return cudaGetLastError();
}

template <int D, typename T>
cudaError_t launch_quantize_typed(const QuantArgs& a, cudaStream_t stream) {
  const cudaError_t e = launch_stats<D, T>(a, stream);
  if (e != cudaSuccess) return e;
  return launch_qkv<D, T>(a, stream);
}

}  // namespace

cudaError_t launch_quantize(const QuantArgs& a, cudaStream_t stream) {
  if (a.s.B > 65535 || a.s.Hkv > 65535) return cudaErrorInvalidValue;
  if (a.s.D == 128) {
    return a.bf16 ? launch_quantize_typed<128, __nv_bfloat16>(a, stream) : launch_quantize_typed<128, __half>(a, stream);
  }
  if (a.s.D == 64) {
    return a.bf16 ? launch_quantize_typed<64, __nv_bfloat16>(a, stream) : launch_quantize_typed<64, __half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sage3::sm90
