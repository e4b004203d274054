// Timing harness for the sm90 quantization kernels (csrc/sm90/quant.cu), without torch: random 16-bit Q/K/V
// on the GPU, the two launches run twice on the same inputs into two sets of output buffers pre-filled with
// different poison bytes, every buffer compared byte for byte (so the kernels are deterministic and write every
// byte), then CUDA-event timing of each launch (kv_stats, quantize_qkv; median of 25 after warm-up) with the
// bytes each moves. Numerics against the reference are tested in tests/gpu/test_cuda_sm90.py.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc -Itools -gencode=arch=compute_90a,code=sm_90a \
//        tools/sm90_quant_bench.cu -o /tmp/sm90_quant_bench && /tmp/sm90_quant_bench
//   /tmp/sm90_quant_bench check     (the byte comparison only, no timing)
//
// Exit status 0 only if every case is byte-identical across the two runs. The data: randn-like values (sum of uniforms) with a
// large per-channel K offset, sparse |x| ~ 1e3 outliers and bf16-subnormal values, in HND or NHD layout; plus
// degenerate-channel cases (an all-zero V channel: scale 0; inf and NaN in V and K).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "check_cuda.h"
#include "sm90/quant.cu"

// A named namespace: an anonymous one here would make the kernel stubs' references to quant.cu's anonymous
// namespace (sage3::sm90::<anon>) ambiguous once `using namespace` is in effect.
namespace qbench {
using namespace sage3::sm90;

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
  return (uint32_t)x;
}

// Logical [B, H, S, D] element i -> value, stored at the layout's offset. kind: 0 Q, 1 K, 2 V.
// special: inf / NaN / an all-zero channel in head (0, 0) (V channel 5 zero; V inf at (t 5, ch 3), NaN at
// (t 7, ch 9); K inf at (t 3, ch 11)).
template <typename T>
__global__ void fill_kernel(T* p, int B, int H, int S, int D, bool nhd, int kind, uint32_t seed, bool special) {
  const int64_t n = (int64_t)B * H * S * D;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int d = (int)(i % D);
    const int64_t r = i / D;
    const int s = (int)(r % S), h = (int)(r / S % H), b = (int)(r / S / H);
    const uint32_t u = hash32(((uint64_t)seed << 40) ^ (uint64_t)i);
    const uint32_t w = hash32(((uint64_t)(seed + 1) << 40) ^ (uint64_t)i);
    float x = (((u & 0xffff) + (u >> 16) + (w & 0xffff) + (w >> 16)) * (1.f / 65536.f) - 2.f) * 1.7f;
    if ((w & 0xfff) == 7) x *= 1000.f;               // outliers
    if ((w & 0x1fff) == 9) x *= 0x1p-128f;           // bf16 subnormals (fp16 flushes them to 0)
    if (kind == 0) x *= 3.f;
    if (kind == 1) x += 100.f * (float)(d % 7 - 3) + 0.37f * d;  // per-channel K offset (mean smoothing)
    if (kind == 2) x *= 1.f + (d % 5);
    if (special && b == 0 && h == 0) {
      if (kind == 2 && d == 5) x = 0.f;
      if (kind == 2 && s == 5 && d == 3) x = INFINITY;
      if (kind == 2 && s == 7 && d == 9) x = NAN;
      if (kind == 1 && s == 3 && d == 11) x = INFINITY;
    }
    const int64_t off = nhd ? (((int64_t)b * S + s) * H + h) * D + d : i;
    p[off] = T(x);
  }
}

struct Case {
  const char* name;
  int B, Hq, Hkv, Sq, Skv, D;
  bool nhd, bf16, kmean, special, timed;
};

// Device buffers of one run's outputs (each run has its own set, poisoned with its own byte).
struct Outs {
  int poison = 0xab;
  std::vector<std::pair<const char*, std::pair<void*, size_t>>> bufs;
  void* add(const char* name, size_t bytes) {
    void* p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, bytes ? bytes : 1));
    CHECK_CUDA(cudaMemset(p, poison, bytes ? bytes : 1));  // unwritten bytes differ between the two runs
    bufs.push_back({name, {p, bytes}});
    return p;
  }
  ~Outs() {
    for (auto& b : bufs) cudaFree(b.second.first);
  }
};

QuantArgs make_args(const Case& c, const void* q, const void* k, const void* v, Outs& o) {
  QuantArgs a{};
  a.s = QuantShapes{c.B, c.Hq, c.Hkv, c.Sq, c.Skv, c.D};
  const QuantShapes& s = a.s;
  a.bf16 = c.bf16;
  auto strides = [&](int H, int S, int64_t& sb, int64_t& sh, int64_t& ss) {
    sb = (int64_t)H * S * c.D;
    sh = c.nhd ? c.D : (int64_t)S * c.D;
    ss = c.nhd ? (int64_t)H * c.D : c.D;
  };
  a.q = q; strides(c.Hq, c.Sq, a.q_sb, a.q_sh, a.q_ss);
  a.k = k; strides(c.Hkv, c.Skv, a.k_sb, a.k_sh, a.k_ss);
  a.v = v; strides(c.Hkv, c.Skv, a.v_sb, a.v_sh, a.v_ss);
  const size_t bhq = (size_t)s.B * s.Hq, bhk = (size_t)s.B * s.Hkv;
  a.partial_ksum = (float*)o.add("partial_ksum", bhk * s.n_chunks() * s.D * 4);
  a.partial_vamax = (float*)o.add("partial_vamax", bhk * s.n_chunks() * s.D * 4);
  a.q_i8 = (int8_t*)o.add("q_i8", bhq * s.Sq * s.D);
  a.q_scale = (float*)o.add("q_scale", bhq * s.n_qgroups() * 4);
  a.q_kmean = c.kmean ? (float*)o.add("q_kmean", bhq * s.Sq * 4) : nullptr;
  a.k_i8 = (int8_t*)o.add("k_i8", bhk * s.Skv * s.D);
  a.k_scale = (float*)o.add("k_scale", bhk * s.n_ktiles() * 4 * 4);
  a.k_mean = (float*)o.add("k_mean", bhk * s.D * 4);
  a.v_t = (uint8_t*)o.add("v_t", bhk * s.D * s.skv_pad());
  a.v_scale = (float*)o.add("v_scale", bhk * s.D * 4);
  return a;
}

template <int D, typename T>
struct Launchers {
  static cudaError_t stats(const QuantArgs& a) { return launch_stats<D, T>(a, 0); }
  static cudaError_t qkv(const QuantArgs& a) { return launch_qkv<D, T>(a, 0); }
};
using LaunchFn = cudaError_t (*)(const QuantArgs&);
struct Fns { LaunchFn stats, qkv; };

template <int D, typename T>
Fns fns_for() {
  using L = Launchers<D, T>;
  return Fns{L::stats, L::qkv};
}
Fns pick(const Case& c) {
  if (c.D == 128) return c.bf16 ? fns_for<128, __nv_bfloat16>() : fns_for<128, __half>();
  return c.bf16 ? fns_for<64, __nv_bfloat16>() : fns_for<64, __half>();
}

// Bytes each launch moves (DRAM-level lower bound: inputs read once, outputs written once).
void launch_bytes(const Case& c, double& stats_b, double& qkv_b) {
  const QuantShapes s{c.B, c.Hq, c.Hkv, c.Sq, c.Skv, c.D};
  const double nq = (double)c.B * c.Hq * c.Sq * c.D, nk = (double)c.B * c.Hkv * c.Skv * c.D;
  const double part = 2.0 * c.B * c.Hkv * s.n_chunks() * c.D * 4;
  stats_b = 2 * nk * 2 + part;
  qkv_b = (nq + 2 * nk) * 2 + part + nq + nk + (double)c.B * c.Hkv * c.D * s.skv_pad() +
          (double)c.B * c.Hq * s.n_qgroups() * 4 + (c.kmean ? nq / c.D * 4 : 0) + (double)c.B * c.Hkv * s.n_ktiles() * 16;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Returns the number of mismatching bytes (0: identical).
size_t run_case(const Case& c, bool timing) {
  const size_t esz = 2;
  const size_t nq = (size_t)c.B * c.Hq * c.Sq * c.D, nk = (size_t)c.B * c.Hkv * c.Skv * c.D;
  void *q, *k, *v;
  CHECK_CUDA(cudaMalloc(&q, nq * esz));
  CHECK_CUDA(cudaMalloc(&k, nk * esz));
  CHECK_CUDA(cudaMalloc(&v, nk * esz));
  const uint32_t seed = 1000u + (uint32_t)c.Skv + 7u * c.Hq;
  if (c.bf16) {
    fill_kernel<__nv_bfloat16><<<2048, 256>>>((__nv_bfloat16*)q, c.B, c.Hq, c.Sq, c.D, c.nhd, 0, seed, c.special);
    fill_kernel<__nv_bfloat16><<<2048, 256>>>((__nv_bfloat16*)k, c.B, c.Hkv, c.Skv, c.D, c.nhd, 1, seed + 2, c.special);
    fill_kernel<__nv_bfloat16><<<2048, 256>>>((__nv_bfloat16*)v, c.B, c.Hkv, c.Skv, c.D, c.nhd, 2, seed + 4, c.special);
  } else {
    fill_kernel<__half><<<2048, 256>>>((__half*)q, c.B, c.Hq, c.Sq, c.D, c.nhd, 0, seed, c.special);
    fill_kernel<__half><<<2048, 256>>>((__half*)k, c.B, c.Hkv, c.Skv, c.D, c.nhd, 1, seed + 2, c.special);
    fill_kernel<__half><<<2048, 256>>>((__half*)v, c.B, c.Hkv, c.Skv, c.D, c.nhd, 2, seed + 4, c.special);
  }
  CHECK_CUDA(cudaGetLastError());
  const Fns f = pick(c);
  size_t bad_total = 0;
  std::string bad_names;
  {
    Outs o[2];
    o[1].poison = 0xcd;
    QuantArgs a[2] = {make_args(c, q, k, v, o[0]), make_args(c, q, k, v, o[1])};
    for (int run = 0; run < 2; ++run) {
      CHECK_CUDA(f.stats(a[run]));
      CHECK_CUDA(f.qkv(a[run]));
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    for (size_t i = 0; i < o[0].bufs.size(); ++i) {
      const size_t n = o[0].bufs[i].second.second;
      std::vector<uint8_t> h0(n), h1(n);
      CHECK_CUDA(cudaMemcpy(h0.data(), o[0].bufs[i].second.first, n, cudaMemcpyDeviceToHost));
      CHECK_CUDA(cudaMemcpy(h1.data(), o[1].bufs[i].second.first, n, cudaMemcpyDeviceToHost));
      size_t bad = 0;
      for (size_t j = 0; j < n; ++j) bad += h0[j] != h1[j];
      if (bad) bad_names += std::string(" ") + o[0].bufs[i].first + "(" + std::to_string(bad) + ")";
      bad_total += bad;
    }
    std::printf("%-34s %s%s\n", c.name, bad_total ? "MISMATCH bytes:" : "identical", bad_names.c_str());

    if (timing && c.timed) {
      cudaEvent_t ev[3];
      for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
      std::vector<float> ts, tq;
      for (int rep = 0; rep < 28; ++rep) {
        CHECK_CUDA(cudaEventRecord(ev[0]));
        CHECK_CUDA(f.stats(a[0]));
        CHECK_CUDA(cudaEventRecord(ev[1]));
        CHECK_CUDA(f.qkv(a[0]));
        CHECK_CUDA(cudaEventRecord(ev[2]));
        CHECK_CUDA(cudaEventSynchronize(ev[2]));
        float t1, t2;
        CHECK_CUDA(cudaEventElapsedTime(&t1, ev[0], ev[1]));
        CHECK_CUDA(cudaEventElapsedTime(&t2, ev[1], ev[2]));
        if (rep >= 3) {  // warm-up
          ts.push_back(t1 * 1e3f);
          tq.push_back(t2 * 1e3f);
        }
      }
      double sb, qb;
      launch_bytes(c, sb, qb);
      const float s_us = median(ts), q_us = median(tq);
      std::printf("    kv_stats %7.1f us %5.0f GB/s | quantize_qkv %7.1f us %5.0f GB/s | total %7.1f us\n", s_us,
                  sb / s_us * 1e-3, q_us, qb / q_us * 1e-3, s_us + q_us);
      for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
    }
  }
  CHECK_CUDA(cudaFree(q));
  CHECK_CUDA(cudaFree(k));
  CHECK_CUDA(cudaFree(v));
  return bad_total;
}

}  // namespace qbench

int main(int argc, char** argv) {
  const bool timing = !(argc > 1 && std::strcmp(argv[1], "check") == 0);
  int dev = 0;
  cudaDeviceProp prop;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  //                name                                  B  Hq  Hkv    Sq     Skv    D  nhd   bf16  kmean special timed
  using qbench::Case;
  const Case cases[] = {
      {"hd128 B4 H16 S4096 bf16 HND",        4, 16, 16,   4096,   4096, 128, false, true,  false, false, true},
      {"Flux B1 H24 S4608 D128 bf16 HND",    1, 24, 24,   4608,   4608, 128, false, true,  false, false, true},
      {"hd64 B4 H32 S4096 bf16 HND",         4, 32, 32,   4096,   4096,  64, false, true,  false, false, true},
      {"SD3.5 B2 H38 S4429 D64 bf16 HND",    2, 38, 38,   4429,   4429,  64, false, true,  false, false, true},
      {"long B1 H24 S119056 D128 bf16 HND",  1, 24, 24, 119056, 119056, 128, false, true,  false, false, true},
      {"hd128 B2 H8 S4095 bf16 NHD kmean",   2,  8,  8,   4095,   4095, 128, true,  true,  true,  false, false},
      {"hd128 B3 H4/2 S77 bf16 GQA kmean",   3,  4,  2,     77,     77, 128, false, true,  true,  false, false},
      {"hd64 B2 H6 S4095 bf16 NHD kmean",    2,  6,  6,   4095,   4095,  64, true,  true,  true,  false, false},
      {"hd64 B1 H4/1 Sq300 Skv77 bf16 GQA",  1,  4,  1,    300,     77,  64, false, true,  false, false, false},
      {"hd128 B2 H4 S1000 fp16 HND kmean",   2,  4,  4,   1000,   1000, 128, false, false, true,  false, false},
      {"hd64 B1 H4 S333 fp16 NHD",           1,  4,  4,    333,    333,  64, true,  false, false, false, false},
      {"hd128 B1 H2 S500 bf16 inf/NaN/zero", 1,  2,  2,    500,    500, 128, false, true,  true,  true,  false},
      {"hd64 B1 H2 S200 fp16 inf/NaN/zero",  1,  2,  2,    200,    200,  64, true,  false, true,  true,  false},
  };
  size_t bad = 0;
  for (const Case& c : cases) bad += qbench::run_case(c, timing);
  std::printf("%s\n", bad ? "FAIL: the two runs differ" : "PASS: both runs byte-identical, every byte written");
  return bad ? 1 : 0;
}
