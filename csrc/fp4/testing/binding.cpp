// Torch binding of the test-only extension _C_fp4_testing (built with SAGE3_BUILD_TEST_EXT=1 or the emulated
// build, never shipped as part of _C_fp4): the block-scaled FP4 MMA device function run once on plain operands,
// and which implementation the loaded device image holds. tests/gpu/test_cuda_fp4.py uses it.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>

#include "common/binding_errors.h"
#include "fp4/testing/mma_probe.h"

namespace {

using sage3::binding::to_python;

#define SAGE3_CUDA_CHECK(expr)                                                                         \
  do {                                                                                                 \
    const cudaError_t err__ = (expr);                                                                  \
    SAGE3_CHECK(err__ == cudaSuccess, "_C_fp4_testing: ", #expr, " failed: ", cudaGetErrorString(err__)); \
  } while (0)

std::string mma_probe(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sfa, const at::Tensor& sfb,
                      const at::Tensor& c, int64_t tid_a, int64_t tid_b, std::vector<at::Tensor>& result) {
  SAGE3_CHECK(a.is_cuda() && a.scalar_type() == at::kByte && a.numel() == 16 * 32 && a.is_contiguous(), "a: 16x32 u8");
  SAGE3_CHECK(b.is_cuda() && b.scalar_type() == at::kByte && b.numel() == 8 * 32 && b.is_contiguous(), "b: 8x32 u8");
  SAGE3_CHECK(sfa.is_cuda() && sfa.scalar_type() == at::kByte && sfa.numel() == 16 * 4 && sfa.is_contiguous(), "sfa");
  SAGE3_CHECK(sfb.is_cuda() && sfb.scalar_type() == at::kByte && sfb.numel() == 8 * 4 && sfb.is_contiguous(), "sfb");
  SAGE3_CHECK(c.is_cuda() && c.scalar_type() == at::kFloat && c.numel() == 16 * 8 && c.is_contiguous(), "c: 16x8 f32");
  const c10::cuda::CUDAGuard guard(a.device());
  auto d = at::full({16, 8}, std::numeric_limits<float>::quiet_NaN(), c.options());
  SAGE3_CUDA_CHECK(sage3::fp4_mma_probe(a.data_ptr<uint8_t>(), b.data_ptr<uint8_t>(), sfa.data_ptr<uint8_t>(),
                                        sfb.data_ptr<uint8_t>(), c.data_ptr<float>(), d.data_ptr<float>(),
                                        static_cast<int>(tid_a), static_cast<int>(tid_b),
                                        c10::cuda::getCurrentCUDAStream()));
  result = {d};
  return {};
}

// (__CUDA_ARCH__ of the device image loaded on the current GPU, 1 if it uses the hardware FP4 MMA).
std::string mma_impl(std::vector<at::Tensor>& result) {
  auto buf = at::zeros({2}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
  SAGE3_CUDA_CHECK(sage3::fp4_mma_impl(buf.data_ptr<int>(), c10::cuda::getCurrentCUDAStream()));
  result = {buf.cpu()};
  return {};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Test hooks of the NVFP4 kernels' block-scaled FP4 MMA (test-only)";
  m.def(
      "mma_probe",
      [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& sfa, const at::Tensor& sfb, const at::Tensor& c,
         int64_t tid_a, int64_t tid_b) {
        std::vector<at::Tensor> res;
        const std::string err = mma_probe(a, b, sfa, sfb, c, tid_a, tid_b, res);
        return to_python(err, res);
      },
      "Run the block-scaled FP4 MMA device function once on plain operands -> [d]");
  m.def(
      "mma_impl",
      []() {
        std::vector<at::Tensor> res;
        const std::string err = mma_impl(res);
        return to_python(err, res);
      },
      "[int32 (__CUDA_ARCH__, hardware MMA?)] of the loaded device image");
}
