// Head dim 128 instantiation of the sm90 INT8-QK / FP8-PV attention (own translation unit: builds in parallel).
#include "sm90/attn_kernel.cuh"

namespace sage3::sm90 {
cudaError_t launch_attn_hd128(const AttnArgs& a, cudaStream_t stream, const char** err) {
  return launch_attn<128>(a, stream, err);
}
}  // namespace sage3::sm90
