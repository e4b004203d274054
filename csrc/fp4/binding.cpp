// Torch binding of the NVFP4 (SageAttention3) kernels: the only file of _C_fp4 that includes torch.
// Python (sage3_diffusers/backends/cuda_fp4.py) computes the smoothing means and ΔS with the specification's
// own torch code, then calls `quantize` and `attention` here. Argument and launch errors come back to Python as a
// str ("error: ..."), never as a C++ exception (common/binding_errors.h says why); the wrapper raises them.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common/binding_errors.h"
#include "fp4/api.h"

namespace {

using sage3::binding::to_python;

using sage3::Fp4InDtype;
constexpr int kTile = sage3::kFp4Tile;

#define SAGE3_CUDA_CHECK(expr)                                                                 \
  do {                                                                                         \
    const cudaError_t err__ = (expr);                                                          \
    SAGE3_CHECK(err__ == cudaSuccess, "_C_fp4: ", #expr, " failed: ", cudaGetErrorString(err__)); \
  } while (0)

std::string in_dtype(const at::Tensor& x, Fp4InDtype& dt) {
  if (x.scalar_type() == at::kHalf) {
    dt = Fp4InDtype::kFloat16;
  } else if (x.scalar_type() == at::kBFloat16) {
    dt = Fp4InDtype::kBFloat16;
  } else {
    return sage3::binding::message("_C_fp4: dtype ", x.scalar_type(), " not supported (needs float16 or bfloat16)");
  }
  return {};
}

// The row kernels read 16 elements as two 16-byte loads: rows must start 16-byte aligned.
at::Tensor aligned_rows(const at::Tensor& x) {
  const bool ok = x.stride(3) == 1 && x.stride(2) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  return ok ? x : x.contiguous();
}

// Also returns the inputs' dtype in dt.
std::string check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, Fp4InDtype& dt) {
  for (const auto* t : {&q, &k, &v}) {
    SAGE3_CHECK(t->is_cuda(), "_C_fp4: inputs must be CUDA tensors");
    SAGE3_CHECK(t->dim() == 4, "_C_fp4: inputs must be 4-D [B, H, S, D] (HND), got ", t->sizes());
  }
  SAGE3_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "_C_fp4: q, k, v must share one dtype");
  SAGE3_TRY(in_dtype(q, dt));
  const int64_t D = q.size(3);
  SAGE3_CHECK(D == 64 || D == 128, "_C_fp4: head_dim ", D, " not supported (needs 64 or 128)");
  SAGE3_CHECK(k.size(3) == D && v.size(3) == D, "_C_fp4: q, k, v head dims differ");
  SAGE3_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "_C_fp4: batch sizes differ");
  SAGE3_CHECK(k.sizes() == v.sizes(), "_C_fp4: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  SAGE3_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "_C_fp4: query heads (", q.size(1),
              ") must be a multiple of kv heads (", k.size(1), ")");
  SAGE3_CHECK(k.size(2) > 0, "_C_fp4: needs at least one key token");
  SAGE3_CHECK(q.get_device() == k.get_device() && q.get_device() == v.get_device(),
              "_C_fp4: q, k, v on different devices");
  return {};
}

int64_t tiles(int64_t s) { return (s + kTile - 1) / kTile; }

// Quantize Q', K', V in the layouts the attention kernel reads.
// q_mean: fp32 [B, Hq, ceil(Sq/128), D]; k_mean: fp32 [B, Hkv, 1, D] (contiguous).
// Returns (q_codes [B,Hq,Sq_pad,D/2] u8, q_scales [B,Hq,Sq_pad,D/16] u8 (E4M3 bits), q_g [B,Hq,nQT] f32,
//          k_codes, k_scales, k_g [B,Hkv,nKT], v_codes [B,Hkv,D,Skv_pad/2], v_scales [B,Hkv,D,Skv_pad/16],
//          v_g [B,Hkv,nKT,D]).
std::string quantize(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& q_mean_in,
                     const at::Tensor& k_mean_in, std::vector<at::Tensor>& result) {
  Fp4InDtype dt;
  SAGE3_TRY(check_qkv(q_in, k_in, v_in, dt));
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in);
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();  // the V kernel reads channels unit-stride
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3), Hkv = k.size(1), Skv = k.size(2);
  const at::Tensor q_mean = q_mean_in.to(at::kFloat).contiguous(), k_mean = k_mean_in.to(at::kFloat).contiguous();
  SAGE3_CHECK(q_mean.sizes() == at::IntArrayRef({B, Hq, tiles(Sq), D}), "_C_fp4: q_mean shape ", q_mean.sizes());
  SAGE3_CHECK(k_mean.sizes() == at::IntArrayRef({B, Hkv, 1, D}), "_C_fp4: k_mean shape ", k_mean.sizes());
  SAGE3_CHECK(q_mean.device() == q.device() && k_mean.device() == q.device(), "_C_fp4: means on another device");
  const auto u8 = q.options().dtype(at::kByte), f32 = q.options().dtype(at::kFloat);
  const int64_t sq_pad = tiles(Sq) * kTile, skv_pad = tiles(Skv) * kTile;
  auto q_codes = at::empty({B, Hq, sq_pad, D / 2}, u8), q_scales = at::empty({B, Hq, sq_pad, D / 16}, u8);
  auto q_g = at::empty({B, Hq, tiles(Sq)}, f32);
  auto k_codes = at::empty({B, Hkv, skv_pad, D / 2}, u8), k_scales = at::empty({B, Hkv, skv_pad, D / 16}, u8);
  auto k_g = at::empty({B, Hkv, tiles(Skv)}, f32);
  auto v_codes = at::empty({B, Hkv, D, skv_pad / 2}, u8), v_scales = at::empty({B, Hkv, D, skv_pad / 16}, u8);
  auto v_g = at::empty({B, Hkv, tiles(Skv), D}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (Sq > 0) {
    SAGE3_CUDA_CHECK(sage3::fp4_quantize_rows(q.data_ptr(), dt, q.stride(0), q.stride(1), q.stride(2), B, Hq, Sq, D,
                                              q_mean.data_ptr<float>(), tiles(Sq), true, q_codes.data_ptr<uint8_t>(),
                                              q_scales.data_ptr<uint8_t>(), q_g.data_ptr<float>(), stream));
  }
  SAGE3_CUDA_CHECK(sage3::fp4_quantize_rows(k.data_ptr(), dt, k.stride(0), k.stride(1), k.stride(2), B, Hkv, Skv, D,
                                            k_mean.data_ptr<float>(), 1, false, k_codes.data_ptr<uint8_t>(),
                                            k_scales.data_ptr<uint8_t>(), k_g.data_ptr<float>(), stream));
  SAGE3_CUDA_CHECK(sage3::fp4_quantize_v(v.data_ptr(), dt, v.stride(0), v.stride(1), v.stride(2), B, Hkv, Skv, D,
                                         v_codes.data_ptr<uint8_t>(), v_scales.data_ptr<uint8_t>(),
                                         v_g.data_ptr<float>(), stream));
  result = {q_codes, q_scales, q_g, k_codes, k_scales, k_g, v_codes, v_scales, v_g};
  return {};
}

// Attention on quantized operands (from `quantize`) for the query tiles q_tile0 .. q_tile0 + delta_s.size(2) - 1
// (one call, or several chunks so ΔS stays small). Writes in place: `out` [B, Hq, Sq, D] of q's dtype, stride 1
// along D; `lse_log2` [B, Hq, Sq] fp32 contiguous (m + log2(l) - log2(2688)) or an empty tensor for none.
std::string attention(const std::vector<at::Tensor>& qz, const at::Tensor& delta_s_in, at::Tensor out,
                      at::Tensor lse_log2, int64_t Skv, bool causal, double sm_scale, int64_t q_tile0) {
  SAGE3_CHECK(qz.size() == 9, "_C_fp4: attention expects the 9 tensors returned by quantize");
  const at::Tensor& q_codes = qz[0];
  const int64_t B = q_codes.size(0), Hq = q_codes.size(1), D = q_codes.size(3) * 2, Hkv = qz[3].size(1);
  SAGE3_CHECK(out.is_cuda() && out.dim() == 4 && out.size(0) == B && out.size(1) == Hq && out.size(3) == D,
              "_C_fp4: out shape ", out.sizes());
  SAGE3_CHECK(out.stride(3) == 1, "_C_fp4: out must be contiguous along D");
  Fp4InDtype out_dt;
  SAGE3_TRY(in_dtype(out, out_dt));
  const int64_t Sq = out.size(2);
  SAGE3_CHECK(tiles(Sq) * kTile == q_codes.size(2), "_C_fp4: out rows do not match the quantized Q");
  SAGE3_CHECK(Skv > 0 && tiles(Skv) * kTile == qz[3].size(2), "_C_fp4: Skv does not match the quantized K");
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor delta_s = delta_s_in.to(at::kFloat).contiguous();
  SAGE3_CHECK(delta_s.dim() == 4 && delta_s.size(0) == B && delta_s.size(1) == Hq && delta_s.size(3) == Skv,
              "_C_fp4: delta_s shape ", delta_s.sizes());
  const int64_t q_tiles = delta_s.size(2);
  SAGE3_CHECK(q_tile0 >= 0 && q_tile0 + q_tiles <= tiles(Sq), "_C_fp4: query tiles [", q_tile0, ", ",
              q_tile0 + q_tiles, ") outside [0, ", tiles(Sq), ")");
  const bool with_lse = lse_log2.numel() > 0;
  if (with_lse) {
    SAGE3_CHECK(lse_log2.scalar_type() == at::kFloat && lse_log2.is_contiguous() &&
                    lse_log2.sizes() == at::IntArrayRef({B, Hq, Sq}) && lse_log2.device() == out.device(),
                "_C_fp4: lse_log2 must be fp32 contiguous [B, Hq, Sq], got ", lse_log2.sizes());
  }
  sage3::Fp4AttnParams p{};
  p.q_codes = qz[0].data_ptr<uint8_t>(); p.q_scales = qz[1].data_ptr<uint8_t>(); p.q_tile_scale = qz[2].data_ptr<float>();
  p.k_codes = qz[3].data_ptr<uint8_t>(); p.k_scales = qz[4].data_ptr<uint8_t>(); p.k_tile_scale = qz[5].data_ptr<float>();
  p.v_codes = qz[6].data_ptr<uint8_t>(); p.v_scales = qz[7].data_ptr<uint8_t>(); p.v_tile_scale = qz[8].data_ptr<float>();
  p.delta_s = delta_s.data_ptr<float>();
  p.out = out.data_ptr();
  p.osb = out.stride(0); p.osh = out.stride(1); p.oss = out.stride(2);
  p.lse_log2 = with_lse ? lse_log2.data_ptr<float>() : nullptr;
  p.B = static_cast<int>(B); p.Hq = static_cast<int>(Hq); p.Hkv = static_cast<int>(Hkv);
  p.Sq = static_cast<int>(Sq); p.Skv = static_cast<int>(Skv); p.D = static_cast<int>(D);
  p.q_tile0 = static_cast<int>(q_tile0); p.q_tiles = static_cast<int>(q_tiles);
  p.causal = causal;
  p.score_scale_log2 = static_cast<float>(sm_scale * 1.4426950408889634);
  p.p_offset_log2 = static_cast<float>(std::log2(448.0 * 6.0));
  SAGE3_CUDA_CHECK(sage3::fp4_attention(p, out_dt, c10::cuda::getCurrentCUDAStream()));
  return {};
}

// Device images compiled into this module (setup.py passes the gencodes as defines).
std::map<std::string, bool> build_info() {
  std::map<std::string, bool> info;
#ifdef SAGE3_FP4_SM120A
  info["sm_120a"] = true;
#else
  info["sm_120a"] = false;
#endif
#ifdef SAGE3_FP4_SM121A
  info["sm_121a"] = true;
#else
  info["sm_121a"] = false;
#endif
#ifdef SAGE3_FP4_SM90A_EMULATED
  info["sm_90a_emulated"] = true;
#else
  info["sm_90a_emulated"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SageAttention3 NVFP4 attention (sm_120a hardware FP4 MMA; sm_90a emulated-MMA test build)";
  // Each entry point returns its result, or the error message as a str ("error: ...").
  m.def(
      "quantize",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_mean,
         const at::Tensor& k_mean) {
        std::vector<at::Tensor> res;
        const std::string err = quantize(q, k, v, q_mean, k_mean, res);
        return to_python(err, res);
      },
      "Quantize Q', K', V to NVFP4 in the attention kernel's layouts -> 9 tensors");
  m.def(
      "attention",
      [](const std::vector<at::Tensor>& qz, const at::Tensor& delta_s, at::Tensor out, at::Tensor lse_log2,
         int64_t Skv, bool causal, double sm_scale, int64_t q_tile0) {
        return to_python(attention(qz, delta_s, out, lse_log2, Skv, causal, sm_scale, q_tile0));
      },
      "NVFP4 attention on quantized operands for a range of query tiles; writes out (and lse_log2) in place");
  m.def("build_info", &build_info, "Device images compiled into this module");
}
