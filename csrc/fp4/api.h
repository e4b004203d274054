// Host entry points of the NVFP4 (SageAttention3) kernels; plain pointers, no torch. The torch binding
// (binding.cpp) allocates, checks and calls these. The MMA test hooks are in testing/ (a separate test-only extension).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sage3 {

constexpr int kFp4Tile = 128;  // query block, key tile and second-level-scale tile (the spec's q_block/kv_tile)

enum class Fp4InDtype : int { kFloat16 = 0, kBFloat16 = 1 };

// Q' = Q - mean (per 128-row tile: mean row `tile` of `mean`, or one mean for all tiles when mean_tile_stride
// is 0), quantized to NVFP4 with 1x16 blocks along D and the tile's second-level scale g = amax/2688.
// x: [B, H, S, D] with element strides (sb, sh, ss) and stride 1 along D. mean: fp32, row `tile` of head
// (b, h) at mean + ((b*H + h)*mean_tiles_per_head + tile*(mean_tile_stride != 0)) * D.
// Outputs (contiguous): codes [B, H, S_pad, D/2], scales [B, H, S_pad, D/16] (E4M3 bytes), tile_scale
// [B, H, S_pad/128] fp32. Rows >= S are written as zeros.
cudaError_t fp4_quantize_rows(const void* x, Fp4InDtype dtype, int64_t sb, int64_t sh, int64_t ss, int B, int H,
                              int S, int D, const float* mean, int mean_tiles_per_head, bool mean_per_tile,
                              uint8_t* codes, uint8_t* scales, float* tile_scale, cudaStream_t stream);

// V quantized per channel with 1x16 blocks along the tokens of each 128-token tile and per-(tile, channel)
// second-level scale. v: [B, H, S, D] strides (sb, sh, ss), stride 1 along D. Outputs (contiguous):
// codes [B, H, D, S_pad/2] (V transposed: tokens packed along the last dim), scales [B, H, D, S_pad/16],
// tile_scale [B, H, S_pad/128, D]. Tokens >= S are zeros.
cudaError_t fp4_quantize_v(const void* v, Fp4InDtype dtype, int64_t sb, int64_t sh, int64_t ss, int B, int H, int S,
                           int D, uint8_t* codes, uint8_t* scales, float* tile_scale, cudaStream_t stream);

struct Fp4AttnParams {
  const uint8_t* q_codes;  const uint8_t* q_scales;  const float* q_tile_scale;   // [B, Hq, Sq_pad, ...]
  const uint8_t* k_codes;  const uint8_t* k_scales;  const float* k_tile_scale;   // [B, Hkv, Skv_pad, ...]
  const uint8_t* v_codes;  const uint8_t* v_scales;  const float* v_tile_scale;   // [B, Hkv, D, Skv_pad/...]
  const float* delta_s;    // [B, Hq, q_tiles, Skv] fp32, q̄_b · K'ᵀ for the query tiles of this launch
  void* out;               // [B, Hq, Sq, D] of Fp4InDtype, strides (osb, osh, oss), stride 1 along D
  int64_t osb, osh, oss;
  float* lse_log2;         // [B, Hq, Sq] fp32: m + log2(l) - log2(2688), or null
  int B, Hq, Hkv, Sq, Skv, D;
  int q_tile0;             // first 128-row query tile of this launch (launches cover query tiles in chunks,
  int q_tiles;             // q_tiles of them, so ΔS never needs [Sq/128, Skv] at once for long sequences)
  bool causal;
  float score_scale_log2;  // sm_scale * log2(e), as fp32
  float p_offset_log2;     // log2(448 * 6), as fp32
};

cudaError_t fp4_attention(const Fp4AttnParams& p, Fp4InDtype dtype, cudaStream_t stream);

}  // namespace sage3
