// Host-side interface of the sm90 INT8-QK / FP8-PV attention (pure C++/CUDA runtime; no torch).
// binding.cpp fills these structs from torch tensors; the .cu files launch the kernels.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define SAGE3_HD __host__ __device__
#else
#define SAGE3_HD
#endif

namespace sage3::sm90 {

// Fixed tile sizes shared by the quantization kernels and the attention kernel.
constexpr int kCtaQ = 128;      // query rows per attention CTA (two consumer warpgroups x 64)
constexpr int kCtaK = 128;      // keys per KV tile (= the reference's kv_tile)
constexpr int kQuantQRows = 128; // query rows per quantization block

SAGE3_HD inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Sizes of the intermediate buffers for one call.
struct QuantShapes {
  int B, Hq, Hkv, Sq, Skv, D;
  SAGE3_HD int n_qgroups() const { return ceil_div(Sq, kCtaQ) * (kCtaQ / 2); }  // 8 groups per 16 rows, padded to kCtaQ
  SAGE3_HD int n_ktiles() const { return ceil_div(Skv, kCtaK); }
  SAGE3_HD int skv_pad() const { return n_ktiles() * kCtaK; }
  SAGE3_HD int n_chunks() const {  // token chunks of the K-mean / V-amax partial reduction
    int c = ceil_div(Skv, 512);
    return c < 1 ? 1 : (c > 16 ? 16 : c);
  }
  SAGE3_HD int chunk_len() const { return ceil_div(ceil_div(Skv, n_chunks()), 32) * 32; }
};

struct QuantArgs {
  QuantShapes s;
  bool bf16;  // input dtype: bf16 (true) or fp16
  const void* q; int64_t q_sb, q_sh, q_ss;  // element strides of batch, head, token (channel stride 1)
  const void* k; int64_t k_sb, k_sh, k_ss;
  const void* v; int64_t v_sb, v_sh, v_ss;
  float* partial_ksum;   // [B, Hkv, n_chunks, D]
  float* partial_vamax;  // [B, Hkv, n_chunks, D]
  int8_t* q_i8;          // [B, Hq, Sq, D]
  float* q_scale;        // [B, Hq, n_qgroups]
  float* q_kmean;        // [B, Hq, Sq] = q . k_mean (nullptr: not computed)
  int8_t* k_i8;          // [B, Hkv, Skv, D] (K - mean, quantized)
  float* k_scale;        // [B, Hkv, n_ktiles * 4]
  float* k_mean;         // [B, Hkv, D]
  uint8_t* v_t;          // [B, Hkv, D, skv_pad] e4m3, tokens permuted within 16-token groups, zero padded
  float* v_scale;        // [B, Hkv, D]
};

struct AttnArgs {
  QuantShapes s;
  bool out_bf16;
  bool causal;
  bool return_lse;
  double sm_scale;  // as given by the caller (the reference rounds sm_scale*log2e from a double)
  const int8_t* q_i8; const float* q_scale; const float* q_kmean;
  const int8_t* k_i8; const float* k_scale;
  const uint8_t* v_t; const float* v_scale;
  void* out; int64_t o_sb, o_sh, o_ss;  // element strides of the output (channel stride 1)
  float* lse;                           // [B, Hq, Sq] natural log, or nullptr
  // [B] int32 on the device, or nullptr: batch entry b attends to its first kv_lens[b] keys only (clamped to
  // [0, Skv]; right padding, read by the kernel, no host sync). kv_lens[b] == 0 gives zero output rows, LSE -inf.
  const int* kv_lens;
};

// Two launches: partial K sums / V amax, then one fused Q/K/V quantization pass.
cudaError_t launch_quantize(const QuantArgs& a, cudaStream_t stream);
// One launch each; return cudaErrorInvalidValue (with a message in *err) for unsupported arguments.
cudaError_t launch_attn_hd64(const AttnArgs& a, cudaStream_t stream, const char** err);
cudaError_t launch_attn_hd128(const AttnArgs& a, cudaStream_t stream, const char** err);

}  // namespace sage3::sm90
