// Torch binding of the sm90 INT8-QK / FP8-PV attention: checks arguments, allocates outputs and
// intermediates with the caching allocator, launches on the current stream. The only file with torch headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/extension.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common/binding_errors.h"
#include "sm90/api.h"

namespace {

using sage3::binding::to_python;

using sage3::sm90::QuantArgs;
using sage3::sm90::QuantShapes;

// The quantized operands of one call: raw pointers into one workspace allocation (`ws` keeps it alive), so the
// hot path creates no tensor per intermediate (host time per call); `quantize()` wraps them as tensors for tests.
struct Quantized {
  QuantShapes s;
  at::Tensor ws;
  int8_t* q_i8 = nullptr;
  float* q_scale = nullptr;
  float* q_kmean = nullptr;
  int8_t* k_i8 = nullptr;
  float* k_scale = nullptr;
  float* k_mean = nullptr;
  uint8_t* v_t = nullptr;
  float* v_scale = nullptr;
};

std::string check_input(const at::Tensor& x, const char* name) {
  SAGE3_CHECK(x.is_cuda(), "sm90 attention: ", name, " must be a CUDA tensor");
  SAGE3_CHECK(x.dim() == 4, "sm90 attention: ", name, " must be 4-D, got ", x.dim(), "-D");
  SAGE3_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sm90 attention: ", name, " must be float16 or bfloat16, got ", x.scalar_type());
  return {};
}

// The kernels read channels contiguously in 16-byte rows from a 16-byte aligned base. A tensor laid out otherwise
// (a transposed view, odd strides, a view sliced at an odd offset such as ring attention's chunk of an all-gathered
// buffer) is copied once into a fresh allocation, which the caching allocator aligns; the caller's tensor is only
// read.
at::Tensor kernel_ready(const at::Tensor& x) {
  bool ok = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = x.stride(d) % 8 == 0 || x.size(d) == 1;
  if (ok) return x;
  at::Tensor y = x.contiguous();
  return reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0 ? y : y.clone();
}

// Logical [B, H, S, D] sizes and strides of a tensor in layout HND ([B,H,S,D]) or NHD ([B,S,H,D]).
struct View {
  int64_t B, H, S, D, sb, sh, ss;
};
View view_of(const at::Tensor& x, bool nhd) {
  if (nhd) return {x.size(0), x.size(2), x.size(1), x.size(3), x.stride(0), x.stride(2), x.stride(1)};
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2)};
}

std::string quantize_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool nhd,
                          bool want_qk_mean, Quantized& r) {
  SAGE3_TRY(check_input(q_in, "q"));
  SAGE3_TRY(check_input(k_in, "k"));
  SAGE3_TRY(check_input(v_in, "v"));
  const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  SAGE3_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "sm90 attention: q, k, v must share one dtype");
  SAGE3_CHECK(q.device() == k.device() && q.device() == v.device(), "sm90 attention: q, k, v on different devices");
  const View vq = view_of(q, nhd), vk = view_of(k, nhd), vv = view_of(v, nhd);
  SAGE3_CHECK(vq.D == 64 || vq.D == 128, "sm90 attention: head_dim must be 64 or 128, got ", vq.D);
  SAGE3_CHECK(vk.D == vq.D && vv.D == vq.D, "sm90 attention: q, k, v head_dim differ");
  SAGE3_CHECK(vk.B == vq.B && vv.B == vq.B, "sm90 attention: batch sizes differ");
  SAGE3_CHECK(vk.H == vv.H && vk.S == vv.S, "sm90 attention: k and v shapes differ");
  SAGE3_CHECK(vk.H > 0 && vq.H % vk.H == 0, "sm90 attention: query heads (", vq.H,
              ") must be a multiple of kv heads (", vk.H, ")");
  SAGE3_CHECK(vq.S >= 1 && vk.S >= 1, "sm90 attention: empty sequence");
  SAGE3_CHECK(vq.S < (1LL << 30) && vk.S < (1LL << 30) && vq.B <= 65535 && vq.H <= 65535,
              "sm90 attention: sizes out of range");

  r.s = QuantShapes{(int)vq.B, (int)vq.H, (int)vk.H, (int)vq.S, (int)vk.S, (int)vq.D};
  const QuantShapes& s = r.s;
  // All intermediates of the call in one allocation (one caching-allocator call instead of ten: host time per
  // call), each at a 256-byte aligned offset (TMA needs 16-byte aligned bases). Memory is what separate
  // allocations would take; it returns to the caching allocator when the call's last reference dies.
  const int64_t B = s.B, Hq = s.Hq, Hkv = s.Hkv, Sq = s.Sq, Skv = s.Skv, D = s.D;
  int64_t total = 0;
  auto reserve = [&total](int64_t bytes) {
    const int64_t at = total;
    total += (bytes + 255) / 256 * 256;
    return at;
  };
  const int64_t o_ksum = reserve(B * Hkv * s.n_chunks() * D * 4);
  const int64_t o_vamax = reserve(B * Hkv * s.n_chunks() * D * 4);
  const int64_t o_qi8 = reserve(B * Hq * Sq * D);
  const int64_t o_qscale = reserve(B * Hq * s.n_qgroups() * 4);
  const int64_t o_qkmean = want_qk_mean ? reserve(B * Hq * Sq * 4) : 0;
  const int64_t o_ki8 = reserve(B * Hkv * Skv * D);
  const int64_t o_kscale = reserve(B * Hkv * s.n_ktiles() * 4 * 4);
  const int64_t o_kmean = reserve(B * Hkv * D * 4);
  const int64_t o_vt = reserve(B * Hkv * D * s.skv_pad());
  const int64_t o_vscale = reserve(B * Hkv * D * 4);
  r.ws = at::empty({total}, q.options().dtype(at::kByte));
  uint8_t* base = r.ws.data_ptr<uint8_t>();
  r.q_i8 = reinterpret_cast<int8_t*>(base + o_qi8);
  r.q_scale = reinterpret_cast<float*>(base + o_qscale);
  r.q_kmean = want_qk_mean ? reinterpret_cast<float*>(base + o_qkmean) : nullptr;
  r.k_i8 = reinterpret_cast<int8_t*>(base + o_ki8);
  r.k_scale = reinterpret_cast<float*>(base + o_kscale);
  r.k_mean = reinterpret_cast<float*>(base + o_kmean);
  r.v_t = base + o_vt;
  r.v_scale = reinterpret_cast<float*>(base + o_vscale);

  QuantArgs a;
  a.s = s;
  a.bf16 = q.scalar_type() == at::kBFloat16;
  a.q = q.data_ptr(); a.q_sb = vq.sb; a.q_sh = vq.sh; a.q_ss = vq.ss;
  a.k = k.data_ptr(); a.k_sb = vk.sb; a.k_sh = vk.sh; a.k_ss = vk.ss;
  a.v = v.data_ptr(); a.v_sb = vv.sb; a.v_sh = vv.sh; a.v_ss = vv.ss;
  a.partial_ksum = reinterpret_cast<float*>(base + o_ksum);
  a.partial_vamax = reinterpret_cast<float*>(base + o_vamax);
  a.q_i8 = r.q_i8;
  a.q_scale = r.q_scale;
  a.q_kmean = r.q_kmean;
  a.k_i8 = r.k_i8;
  a.k_scale = r.k_scale;
  a.k_mean = r.k_mean;
  a.v_t = r.v_t;
  a.v_scale = r.v_scale;
  cudaError_t e = sage3::sm90::launch_quantize(a, c10::cuda::getCurrentCUDAStream());
  SAGE3_CHECK(e == cudaSuccess, "sm90 quantization launch failed: ", cudaGetErrorString(e));
  return {};
}

// Returns the kernels' intermediates (for tests): q_i8, q_scale, k_i8, k_scale, k_mean, v_t, v_scale, q_kmean.
std::string quantize(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool nhd, bool with_qk_mean,
                     std::vector<at::Tensor>& result) {
  SAGE3_CHECK(q.is_cuda(), "sm90 attention: q must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(q.device());
  Quantized r;
  SAGE3_TRY(quantize_impl(q, k, v, nhd, with_qk_mean, r));
  const QuantShapes& s = r.s;
  const int64_t B = s.B, Hq = s.Hq, Hkv = s.Hkv, Sq = s.Sq, Skv = s.Skv, D = s.D;
  uint8_t* base = r.ws.data_ptr<uint8_t>();
  auto view = [&](const void* p, at::IntArrayRef shape, at::ScalarType dtype) {
    const int64_t offset = static_cast<const uint8_t*>(p) - base;
    const int64_t bytes = c10::multiply_integers(shape) * c10::elementSize(dtype);
    return r.ws.narrow(0, offset, bytes).view(dtype).view(shape);
  };
  result = {view(r.q_i8, {B, Hq, Sq, D}, at::kChar),
            view(r.q_scale, {B, Hq, s.n_qgroups()}, at::kFloat),
            view(r.k_i8, {B, Hkv, Skv, D}, at::kChar),
            view(r.k_scale, {B, Hkv, s.n_ktiles() * 4}, at::kFloat),
            view(r.k_mean, {B, Hkv, D}, at::kFloat),
            view(r.v_t, {B, Hkv, D, s.skv_pad()}, at::kByte),
            view(r.v_scale, {B, Hkv, D}, at::kFloat),
            r.q_kmean ? view(r.q_kmean, {B, Hq, Sq}, at::kFloat) : at::Tensor()};
  return {};
}

std::string run_attention(const Quantized& r, const at::Tensor& q, bool nhd, bool is_causal, double sm_scale,
                          bool return_lse, const c10::optional<at::Tensor>& kv_lens,
                          c10::optional<at::Tensor> out_opt, c10::optional<at::Tensor> lse_opt,
                          std::vector<at::Tensor>& result);

// kv_lens: int32 [B] on q's device (contiguous), or none. Its values are read by the kernel only (no host
// sync): batch entry b attends to keys [0, kv_lens[b]) (clamped to [0, Skv]).
std::string check_kv_lens(const c10::optional<at::Tensor>& kv_lens, const at::Tensor& q, int64_t batch) {
  if (!kv_lens.has_value() || !kv_lens->defined()) return {};
  const at::Tensor& t = *kv_lens;
  SAGE3_CHECK(t.device() == q.device(), "sm90 attention: kv_lens must be on q's device (", q.device().str(),
              "), got ", t.device().str());
  SAGE3_CHECK(t.scalar_type() == at::kInt, "sm90 attention: kv_lens must be int32, got ", t.scalar_type());
  SAGE3_CHECK(t.dim() == 1 && t.size(0) == batch, "sm90 attention: kv_lens must have shape [", batch,
              "] (one key length per batch entry), got ", t.sizes());
  SAGE3_CHECK(t.is_contiguous(), "sm90 attention: kv_lens must be contiguous");
  return {};
}

// out in q's layout and dtype; lse [B, Hq, Sq] fp32 (natural log) or an empty tensor. `out_opt` / `lse_opt`
// let tests pass pre-poisoned buffers (out: q's logical shape, channel stride 1; lse: contiguous).
// With kv_lens, the quantization still sees all Skv keys (the K mean and the V channel scales include the padding
// tokens: subtracting one per-channel mean from every key shifts each score row by a constant, exact under
// softmax and restored in the LSE; padding tokens only coarsen the scales), so padding must be finite.
std::string forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool nhd, bool is_causal,
                    double sm_scale, bool return_lse, const c10::optional<at::Tensor>& kv_lens,
                    c10::optional<at::Tensor> out_opt, c10::optional<at::Tensor> lse_opt,
                    std::vector<at::Tensor>& result) {
  SAGE3_CHECK(q.is_cuda(), "sm90 attention: q must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(q.device());
  SAGE3_TRY(check_kv_lens(kv_lens, q, q.size(0)));
  Quantized r;
  SAGE3_TRY(quantize_impl(q, k, v, nhd, return_lse, r));
  return run_attention(r, q, nhd, is_causal, sm_scale, return_lse, kv_lens, out_opt, lse_opt, result);
}

// The attention kernel alone on the intermediates of quantize() (for kernel-only timing).
std::string forward_quantized(const at::Tensor& q, const std::vector<at::Tensor>& qz, int64_t seq_kv,
                              int64_t heads_kv, bool nhd, bool is_causal, double sm_scale, bool return_lse,
                              std::vector<at::Tensor>& result) {
  SAGE3_CHECK(q.is_cuda() && q.dim() == 4, "forward_quantized: q must be a 4-D CUDA tensor");
  c10::cuda::CUDAGuard guard(q.device());
  SAGE3_CHECK(qz.size() == 8, "forward_quantized: expects the 8 tensors returned by quantize()");
  const View vq = view_of(q, nhd);
  Quantized r;
  r.s = QuantShapes{(int)vq.B, (int)vq.H, (int)heads_kv, (int)vq.S, (int)seq_kv, (int)vq.D};
  const at::Tensor &q_i8 = qz[0], &q_scale = qz[1], &k_i8 = qz[2], &k_scale = qz[3], &k_mean = qz[4], &v_t = qz[5],
                   &v_scale = qz[6], &q_kmean = qz[7];
  SAGE3_CHECK(!return_lse || q_kmean.defined(), "forward_quantized: return_lse needs quantize(..., with_qk_mean=True)");
  SAGE3_CHECK(k_scale.is_contiguous() && reinterpret_cast<uintptr_t>(k_scale.data_ptr()) % 16 == 0 &&
                 v_scale.is_contiguous() && reinterpret_cast<uintptr_t>(v_scale.data_ptr()) % 8 == 0,
             "forward_quantized: k_scale / v_scale must be contiguous and aligned as quantize() returns them");
  SAGE3_CHECK(k_i8.size(2) == seq_kv && k_i8.size(1) == heads_kv && q_i8.sizes() == at::IntArrayRef({vq.B, vq.H, vq.S, vq.D}),
              "forward_quantized: shapes do not match the quantized tensors");
  r.q_i8 = q_i8.data_ptr<int8_t>(); r.q_scale = q_scale.data_ptr<float>(); r.k_i8 = k_i8.data_ptr<int8_t>();
  r.k_scale = k_scale.data_ptr<float>(); r.k_mean = k_mean.data_ptr<float>(); r.v_t = v_t.data_ptr<uint8_t>();
  r.v_scale = v_scale.data_ptr<float>(); r.q_kmean = q_kmean.defined() ? q_kmean.data_ptr<float>() : nullptr;
  return run_attention(r, q, nhd, is_causal, sm_scale, return_lse, c10::nullopt, c10::nullopt, c10::nullopt, result);
}

std::string run_attention(const Quantized& r, const at::Tensor& q, bool nhd, bool is_causal, double sm_scale,
                          bool return_lse, const c10::optional<at::Tensor>& kv_lens,
                          c10::optional<at::Tensor> out_opt, c10::optional<at::Tensor> lse_opt,
                          std::vector<at::Tensor>& result) {
  const QuantShapes& s = r.s;
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    SAGE3_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device() &&
                    out.stride(3) == 1 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0 && out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0 && out.stride(2) % 2 == 0,
                "sm90 attention: out must match q's shape, dtype and device, with even strides and contiguous channels");
  } else {
    out = nhd ? at::empty({s.B, s.Sq, s.Hq, s.D}, q.options()) : at::empty({s.B, s.Hq, s.Sq, s.D}, q.options());
  }
  at::Tensor lse;
  if (return_lse) {
    if (lse_opt.has_value() && lse_opt->defined()) {
      lse = *lse_opt;
      SAGE3_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == (int64_t)s.B * s.Hq * s.Sq &&
                      lse.device() == q.device(),
                  "sm90 attention: lse must be a contiguous float32 [B, Hq, Sq] tensor on q's device");
    } else {
      lse = at::empty({s.B, s.Hq, s.Sq}, q.options().dtype(at::kFloat));
    }
  }
  const View vo = view_of(out, nhd);

  sage3::sm90::AttnArgs a;
  a.s = s;
  a.out_bf16 = q.scalar_type() == at::kBFloat16;
  a.causal = is_causal;
  a.return_lse = return_lse;
  a.sm_scale = sm_scale;
  a.q_i8 = r.q_i8;
  a.q_scale = r.q_scale;
  a.q_kmean = return_lse ? r.q_kmean : nullptr;
  a.k_i8 = r.k_i8;
  a.k_scale = r.k_scale;
  a.v_t = r.v_t;
  a.v_scale = r.v_scale;
  a.out = out.data_ptr();
  a.o_sb = vo.sb; a.o_sh = vo.sh; a.o_ss = vo.ss;
  a.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  a.kv_lens = kv_lens.has_value() && kv_lens->defined() ? kv_lens->data_ptr<int32_t>() : nullptr;
  const char* err = "unknown error";
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t e = s.D == 128 ? sage3::sm90::launch_attn_hd128(a, stream, &err)
                             : sage3::sm90::launch_attn_hd64(a, stream, &err);
  SAGE3_CHECK(e == cudaSuccess, "sm90 attention launch failed: ", e == cudaErrorInvalidValue ? err : cudaGetErrorString(e));
  result = {out, lse};
  return {};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sage3-diffusers sm_90a INT8-QK / FP8-PV attention (SageAttention2++ numerics)";
  m.def(
      "forward",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool nhd, bool is_causal, double sm_scale,
         bool return_lse, c10::optional<at::Tensor> kv_lens, c10::optional<at::Tensor> out,
         c10::optional<at::Tensor> lse) {
        std::vector<at::Tensor> res;
        const std::string err = forward(q, k, v, nhd, is_causal, sm_scale, return_lse, kv_lens, out, lse, res);
        return to_python(err, res);
      },
      "attention forward -> [out, lse] (or an error message str)", py::arg("q"), py::arg("k"), py::arg("v"),
      py::arg("nhd"), py::arg("is_causal"), py::arg("sm_scale"), py::arg("return_lse"),
      py::arg("kv_lens") = py::none(), py::arg("out") = py::none(), py::arg("lse") = py::none());
  m.def(
      "forward_quantized",
      [](const at::Tensor& q, const std::vector<at::Tensor>& qz, int64_t seq_kv, int64_t heads_kv, bool nhd,
         bool is_causal, double sm_scale, bool return_lse) {
        std::vector<at::Tensor> res;
        const std::string err = forward_quantized(q, qz, seq_kv, heads_kv, nhd, is_causal, sm_scale, return_lse, res);
        return to_python(err, res);
      },
      "the attention kernel alone on quantize()'s outputs");
  m.def(
      "quantize",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool nhd, bool with_qk_mean) {
        std::vector<at::Tensor> res;
        const std::string err = quantize(q, k, v, nhd, with_qk_mean, res);
        return to_python(err, res);
      },
      "the quantization kernels alone: [q_i8, q_scale, k_i8, k_scale, k_mean, v_t, v_scale, q_kmean]", py::arg("q"),
      py::arg("k"), py::arg("v"), py::arg("nhd"), py::arg("with_qk_mean") = true);
}
