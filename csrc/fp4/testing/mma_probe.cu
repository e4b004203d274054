// Test hooks for the block-scaled FP4 MMA device function (test-only extension _C_fp4_testing, never in _C_fp4):
// one MMA on plain-layout operands, and a report of which implementation (hardware or emulation) the loaded
// device image contains.
#include "fp4/mma.cuh"
#include "fp4/testing/mma_probe.h"

namespace sage3 {
namespace {

__device__ __forceinline__ uint32_t ld32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Operands are placed in registers exactly as fp4/mma.cuh documents; scale words of lanes the selectors do
// not name are poisoned with E4M3 NaN bytes, so an implementation that reads the wrong lane gives NaN.
__global__ void mma_probe_kernel(const uint8_t* a, const uint8_t* b, const uint8_t* sfa, const uint8_t* sfb,
                                 const float* c, float* d, int tid_a, int tid_b) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint32_t ar[4] = {ld32(a + g * 32 + 4 * t), ld32(a + (g + 8) * 32 + 4 * t), ld32(a + g * 32 + 16 + 4 * t),
                          ld32(a + (g + 8) * 32 + 16 + 4 * t)};
  const uint32_t br[2] = {ld32(b + g * 32 + 4 * t), ld32(b + g * 32 + 16 + 4 * t)};
  const uint32_t poison = 0x7F7F7F7Fu;
  uint32_t sa = poison;
  if (t == 2 * tid_a) sa = ld32(sfa + g * 4);
  if (t == 2 * tid_a + 1) sa = ld32(sfa + (g + 8) * 4);
  const uint32_t sb = t == tid_b ? ld32(sfb + g * 4) : poison;
  const float cr[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  float dr[4];
  mma_nvfp4_m16n8k64(dr, ar, br, cr, sa, sb, static_cast<uint32_t>(tid_a), static_cast<uint32_t>(tid_b));
  d[g * 8 + 2 * t] = dr[0];
  d[g * 8 + 2 * t + 1] = dr[1];
  d[(g + 8) * 8 + 2 * t] = dr[2];
  d[(g + 8) * 8 + 2 * t + 1] = dr[3];
}

__global__ void mma_impl_kernel(int* out2) {
#ifdef __CUDA_ARCH__
  out2[0] = __CUDA_ARCH__;
#endif
  out2[1] = SAGE3_FP4_MMA_HARDWARE;
}

}  // namespace

cudaError_t fp4_mma_probe(const uint8_t* a, const uint8_t* b, const uint8_t* sfa, const uint8_t* sfb, const float* c,
                          float* d, int tid_a, int tid_b, cudaStream_t stream) {
  if (tid_a < 0 || tid_a > 1 || tid_b < 0 || tid_b > 3) return cudaErrorInvalidValue;
  mma_probe_kernel<<<1, 32, 0, stream>>>(a, b, sfa, sfb, c, d, tid_a, tid_b);
  return cudaGetLastError();
}

cudaError_t fp4_mma_impl(int* out2, cudaStream_t stream) {
  mma_impl_kernel<<<1, 1, 0, stream>>>(out2);
  return cudaGetLastError();
}

}  // namespace sage3
