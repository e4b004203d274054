// SageAttention3 NVFP4 attention forward: block-scaled FP4 MMA for Q·Kᵀ and P·V, online softmax over key tiles of
// 128, two-level P quantization, fp32 accumulation. Numerics: sage3_diffusers/numerics/sage3_reference.py.
//
// CTA = one 128-row query block of one (batch, query head); 8 warps, warp w owns rows 16w..16w+15.
// Key order trick: the S accumulator of the m16n8k64 MMA gives thread t of a quad columns 8j+2t, 8j+2t+1 of
// n-tile j, but the A operand of P·V wants thread t to hold k = 8t..8t+7 (and 32+8t..). We therefore load K rows
// into shared memory permuted (smem row c of a 64-key chunk holds key sigma(c)) so that accumulator column
// 8j+2t+e is key 32*(j/4) + 8t + 2*(j%4) + e: each thread's S values then *are* its P fragment, in real key
// order, and the 16-key NVFP4 blocks of P are exactly the spec's blocks of 16 consecutive keys. V stays in
// natural token order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/fp4_convert.cuh"
#include "common/smem.cuh"
#include "common/store_pair.cuh"
#include "fp4/api.h"
#include "fp4/mma.cuh"

namespace sage3 {
namespace {

constexpr int kAttnThreads = 256;
constexpr int kWarpRows = 16;

__device__ __forceinline__ uint32_t ld32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Key (within a 64-key chunk) held by accumulator column c = 8j + 2t + e, i.e. the key that smem row c holds.
__device__ __forceinline__ int chunk_key_of_column(int c) {
  const int j = c >> 3, g = c & 7;  // n-tile, column within the n-tile (= 2t + e)
  return 32 * (j >> 2) + 8 * (g >> 1) + 2 * (j & 3) + (g & 1);
}

template <int D>
struct TileSmem {
  static constexpr int kKRow = D / 2 + 16;           // bytes per key row (padded: conflict-free fragment loads)
  static constexpr int kKScale = D / 16;             // scale bytes per key
  static constexpr int kVRow = kFp4Tile / 2 + 16;    // bytes per V channel row (128 tokens, padded)
  alignas(16) uint8_t k[kFp4Tile * kKRow];
  alignas(16) uint8_t ks[kFp4Tile * kKScale];
  alignas(16) uint8_t v[D * kVRow];
  alignas(16) uint8_t vs[D * (kFp4Tile / 16)];
  alignas(16) float ds[kFp4Tile];
  alignas(16) float vg[D];
};

template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid = true) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const int src_bytes = valid ? kBytes : 0;  // 0: zero-fill the destination
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Issue the copies of key tile `kt` into `t` (K rows permuted, see the file comment).
template <int D>
__device__ __forceinline__ void load_tile(TileSmem<D>& t, const Fp4AttnParams& p, int64_t khead, int kt, int n_kt_all,
                                          int skv_pad, const float* ds_row) {
  constexpr int kKRow = TileSmem<D>::kKRow, kKScale = TileSmem<D>::kKScale, kVRow = TileSmem<D>::kVRow;
  const uint8_t* kc = p.k_codes + (khead * skv_pad + kt * kFp4Tile) * (D / 2);
  constexpr int kChunks = D / 32;  // 16-byte pieces per key row
  for (int i = threadIdx.x; i < kFp4Tile * kChunks; i += kAttnThreads) {
    const int c = i / kChunks, part = i % kChunks;
    const int key = (c & ~63) + chunk_key_of_column(c & 63);
    cp_async<16>(t.k + c * kKRow + part * 16, kc + key * (D / 2) + part * 16);
  }
  const uint8_t* ksc = p.k_scales + (khead * skv_pad + kt * kFp4Tile) * kKScale;
  for (int c = threadIdx.x; c < kFp4Tile; c += kAttnThreads) {
    const int key = (c & ~63) + chunk_key_of_column(c & 63);
    cp_async<kKScale>(t.ks + c * kKScale, ksc + key * kKScale);
  }
  const uint8_t* vc = p.v_codes + khead * D * (skv_pad / 2) + kt * (kFp4Tile / 2);
  for (int i = threadIdx.x; i < D * 4; i += kAttnThreads) {
    const int ch = i >> 2, part = i & 3;
    cp_async<16>(t.v + ch * kVRow + part * 16, vc + static_cast<int64_t>(ch) * (skv_pad / 2) + part * 16);
  }
  const uint8_t* vsc = p.v_scales + khead * D * (skv_pad / 16) + kt * (kFp4Tile / 16);
  const float* vg = p.v_tile_scale + (khead * n_kt_all + kt) * D;
  for (int ch = threadIdx.x; ch < D; ch += kAttnThreads) {
    cp_async<8>(t.vs + ch * 8, vsc + static_cast<int64_t>(ch) * (skv_pad / 16));
    cp_async<4>(t.vg + ch, vg + ch);
  }
  for (int i = threadIdx.x; i < kFp4Tile; i += kAttnThreads) {
    const int key = kt * kFp4Tile + i;
    const bool valid = key < p.Skv;
    cp_async<4>(t.ds + i, ds_row + (valid ? key : 0), valid);  // keys past Skv: 0 (they are masked anyway)
  }
}

template <int D, typename T>
__global__ void __launch_bounds__(kAttnThreads) fp4_attention_kernel(const Fp4AttnParams p) {
  constexpr int kSteps = D / 64;        // k-steps of Q·Kᵀ
  constexpr int kOutTiles = D / 8;      // n-tiles of the output
  constexpr int kKRow = TileSmem<D>::kKRow, kKScale = TileSmem<D>::kKScale, kVRow = TileSmem<D>::kVRow;
  // Two stages: the next key tile streams in (cp.async) while this one is computed.
  __shared__ TileSmem<D> smem[2];

  const int qt = p.q_tile0 + blockIdx.x, hq = blockIdx.y, b = blockIdx.z;  // qt: query tile in the whole Q
  const int n_qt = (p.Sq + kFp4Tile - 1) / kFp4Tile, sq_pad = n_qt * kFp4Tile;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int n_kt_all = (p.Skv + kFp4Tile - 1) / kFp4Tile, skv_pad = n_kt_all * kFp4Tile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t qhead = static_cast<int64_t>(b) * p.Hq + hq, khead = static_cast<int64_t>(b) * p.Hkv + hkv;
  const int row_g = qt * kFp4Tile + warp * kWarpRows + g;  // this thread's rows: row_g and row_g + 8

  // Q fragments and scale words stay in registers for the whole key loop.
  uint32_t qa[kSteps][4], qsf[kSteps];
  {
    const uint8_t* qc0 = p.q_codes + (qhead * sq_pad + row_g) * (D / 2);
    const uint8_t* qc1 = qc0 + 8 * (D / 2);
    const uint8_t* qs = p.q_scales + (qhead * sq_pad + row_g + ((t & 1) ? 8 : 0)) * kKScale;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      qa[ks][0] = ld32(qc0 + ks * 32 + 4 * t);
      qa[ks][1] = ld32(qc1 + ks * 32 + 4 * t);
      qa[ks][2] = ld32(qc0 + ks * 32 + 16 + 4 * t);
      qa[ks][3] = ld32(qc1 + ks * 32 + 16 + 4 * t);
      qsf[ks] = t < 2 ? ld32(qs + 4 * ks) : 0u;  // lanes 4g (row g) and 4g+1 (row g+8) provide SF_A
    }
  }
  const float gq = p.q_tile_scale[qhead * n_qt + qt];
  const float neg_inf = -__int_as_float(0x7f800000);

  float o[kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_run[2] = {neg_inf, neg_inf}, l_run[2] = {0.0f, 0.0f};

  const int n_kt = p.causal ? min(n_kt_all, qt + 1) : n_kt_all;  // top-left causal: key j visible iff j <= i
  const float* ds_row = p.delta_s + (qhead * gridDim.x + blockIdx.x) * static_cast<int64_t>(p.Skv);
  if (n_kt > 0) load_tile<D>(smem[0], p, khead, 0, n_kt_all, skv_pad, ds_row);
  cp_async_commit();
  for (int kt = 0; kt < n_kt; ++kt) {
    const TileSmem<D>& tile = smem[kt & 1];
    if (kt + 1 < n_kt) load_tile<D>(smem[(kt + 1) & 1], p, khead, kt + 1, n_kt_all, skv_pad, ds_row);
    cp_async_commit();
    cp_async_wait_all_but_newest();  // this tile's copies (this thread's) have landed
    __syncthreads();                 // ... and everyone else's
    const uint8_t* s_k = tile.k;
    const uint8_t* s_ks = tile.ks;
    const uint8_t* s_v = tile.v;
    const uint8_t* s_vs = tile.vs;
    const float* s_ds = tile.ds;
    const float* s_vg = tile.vg;

    // S = Q̂'·K̂'ᵀ (block-scaled FP4 MMA), 16 n-tiles of 8 keys.
    float s[16][4];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
      const uint8_t* krow = s_k + (8 * j + g) * kKRow;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const uint32_t kb[2] = {ld32(krow + ks * 32 + 4 * t), ld32(krow + ks * 32 + 16 + 4 * t)};
        const uint32_t ksf = t == 0 ? ld32(s_ks + (8 * j + g) * kKScale + 4 * ks) : 0u;
        mma_nvfp4_m16n8k64(s[j], qa[ks], kb, s[j], qsf[ks], ksf);
      }
    }

    // Scores in the log2 domain, masks, running max.
    const float qk_scale = gq * p.k_tile_scale[khead * n_kt_all + kt];
    float tile_max[2] = {neg_inf, neg_inf};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key_local = 64 * (j >> 3) + 32 * ((j & 7) >> 2) + 8 * t + 2 * (j & 3) + e;
        const int key = kt * kFp4Tile + key_local;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float v = (s[j][2 * r + e] * qk_scale + s_ds[key_local]) * p.score_scale_log2;
          if (key >= p.Skv || (p.causal && key > row_g + 8 * r)) v = neg_inf;
          s[j][2 * r + e] = v;
          tile_max[r] = fmaxf(tile_max[r], v);
        }
      }
    }
    float m_safe[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m_run[r], tile_max[r]);
      m_safe[r] = m_new == neg_inf ? 0.0f : m_new;  // rows that saw only masked keys keep P = 0
      alpha[r] = exp2f(m_run[r] - m_safe[r]);
      m_run[r] = m_new;
    }
    // Level 1: P̃ = exp2(t - m + log2(2688)), row sums from fp32 P̃.
    float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;
        const float pv = exp2f((s[j][i] - m_safe[r]) + p.p_offset_log2);
        s[j][i] = pv;
        row_sum[r] += pv;
      }
    }
    l_run[0] = l_run[0] * alpha[0] + row_sum[0];
    l_run[1] = l_run[1] * alpha[1] + row_sum[1];

    // Level 2: NVFP4 blocks of 16 consecutive keys (this thread's 8 + its quad partner's 8), scale
    // e4m3(blockmax/6), codes e2m1(P̃/scale) with the rounded scale. Packed straight into A fragments.
    uint32_t pa[2][4], psf[2];
#pragma unroll
    for (int chunk = 0; chunk < 2; ++chunk) {
      uint32_t sbyte[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float vals[8];
          float bmax = 0.0f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              vals[2 * q + e] = s[8 * chunk + 4 * hh + q][2 * r + e];
              bmax = fmaxf(bmax, vals[2 * q + e]);
            }
          }
          bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
          const uint8_t sb = e4m3_encode(__fdiv_rn(bmax, kE2M1Max));
          const float scale = e4m3_decode(sb);
#pragma unroll
          for (int i = 0; i < 8; ++i) vals[i] = scale == 0.0f ? 0.0f : __fdiv_rn(vals[i], scale);
          pa[chunk][r + 2 * hh] = e2m1x8_pack(vals);
          sbyte[r][hh] = sb;
        }
      }
      // SF_A word: lane 4g (row g) and 4g+1 (row g+8) each need blocks {0,1,2,3} = (hh, t>>1); blocks of the
      // t>>1 == 1 half come from lane + 2.
      const uint32_t pair = (t & 1) ? (sbyte[1][0] | (sbyte[1][1] << 8)) : (sbyte[0][0] | (sbyte[0][1] << 8));
      const uint32_t other = __shfl_down_sync(0xffffffffu, pair, 2);
      psf[chunk] = (pair & 0xFFu) | ((other & 0xFFu) << 8) | (((pair >> 8) & 0xFFu) << 16) |
                   (((other >> 8) & 0xFFu) << 24);
    }

    // O_tile = P̂·V̂ (per-tile fresh accumulator), then O = O·alpha + g_v·O_tile.
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      float ot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint8_t* vrow = s_v + (8 * n + g) * kVRow;
#pragma unroll
      for (int chunk = 0; chunk < 2; ++chunk) {
        const uint32_t vb[2] = {ld32(vrow + chunk * 32 + 4 * t), ld32(vrow + chunk * 32 + 16 + 4 * t)};
        const uint32_t vsf = t == 0 ? ld32(s_vs + (8 * n + g) * 8 + 4 * chunk) : 0u;
        mma_nvfp4_m16n8k64(ot, pa[chunk], vb, ot, psf[chunk], vsf);
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float gv = s_vg[8 * n + 2 * t + e];
        o[n][e] = o[n][e] * alpha[0] + ot[e] * gv;
        o[n][2 + e] = o[n][2 + e] * alpha[1] + ot[2 + e] * gv;
      }
    }
    __syncthreads();  // all reads of this stage are done before the next prefetch overwrites it
  }

  // Row sums live split over the quad.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  T* out = static_cast<T*>(p.out) + b * p.osb + hq * p.osh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_g + 8 * r;
    if (row >= p.Sq) continue;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      store_pair<T>(out + row * p.oss + 8 * n + 2 * t, __fdiv_rn(o[n][2 * r], l_run[r]),
                __fdiv_rn(o[n][2 * r + 1], l_run[r]));
    }
    if (p.lse_log2 != nullptr && t == 0)
      p.lse_log2[qhead * p.Sq + row] = m_run[r] + log2f(l_run[r]) - p.p_offset_log2;
  }
}

template <int D>
cudaError_t launch(const Fp4AttnParams& p, Fp4InDtype dtype, cudaStream_t stream) {
  const dim3 grid(p.q_tiles, p.Hq, p.B);
  if (dtype == Fp4InDtype::kFloat16) {
    fp4_attention_kernel<D, __half><<<grid, kAttnThreads, 0, stream>>>(p);
  } else {
    fp4_attention_kernel<D, __nv_bfloat16><<<grid, kAttnThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t fp4_attention(const Fp4AttnParams& p, Fp4InDtype dtype, cudaStream_t stream) {
  if (p.Sq == 0 || p.B == 0 || p.Hq == 0 || p.q_tiles == 0) return cudaSuccess;
  if (p.q_tile0 < 0 || p.q_tile0 + p.q_tiles > (p.Sq + kFp4Tile - 1) / kFp4Tile) return cudaErrorInvalidValue;
  if (p.D == 64) return launch<64>(p, dtype, stream);
  if (p.D == 128) return launch<128>(p, dtype, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sage3
