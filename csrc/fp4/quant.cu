// Fused NVFP4 quantization for SageAttention3: smoothing subtraction, per-tile second-level scale, E4M3 block
// scales, E2M1 codes, packing. Numerics: sage3_diffusers/numerics/sage3_reference.py (sage3_quantize) and
// nvfp4.py; every division is IEEE (__fdiv_rn), never fast-math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/fp4_convert.cuh"
#include "fp4/api.h"

namespace sage3 {
namespace {

constexpr int kQuantThreads = 256;
constexpr float kInv2688 = 1.0f / 2688.0f;  // spec: g = amax * fp32(1/2688), a multiply

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// g = amax / (6*448), 1 for an all-zero tile (spec: second_level_scale).
__device__ __forceinline__ float second_level_scale(float amax) {
  return amax == 0.0f ? 1.0f : __fmul_rn(amax, kInv2688);
}

template <typename T>
__device__ __forceinline__ void load16(const T* src, float out[16]) {
  // 16 elements = 32 bytes, 16-byte aligned when D is a multiple of 16 and rows are 16-byte aligned (checked
  // by the binding); read as two uint4.
  const uint4* p = reinterpret_cast<const uint4*>(src);
  uint4 w[2] = {p[0], p[1]};
  const T* e = reinterpret_cast<const T*>(w);
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = to_float(e[i]);
}

// Block max over 16 values, then block scale and codes (spec quantize_nvfp4 with tensor_scale g).
__device__ __forceinline__ void quantize_block16(const float x[16], float g, uint8_t* codes8, uint8_t* scale1) {
  float bmax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) bmax = fmaxf(bmax, fabsf(x[i]));
  const uint8_t s_bits = e4m3_encode(__fdiv_rn(bmax, __fmul_rn(kE2M1Max, g)));
  const float denom = __fmul_rn(e4m3_decode(s_bits), g);
  uint32_t w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float y[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = denom == 0.0f ? 0.0f : __fdiv_rn(x[8 * h + i], denom);
    w[h] = e2m1x8_pack(y);
  }
  *reinterpret_cast<uint2*>(codes8) = make_uint2(w[0], w[1]);
  *scale1 = s_bits;
}

__device__ __forceinline__ float block_reduce_max(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? smem[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// One CTA per (128-row tile, head, batch).
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(
    const T* __restrict__ x, int64_t sb, int64_t sh, int64_t ss, int H, int S, int D, const float* __restrict__ mean,
    int mean_tiles_per_head, bool mean_per_tile, uint8_t* __restrict__ codes, uint8_t* __restrict__ scales,
    float* __restrict__ tile_scale) {
  __shared__ float red[32];
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n_tiles = gridDim.x, s_pad = n_tiles * kFp4Tile;
  const int blocks_per_row = D / 16;
  const int n_blocks = kFp4Tile * blocks_per_row;
  const T* xh = x + b * sb + h * sh;
  const float* mu = mean + (static_cast<int64_t>(b * H + h) * mean_tiles_per_head + (mean_per_tile ? tile : 0)) * D;

  float amax = 0.0f;
  for (int i = threadIdx.x; i < n_blocks; i += blockDim.x) {
    const int row = tile * kFp4Tile + i / blocks_per_row, col = (i % blocks_per_row) * 16;
    if (row >= S) continue;
    float v[16];
    load16(xh + row * ss + col, v);
#pragma unroll
    for (int e = 0; e < 16; ++e) amax = fmaxf(amax, fabsf(__fsub_rn(v[e], mu[col + e])));
  }
  const float g = second_level_scale(block_reduce_max(amax, red));
  const int64_t head = static_cast<int64_t>(b) * H + h;
  if (threadIdx.x == 0) tile_scale[head * n_tiles + tile] = g;

  for (int i = threadIdx.x; i < n_blocks; i += blockDim.x) {
    const int row = tile * kFp4Tile + i / blocks_per_row, blk = i % blocks_per_row, col = blk * 16;
    uint8_t* c_out = codes + (head * s_pad + row) * (D / 2) + blk * 8;
    uint8_t* s_out = scales + (head * s_pad + row) * blocks_per_row + blk;
    float v[16];
    if (row < S) {
      load16(xh + row * ss + col, v);
#pragma unroll
      for (int e = 0; e < 16; ++e) v[e] = __fsub_rn(v[e], mu[col + e]);
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) v[e] = 0.0f;
    }
    quantize_block16(v, g, c_out, s_out);
  }
}

// One CTA per (128-token tile, head, batch); one thread per channel.
template <typename T>
__global__ void quantize_v_kernel(const T* __restrict__ v, int64_t sb, int64_t sh, int64_t ss, int H, int S, int D,
                                  uint8_t* __restrict__ codes, uint8_t* __restrict__ scales,
                                  float* __restrict__ tile_scale) {
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = threadIdx.x;
  const int n_tiles = gridDim.x, s_pad = n_tiles * kFp4Tile;
  const T* vh = v + b * sb + h * sh + d;
  const int tok0 = tile * kFp4Tile;
  const int n_valid = min(kFp4Tile, S - tok0);
  float amax = 0.0f;
  for (int i = 0; i < n_valid; ++i) amax = fmaxf(amax, fabsf(to_float(vh[(tok0 + i) * ss])));
  const float g = second_level_scale(amax);
  const int64_t head = static_cast<int64_t>(b) * H + h;
  tile_scale[(head * n_tiles + tile) * D + d] = g;
  uint8_t* c_row = codes + (head * D + d) * (s_pad / 2) + tile * (kFp4Tile / 2);
  uint8_t* s_row = scales + (head * D + d) * (s_pad / 16) + tile * (kFp4Tile / 16);
#pragma unroll 1
  for (int blk = 0; blk < kFp4Tile / 16; ++blk) {
    float x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int j = blk * 16 + i;
      x[i] = j < n_valid ? to_float(vh[(tok0 + j) * ss]) : 0.0f;
    }
    quantize_block16(x, g, c_row + blk * 8, s_row + blk);
  }
}

}  // namespace

cudaError_t fp4_quantize_rows(const void* x, Fp4InDtype dtype, int64_t sb, int64_t sh, int64_t ss, int B, int H,
                              int S, int D, const float* mean, int mean_tiles_per_head, bool mean_per_tile,
                              uint8_t* codes, uint8_t* scales, float* tile_scale, cudaStream_t stream) {
  const int n_tiles = (S + kFp4Tile - 1) / kFp4Tile;
  if (n_tiles == 0 || B == 0 || H == 0) return cudaSuccess;
  dim3 grid(n_tiles, H, B);
  if (dtype == Fp4InDtype::kFloat16) {
    quantize_rows_kernel<__half><<<grid, kQuantThreads, 0, stream>>>(
        static_cast<const __half*>(x), sb, sh, ss, H, S, D, mean, mean_tiles_per_head, mean_per_tile, codes, scales,
        tile_scale);
  } else {
    quantize_rows_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), sb, sh, ss, H, S, D, mean, mean_tiles_per_head, mean_per_tile, codes,
        scales, tile_scale);
  }
  return cudaGetLastError();
}

cudaError_t fp4_quantize_v(const void* v, Fp4InDtype dtype, int64_t sb, int64_t sh, int64_t ss, int B, int H, int S,
                           int D, uint8_t* codes, uint8_t* scales, float* tile_scale, cudaStream_t stream) {
  const int n_tiles = (S + kFp4Tile - 1) / kFp4Tile;
  if (n_tiles == 0 || B == 0 || H == 0) return cudaSuccess;
  dim3 grid(n_tiles, H, B);
  if (dtype == Fp4InDtype::kFloat16) {
    quantize_v_kernel<__half><<<grid, D, 0, stream>>>(static_cast<const __half*>(v), sb, sh, ss, H, S, D, codes,
                                                       scales, tile_scale);
  } else {
    quantize_v_kernel<__nv_bfloat16><<<grid, D, 0, stream>>>(static_cast<const __nv_bfloat16*>(v), sb, sh, ss, H, S,
                                                              D, codes, scales, tile_scale);
  }
  return cudaGetLastError();
}

}  // namespace sage3
