// Host entry points of the FP4 MMA test hooks (test-only extension _C_fp4_testing); plain pointers, no torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sage3 {

// One warp runs one MMA on plain-layout operands (for the unit test of the MMA device function):
// a [16][32] bytes (row-major, 64 packed e2m1 per row), b [8][32] bytes (per column n, its 64 k packed),
// sfa [16][4], sfb [8][4] E4M3 bytes, c [16][8] fp32 -> d [16][8] fp32; tid_a/tid_b are the PTX selectors.
cudaError_t fp4_mma_probe(const uint8_t* a, const uint8_t* b, const uint8_t* sfa, const uint8_t* sfb, const float* c,
                          float* d, int tid_a, int tid_b, cudaStream_t stream);

// Which MMA implementation the loaded device image uses: writes {__CUDA_ARCH__, 1 if hardware MMA else 0}.
cudaError_t fp4_mma_impl(int* out2, cudaStream_t stream);

}  // namespace sage3
