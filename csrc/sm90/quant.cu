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
constexpr int kQuantThreads = 256;  // 8 warps; each warp owns 16 consecutive token rows

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&x)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value) {
      const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&w[i]);
      const float2 f = __bfloat1622float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    } else {
      const __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      const float2 f = __half22float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
}

// max that keeps NaN (fmaxf drops it): a NaN input makes its group's / channel's scale NaN, so it reaches the
// output instead of being quantized to a finite value (the reference's amax propagates NaN the same way).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b); }

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round-to-nearest-even to int8 in [-127, 127] of x / scale; 0 when scale == 0 (as int8.py).
__device__ __forceinline__ int quant_int8(float x, float scale) {
  if (scale == 0.f) return 0;
  const int q = __float2int_rn(__fdiv_rn(x, scale));
  return max(-127, min(127, q));
}

__device__ __forceinline__ uint32_t pack4_i8(int a, int b, int c, int d) {
  return (uint32_t)(a & 0xFF) | ((uint32_t)(b & 0xFF) << 8) | ((uint32_t)(c & 0xFF) << 16) | ((uint32_t)(d & 0xFF) << 24);
}

// ------------------------------ launch 1: partial K sums, V amax ------------------------------
template <int D, typename T>
__global__ void __launch_bounds__(kStatsThreads) kv_stats_kernel(QuantArgs a) {
  constexpr int LPR = D / 8;                 // threads per token row (8 channels each)
  constexpr int RPI = kStatsThreads / LPR;   // rows per iteration
  __shared__ float s_sum[RPI][D + 1];
  __shared__ float s_amax[RPI][D + 1];
  const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int c8 = threadIdx.x % LPR, r = threadIdx.x / LPR;
  const int len = a.s.chunk_len();
  const int t_begin = chunk * len, t_end = min(a.s.Skv, t_begin + len);
  const T* kp = static_cast<const T*>(a.k) + (int64_t)b * a.k_sb + (int64_t)h * a.k_sh + c8 * 8;
  const T* vp = static_cast<const T*>(a.v) + (int64_t)b * a.v_sb + (int64_t)h * a.v_sh + c8 * 8;
  float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0}, amax[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int t = t_begin + r; t < t_end; t += RPI) {
    float xk[8], xv[8];
    load8(kp + (int64_t)t * a.k_ss, xk);
    load8(vp + (int64_t)t * a.v_ss, xv);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      sum[i] += xk[i];
      amax[i] = nan_max(amax[i], fabsf(xv[i]));
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
      mx = nan_max(mx, s_amax[i][threadIdx.x]);
    }
    const int64_t o = ((int64_t)(b * a.s.Hkv + h) * a.s.n_chunks() + chunk) * D + threadIdx.x;
    a.partial_ksum[o] = tot;
    a.partial_vamax[o] = mx;
  }
}

// Reduces the partials of kv head (b, h) into s_out[D]: mean of K (is_mean) or V amax / 448.
template <int D>
__device__ void reduce_partials(const QuantArgs& a, int b, int h, bool is_mean, float* s_out) {
  if (threadIdx.x < D) {
    const int nc = a.s.n_chunks();
    const float* src = (is_mean ? a.partial_ksum : a.partial_vamax) + (int64_t)(b * a.s.Hkv + h) * nc * D + threadIdx.x;
    float acc = 0.f;
    for (int c = 0; c < nc; ++c) acc = is_mean ? acc + src[(int64_t)c * D] : nan_max(acc, src[(int64_t)c * D]);
    s_out[threadIdx.x] = is_mean ? acc / (float)a.s.Skv : acc / 448.f;
  }
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

// ------------------------------ launch 2: Q / K / V quantization ------------------------------
template <int D, typename T>
__device__ void quant_q_block(const QuantArgs& a, int idx, float* s_kmean, float* s_row_amax) {
  constexpr int LPR = D / 8, RPP = 32 / LPR, PASSES = 16 / RPP;
  const int tiles_per_head = a.s.n_qgroups() / 8 * 16 / kQuantQRows;  // tiles of 128 tokens
  const int tile = idx % tiles_per_head, bh = idx / tiles_per_head;
  const int b = bh / a.s.Hq, h = bh % a.s.Hq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rsub = lane / LPR, c8 = lane % LPR;
  const bool want_kmean = a.q_kmean != nullptr;
  if (want_kmean) {
    reduce_partials<D>(a, b, h / (a.s.Hq / a.s.Hkv), true, s_kmean);
    __syncthreads();
  }
  const T* qp = static_cast<const T*>(a.q) + (int64_t)b * a.q_sb + (int64_t)h * a.q_sh + c8 * 8;
  uint4 raw[PASSES];
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int t = tile * kQuantQRows + warp * 16 + ps * RPP + rsub;
    raw[ps] = t < a.s.Sq ? *reinterpret_cast<const uint4*>(qp + (int64_t)t * a.q_ss) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int r = warp * 16 + ps * RPP + rsub;  // row within the 128-token tile
    const int t = tile * kQuantQRows + r;
    float x[8];
    unpack8<T>(raw[ps], x);
    float mx = 0.f, dot = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      mx = nan_max(mx, fabsf(x[i]));
      if (want_kmean) dot += x[i] * s_kmean[c8 * 8 + i];
    }
#pragma unroll
    for (int off = LPR / 2; off > 0; off /= 2) {
      mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      if (want_kmean) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    }
    if (c8 == 0) {
      s_row_amax[r] = mx;
      if (want_kmean && t < a.s.Sq) a.q_kmean[(int64_t)bh * a.s.Sq + t] = dot;
    }
  }
  __syncwarp();
  int8_t* qo = a.q_i8 + (int64_t)bh * a.s.Sq * D + c8 * 8;
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int r = warp * 16 + ps * RPP + rsub;
    const int t = tile * kQuantQRows + r;
    const int base = warp * 16, rr = r - base;
    const float scale = nan_max(s_row_amax[base + rr], s_row_amax[base + (rr ^ 8)]) / 127.f;
    if (t < a.s.Sq) {
      float x[8];
      unpack8<T>(raw[ps], x);
      int qv[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[i] = quant_int8(x[i], scale);
      uint2 o;
      o.x = pack4_i8(qv[0], qv[1], qv[2], qv[3]);
      o.y = pack4_i8(qv[4], qv[5], qv[6], qv[7]);
      *reinterpret_cast<uint2*>(qo + (int64_t)t * D) = o;
    }
  }
  if (lane < 8) {
    const int base = warp * 16;
    const float scale = nan_max(s_row_amax[base + lane], s_row_amax[base + lane + 8]) / 127.f;
    a.q_scale[(int64_t)bh * a.s.n_qgroups() + (tile * kQuantQRows + base) / 16 * 8 + lane] = scale;
  }
}

template <int D, typename T>
__device__ void quant_k_block(const QuantArgs& a, int idx, float* s_kmean, float* s_row_amax) {
  constexpr int LPR = D / 8, RPP = 32 / LPR, PASSES = 16 / RPP;
  __shared__ float s_gscale[4];
  const int nt = a.s.n_ktiles();
  const int tile = idx % nt, bh = idx / nt;
  const int b = bh / a.s.Hkv, h = bh % a.s.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rsub = lane / LPR, c8 = lane % LPR;
  const T* kp = static_cast<const T*>(a.k) + (int64_t)b * a.k_sb + (int64_t)h * a.k_sh + c8 * 8;
  // Raw 16-byte rows stay in registers (4 regs per pass); issue all loads before the mean reduction.
  uint4 raw[PASSES];
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int t = tile * kCtaK + warp * 16 + ps * RPP + rsub;
    raw[ps] = t < a.s.Skv ? *reinterpret_cast<const uint4*>(kp + (int64_t)t * a.k_ss) : make_uint4(0, 0, 0, 0);
  }
  reduce_partials<D>(a, b, h, true, s_kmean);
  __syncthreads();
  if (tile == 0 && threadIdx.x < D) a.k_mean[(int64_t)bh * D + threadIdx.x] = s_kmean[threadIdx.x];
  float mean[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) mean[i] = s_kmean[c8 * 8 + i];
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int r = warp * 16 + ps * RPP + rsub;
    const int t = tile * kCtaK + r;
    float x[8];
    unpack8<T>(raw[ps], x);
    float mx = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) mx = nan_max(mx, fabsf(__fsub_rn(x[i], mean[i])));
#pragma unroll
    for (int off = LPR / 2; off > 0; off /= 2) mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (c8 == 0) s_row_amax[r] = t < a.s.Skv ? mx : 0.f;  // padding rows (0 - mean) must not count
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    const int j = threadIdx.x;  // group j: tokens with (t % 8) // 2 == j
    float mx = 0.f;
    for (int r8 = 0; r8 < kCtaK; r8 += 8) mx = nan_max(mx, nan_max(s_row_amax[r8 + 2 * j], s_row_amax[r8 + 2 * j + 1]));
    const float scale = mx / 127.f;
    s_gscale[j] = scale;
    a.k_scale[(int64_t)bh * nt * 4 + tile * 4 + j] = scale;
  }
  __syncthreads();
  int8_t* ko = a.k_i8 + (int64_t)bh * a.s.Skv * D + c8 * 8;
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int r = warp * 16 + ps * RPP + rsub;
    const int t = tile * kCtaK + r;
    if (t < a.s.Skv) {
      const float scale = s_gscale[(r % 8) / 2];
      float x[8];
      unpack8<T>(raw[ps], x);
      int qv[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[i] = quant_int8(__fsub_rn(x[i], mean[i]), scale);
      uint2 o;
      o.x = pack4_i8(qv[0], qv[1], qv[2], qv[3]);
      o.y = pack4_i8(qv[4], qv[5], qv[6], qv[7]);
      *reinterpret_cast<uint2*>(ko + (int64_t)t * D) = o;
    }
  }
}

// Token at permuted position p (0..15) of a 16-token group: [0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15].
__device__ __forceinline__ constexpr int perm_token(int p) { return (p >> 2) * 2 + (p & 1) + ((p & 2) ? 8 : 0); }

// V tile [128 tokens, D] -> smem (coalesced 16-byte loads), then each thread emits 32 consecutive output
// bytes (permuted tokens) of one channel: conflict-free column reads, full 32-byte sectors written.
template <int D, typename T>
__device__ void quant_v_block(const QuantArgs& a, int idx, float* s_vscale, T* s_tile) {
  constexpr int LPR = D / 8, RPP = kQuantThreads / LPR;
  const int nt = a.s.n_ktiles();
  const int tile = idx % nt, bh = idx / nt;
  const int b = bh / a.s.Hkv, h = bh % a.s.Hkv;
  const int c8 = threadIdx.x % LPR, rsub = threadIdx.x / LPR;
  const T* vp = static_cast<const T*>(a.v) + (int64_t)b * a.v_sb + (int64_t)h * a.v_sh + c8 * 8;
#pragma unroll 4
  for (int r = rsub; r < kCtaK; r += RPP) {
    const int t = tile * kCtaK + r;
    const uint4 raw = t < a.s.Skv ? *reinterpret_cast<const uint4*>(vp + (int64_t)t * a.v_ss) : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(s_tile + r * D + c8 * 8) = raw;
  }
  reduce_partials<D>(a, b, h, false, s_vscale);
  __syncthreads();
  if (tile == 0 && threadIdx.x < D) a.v_scale[(int64_t)bh * D + threadIdx.x] = s_vscale[threadIdx.x];
  uint8_t* vo = a.v_t + (int64_t)bh * D * a.s.skv_pad() + (int64_t)tile * kCtaK;
  constexpr int kChunks = D * (kCtaK / 32);  // (channel, 32-token chunk) pairs
  for (int i = threadIdx.x; i < kChunks; i += kQuantThreads) {
    const int c = i % D, chunk = i / D;
    const float sc = s_vscale[c];
    uint32_t w[8];
#pragma unroll
    for (int q4 = 0; q4 < 8; ++q4) {  // 4 output bytes per word
      float x[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int p = q4 * 4 + e;  // position within the 32-token chunk
        const int r = chunk * 32 + (p & ~15) + perm_token(p & 15);
        const float val = to_float(s_tile[r * D + c]);
        x[e] = (sc == 0.f || tile * kCtaK + r >= a.s.Skv) ? 0.f : __fdiv_rn(val, sc);
      }
      w[q4] = pack_e4m3x4(x[0], x[1], x[2], x[3]);
    }
    uint4* dst = reinterpret_cast<uint4*>(vo + (int64_t)c * a.s.skv_pad() + chunk * 32);
    dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
    dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

template <int D, typename T>
__global__ void __launch_bounds__(kQuantThreads, 2) quantize_qkv_kernel(QuantArgs a, int n_q_blocks, int n_k_blocks) {
  __shared__ float s_vec[D];
  __shared__ float s_row_amax[kCtaK];
  __shared__ __align__(16) T s_tile[kCtaK * D];
  const int idx = blockIdx.x;
  if (idx < n_q_blocks) {
    quant_q_block<D, T>(a, idx, s_vec, s_row_amax);
  } else if (idx < n_q_blocks + n_k_blocks) {
    quant_k_block<D, T>(a, idx - n_q_blocks, s_vec, s_row_amax);
  } else {
    quant_v_block<D, T>(a, idx - n_q_blocks - n_k_blocks, s_vec, s_tile);
  }
}

template <int D, typename T>
cudaError_t launch_quantize_typed(const QuantArgs& a, cudaStream_t stream) {
  const QuantShapes& s = a.s;
  dim3 stats_grid(s.n_chunks(), s.Hkv, s.B);
  kv_stats_kernel<D, T><<<stats_grid, kStatsThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t n_q = (int64_t)s.B * s.Hq * (s.n_qgroups() / 8 * 16 / kQuantQRows);
  const int64_t n_k = (int64_t)s.B * s.Hkv * s.n_ktiles();
  const int64_t total = n_q + 2 * n_k;
  if (total >= (int64_t)1 << 31) return cudaErrorInvalidValue;
  quantize_qkv_kernel<D, T><<<(unsigned)total, kQuantThreads, 0, stream>>>(a, (int)n_q, (int)n_k);
  return cudaGetLastError();
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
