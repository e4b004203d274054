// Standalone timing and phase trace of the sm90 INT8-QK / FP8-PV attention kernel, without torch: random
// already-quantized inputs (INT8 Q/K, e4m3 V^T, positive scales), the kernel alone, CUDA-event timing, and with
// -DSAGE3_SM90_TRACE=1 the per-tile phase timeline of CTA (0, 0, 0) (tools/sm90_trace.cuh).
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc -Itools -gencode=arch=compute_90a,code=sm_90a \
//        -DSAGE3_SM90_TRACE=1 tools/sm90_attn_trace.cu -o /tmp/sm90_attn_trace
//   /tmp/sm90_attn_trace [B H S D [causal]]        (default 4 16 4096 128 0)
//
// Timing with the trace compiled in includes the clock reads (a few per tile per warp, ~10% slower); build
// without -DSAGE3_SM90_TRACE for a clean kernel-alone number.
// The output line ends with an FNV-1a hash of the output bytes (equal hashes: bit-identical outputs across two
// builds); SAGE3_SM90_DUMP=path also writes the raw bf16 output there.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifndef SAGE3_SM90_TRACE
#define SAGE3_SM90_TRACE 0
#endif

#include "check_cuda.h"
#include "sm90/attn_kernel.cuh"

using namespace sage3::sm90;

namespace {

uint32_t g_rng = 12345u;
uint32_t next_u32() {
  g_rng = g_rng * 1664525u + 1013904223u;
  return g_rng;
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, h.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<int8_t> random_i8(size_t n) {
  std::vector<int8_t> v(n);
  for (auto& x : v) x = static_cast<int8_t>(static_cast<int>(next_u32() % 255u) - 127);
  return v;
}

std::vector<float> constant(size_t n, float value) { return std::vector<float>(n, value); }

}  // namespace

int main(int argc, char** argv) {
  const int B = argc > 1 ? std::atoi(argv[1]) : 4;
  const int H = argc > 2 ? std::atoi(argv[2]) : 16;
  const int S = argc > 3 ? std::atoi(argv[3]) : 4096;
  const int D = argc > 4 ? std::atoi(argv[4]) : 128;
  const bool causal = argc > 5 && std::atoi(argv[5]) != 0;
  if (D != 64 && D != 128) {
    std::fprintf(stderr, "D must be 64 or 128\n");
    return 2;
  }
  QuantShapes s{B, H, H, S, S, D};
  const size_t n_qk = static_cast<size_t>(B) * H * S * D;
  // Scales chosen so scores span a realistic softmax range: |s| <= 127*127*D, times ~1e-4 per unit.
  int8_t* q_i8 = to_device(random_i8(n_qk));
  int8_t* k_i8 = to_device(random_i8(n_qk));
  float* q_scale = to_device(constant(static_cast<size_t>(B) * H * s.n_qgroups(), 0.02f));
  float* k_scale = to_device(constant(static_cast<size_t>(B) * H * s.n_ktiles() * 4, 0.02f));
  std::vector<uint8_t> vt(static_cast<size_t>(B) * H * D * s.skv_pad());
  for (auto& x : vt) {
    const uint8_t mag = static_cast<uint8_t>(next_u32() % 0x7Fu);  // e4m3 codes 0x00..0x7E: finite, no NaN
    x = static_cast<uint8_t>(mag | ((next_u32() & 1u) << 7));
  }
  uint8_t* v_t = to_device(vt);
  float* v_scale = to_device(constant(static_cast<size_t>(B) * H * D, 0.01f));
  void* out = nullptr;
  CHECK_CUDA(cudaMalloc(&out, n_qk * 2));

  AttnArgs a{};
  a.s = s;
  a.out_bf16 = true;
  a.causal = causal;
  a.return_lse = false;
  a.sm_scale = 1.0 / std::sqrt(static_cast<double>(D));
  a.q_i8 = q_i8;
  a.q_scale = q_scale;
  a.q_kmean = nullptr;
  a.k_i8 = k_i8;
  a.k_scale = k_scale;
  a.v_t = v_t;
  a.v_scale = v_scale;
  a.out = out;
  a.o_sb = static_cast<int64_t>(H) * S * D;
  a.o_sh = static_cast<int64_t>(S) * D;
  a.o_ss = D;
  a.lse = nullptr;

  const char* err = "";
  auto launch = [&]() {
    cudaError_t e = D == 128 ? launch_attn<128>(a, nullptr, &err) : launch_attn<64>(a, nullptr, &err);
    if (e != cudaSuccess) {
      std::fprintf(stderr, "launch failed: %s (%s)\n", cudaGetErrorString(e), err);
      std::exit(1);
    }
  };
  for (int i = 0; i < 3; ++i) launch();
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t t0, t1;
  CHECK_CUDA(cudaEventCreate(&t0));
  CHECK_CUDA(cudaEventCreate(&t1));
  const int iters = 20;
  CHECK_CUDA(cudaEventRecord(t0));
  for (int i = 0; i < iters; ++i) launch();
  CHECK_CUDA(cudaEventRecord(t1));
  CHECK_CUDA(cudaEventSynchronize(t1));
  float ms = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
  ms /= iters;
  const double flops = 4.0 * B * H * static_cast<double>(S) * S * D * (causal ? 0.5 : 1.0);
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  // FNV-1a of the output bytes: two builds of the kernel that must compute the same numbers print the same hash
  // for the same arguments (the inputs come from a fixed-seed generator).
  std::vector<uint8_t> host_out(n_qk * 2);
  CHECK_CUDA(cudaMemcpy(host_out.data(), out, host_out.size(), cudaMemcpyDeviceToHost));
  if (const char* dump = std::getenv("SAGE3_SM90_DUMP")) {  // raw bf16 output, for comparing two builds offline
    if (FILE* fh = std::fopen(dump, "wb")) {
      std::fwrite(host_out.data(), 1, host_out.size(), fh);
      std::fclose(fh);
    }
  }
  unsigned long long hash = 1469598103934665603ull;
  for (uint8_t byte : host_out) hash = (hash ^ byte) * 1099511628211ull;
  std::printf("%s  B=%d H=%d S=%d D=%d causal=%d  kernel alone %.3f ms = %.0f TFLOPS  output %016llx%s\n", prop.name, B,
              H, S, D, causal ? 1 : 0, ms, flops / (ms * 1e-3) / 1e12, hash,
              SAGE3_SM90_TRACE ? "  (trace compiled in: includes clock reads)" : "");

#if SAGE3_SM90_TRACE
  std::vector<unsigned long long> tr(2 * kTraceTiles * kTracePoints, 0ull);
  CHECK_CUDA(cudaMemcpyToSymbol(g_attn_trace, tr.data(), tr.size() * sizeof(tr[0])));
  launch();
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpyFromSymbol(tr.data(), g_attn_trace, tr.size() * sizeof(tr[0])));
  const char* names[kTracePoints] = {"start", "max", "turn", "exp2", "issue+", "issue-", "S_j+1", "O_j+="};
  const int n_tiles = std::min(s.n_ktiles(), kTraceTiles);
  std::printf("CTA (0,0,0) phase timeline, cycles since the tile's start (per consumer warpgroup, lane 0 of its first warp;\n"
              "t0 = the tile's start since the first start of either warpgroup)\n");
  for (int cw = 0; cw < 2; ++cw) {
    double sum[kTracePoints] = {0};
    int counted = 0;
    // One origin for both warpgroups (clock64 is per SM), so their t0 columns line up.
    const unsigned long long origin = std::min(tr[(0 * kTraceTiles + 0) * kTracePoints + kTraceStepStart],
                                               tr[(1 * kTraceTiles + 0) * kTracePoints + kTraceStepStart]);
    std::printf("warpgroup %d: tile  t0(abs)", cw);
    for (int p = 1; p < kTracePoints; ++p) std::printf(" %8s", names[p]);
    std::printf("   period\n");
    for (int j = 0; j < n_tiles; ++j) {
      const unsigned long long* row = &tr[(cw * kTraceTiles + j) * kTracePoints];
      const unsigned long long next =
          j + 1 < n_tiles ? tr[(cw * kTraceTiles + j + 1) * kTracePoints + kTraceStepStart] : 0ull;
      std::printf("              %4d %8llu", j, row[0] - origin);
      for (int p = 1; p < kTracePoints; ++p) std::printf(" %8lld", static_cast<long long>(row[p] - row[0]));
      std::printf("   %6lld\n", next ? static_cast<long long>(next - row[0]) : -1ll);
      if (j >= 2 && j + 2 < n_tiles) {  // steady state
        for (int p = 1; p < kTracePoints; ++p) sum[p] += static_cast<double>(row[p] - row[0]);
        sum[0] += static_cast<double>(next - row[0]);
        ++counted;
      }
    }
    if (counted) {
      std::printf("  steady-state mean (tiles 2..%d):", n_tiles - 3);
      for (int p = 1; p < kTracePoints; ++p) std::printf(" %s %.0f", names[p], sum[p] / counted);
      std::printf("; period %.0f cycles per tile\n", sum[0] / counted);
    }
  }
#endif
  return 0;
}
