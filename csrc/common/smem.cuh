// The 32-bit shared-memory address of a generic pointer into shared memory (what cp.async, ldmatrix, mbarrier and
// wgmma descriptors take). Pure CUDA, any architecture.
#pragma once
#include <cstdint>

namespace sage3 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

}  // namespace sage3
