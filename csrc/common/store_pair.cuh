// Two fp32 values rounded (RNE) to the output type and stored as one 32-bit word: the attention epilogues'
// output store (adjacent accumulator columns of one row).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sage3 {

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* p, float x, float y);
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
template <>
__device__ __forceinline__ void store_pair<__half>(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}

}  // namespace sage3
