// The one block-scaled FP4 MMA of the NVFP4 attention:
//   mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3
// D(16x8, fp32) = (A(16x64, e2m1) * SF_A(16x4, ue4m3)) * (B(64x8, e2m1) * SF_B(4x8, ue4m3)) + C, one scale per 16
// consecutive k.
//
// Two implementations with one contract, chosen by the compile target:
// - sm_120a / sm_121a: the hardware instruction.
// - anything else (the sm_90a test build): a software emulation through warp shuffles.
//
// Fragment layout (PTX ISA, m16n8k64 with .e2m1; lane = 4*g + t, g = lane/4, t = lane%4); nibble i of a word is
// element i (bits 4i..4i+3):
//   A: a0 = row g,   k = 8t..8t+7      a1 = row g+8, k = 8t..8t+7
//      a2 = row g,   k = 32+8t..       a3 = row g+8, k = 32+8t..
//   B: b0 = col g,   k = 8t..8t+7      b1 = col g,   k = 32+8t..
//   C/D: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
// Scale metadata (scale_vec::4X, byte-id 0): byte j of the 32-bit word is the scale of k block j (k = 16j..16j+15).
//   SF_A: lane 4g + 2*tidA holds row g's word, lane 4g + 2*tidA + 1 row g+8's (tidA in {0, 1}).
//   SF_B: lane 4g + tidB holds column g's word (tidB in {0..3}).
//
// Emulation arithmetic: every product e2m1*e2m1*ue4m3*ue4m3 is exact in fp32, and so is each 16-element block
// sum (integer sum of doubled codes, <= 12 bits, times the two scales); the four block sums and C are added in
// fp64 and rounded once to fp32. PTX does not specify the tensor core's internal accumulation order/width, so
// that last rounding is the one place where hardware may differ by an ulp; the fragment and scale semantics are
// the documented ones.
#pragma once

#include <cstdint>

#include "common/fp4_convert.cuh"

#if defined(__CUDA_ARCH__) &&                                                                              \
    (defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL) ||                         \
     (defined(__CUDA_ARCH_SPECIFIC__) && (__CUDA_ARCH_SPECIFIC__ == 1200 || __CUDA_ARCH_SPECIFIC__ == 1210)) || \
     (defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && __CUDA_ARCH_FAMILY_SPECIFIC__ == 1200))
#define SAGE3_FP4_MMA_HARDWARE 1
#else
#define SAGE3_FP4_MMA_HARDWARE 0
#endif

namespace sage3 {

#if !SAGE3_FP4_MMA_HARDWARE
// Four e2m1 codes (nibbles 0..3 of `nibbles`) -> four signed int8 lanes holding 2*value (0, +-1, +-2, +-3, +-4,
// +-6, +-8, +-12), ready for __dp4a. Byte i of the result is nibble i.
__device__ __forceinline__ int e2m1x4_to_int8x4_doubled(uint32_t nibbles) {
  const uint32_t sel = nibbles & 0x7777u;               // magnitude index per nibble
  const uint32_t pos = __byte_perm(0x03020100u, 0x0C080604u, sel);  // {0,1,2,3,4,6,8,12}
  const uint32_t neg = __byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, sel);  // {0,-1,-2,-3,-4,-6,-8,-12}
  const uint32_t sign_sel = (nibbles >> 3) & 0x1111u;  // 1 where the code's sign bit is set
  const uint32_t mask = __byte_perm(0x0000FF00u, 0u, sign_sel);     // 0xFF bytes where negative
  return static_cast<int>((pos & ~mask) | (neg & mask));
}

// Exact dot product of two 8-element e2m1 words, in units of 1/4 (both operands doubled).
__device__ __forceinline__ int e2m1x8_dot_quarters(uint32_t a, uint32_t b) {
  int acc = __dp4a(e2m1x4_to_int8x4_doubled(a), e2m1x4_to_int8x4_doubled(b), 0);
  return __dp4a(e2m1x4_to_int8x4_doubled(a >> 16), e2m1x4_to_int8x4_doubled(b >> 16), acc);
}

__device__ __forceinline__ float ue4m3_decode(uint32_t byte) { return e4m3_decode(static_cast<uint8_t>(byte & 0x7Fu)); }
#endif

// d = A*B + c with NVFP4 block scales. All 32 lanes of the warp must call it together (as mma.sync requires).
// tid_a in {0,1}, tid_b in {0..3} are the PTX thread selectors (warp-uniform); byte-id is 0 (scale_vec::4X).
__device__ __forceinline__ void mma_nvfp4_m16n8k64(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                   const float c[4], uint32_t sfa, uint32_t sfb,
                                                   uint32_t tid_a = 0, uint32_t tid_b = 0) {
#if SAGE3_FP4_MMA_HARDWARE
  const uint16_t bid = 0, tida = static_cast<uint16_t>(tid_a), tidb = static_cast<uint16_t>(tid_b);
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13}, {%14}, {%15, %16}, {%17}, {%18, %19};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]), "r"(sfa), "h"(bid), "h"(tida), "r"(sfb), "h"(bid), "h"(tidb));
#else
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // Rows g and g+8 of A: words of the four lanes of quad g.
  uint32_t arow[2][8];  // [row half][word]: words 0..3 = k 0..31 (lane q: k 8q..), words 4..7 = k 32..63
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    arow[0][q] = __shfl_sync(full, a[0], 4 * g + q);
    arow[1][q] = __shfl_sync(full, a[1], 4 * g + q);
    arow[0][4 + q] = __shfl_sync(full, a[2], 4 * g + q);
    arow[1][4 + q] = __shfl_sync(full, a[3], 4 * g + q);
  }
  // Columns 2t and 2t+1 of B: words of quads 2t and 2t+1.
  uint32_t bcol[2][8];
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      bcol[n][q] = __shfl_sync(full, b[0], 4 * (2 * t + n) + q);
      bcol[n][4 + q] = __shfl_sync(full, b[1], 4 * (2 * t + n) + q);
    }
  }
  uint32_t sfa_row[2], sfb_col[2];
  sfa_row[0] = __shfl_sync(full, sfa, 4 * g + 2 * tid_a);
  sfa_row[1] = __shfl_sync(full, sfa, 4 * g + 2 * tid_a + 1);
  sfb_col[0] = __shfl_sync(full, sfb, 4 * (2 * t) + tid_b);
  sfb_col[1] = __shfl_sync(full, sfb, 4 * (2 * t + 1) + tid_b);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      double acc = static_cast<double>(c[2 * r + n]);
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) {
        const int w0 = 2 * kb;  // k block kb = words 2kb, 2kb+1 (k 16kb..16kb+15)
        const int quarters = e2m1x8_dot_quarters(arow[r][w0], bcol[n][w0]) +
                             e2m1x8_dot_quarters(arow[r][w0 + 1], bcol[n][w0 + 1]);
        const float sa = ue4m3_decode((sfa_row[r] >> (8 * kb)) & 0xFFu);
        const float sb = ue4m3_decode((sfb_col[n] >> (8 * kb)) & 0xFFu);
        // Exact in fp32: |quarters| <= 2304, scales have 4-bit significands.
        acc += static_cast<double>(static_cast<float>(quarters) * 0.25f * (sa * sb));
      }
      d[2 * r + n] = __double2float_rn(acc);
    }
  }
#endif
}

}  // namespace sage3
