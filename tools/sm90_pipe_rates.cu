// Issue cost of the attention softmax's instructions on one SM sub-partition (SMSP), measured with clock64():
// cycles per warp-instruction with 1 or 2 warps per SMSP, each op alone and paired with MUFU.EX2 (a pair on a
// shared pipe costs the sum, on separate pipes the max). Torch-free.
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a tools/sm90_pipe_rates.cu -o /tmp/pipes && /tmp/pipes
// On Hopper: MUFU.EX2 8.0 cycles (4 lanes/clk/SMSP); F2FP e4m3x2 ~1.1; FADD ~1.1; IMNMX ~2; cvt.rn.f32.s32
// (I2FP) does not share the MUFU pipe (a MUFU + I2F pair costs 8.2, the max).
#include <cstdio>
#include <cstdint>
#define N 8
#define ITERS 256
template <int OP>
__device__ __forceinline__ void op(float (&f)[N], int (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (OP == 0) asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(f[i]));
    if (OP == 6) { x[i] += (x[i] >> 3) | 1; }  // the IADD/LOP part of OP 1 without the conversion
    if (OP == 7) { float g = __int_as_float(x[i] + 0x4B400000) - 12582912.f; x[i] += __float_as_int(g) | 1; }  // magic
    if (OP == 1) { float g; asm volatile("cvt.rn.f32.s32 %0, %1;" : "=f"(g) : "r"(x[i])); x[i] += __float_as_int(g) | 1; }
    if (OP == 2) { uint16_t h; asm volatile("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(f[i]), "f"(f[(i+1)%N])); x[i] += h; }
    if (OP == 3) asm volatile("add.f32 %0, %0, %1;" : "+f"(f[i]) : "f"(f[(i+3)%N]));
    if (OP == 4) asm volatile("max.s32 %0, %0, %1;" : "+r"(x[i]) : "r"(x[(i+3)%N]));
    if (OP == 5) { uint32_t h; asm volatile("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(f[i]), "f"(f[(i+1)%N])); x[i] += h; }
  }
}
template <int A, int B>
__global__ void bench(long long* out, float seed) {
  float f[N]; int x[N];
  for (int i = 0; i < N; ++i) { f[i] = seed * (threadIdx.x + i); x[i] = threadIdx.x * 7 + i; }
  __syncthreads();
  long long t0 = clock64();
  for (int it = 0; it < ITERS; ++it) {
    op<A>(f, x);
    if (B >= 0) op<B>(f, x);
  }
  long long t1 = clock64();
  float s = 0; for (int i = 0; i < N; ++i) s += f[i] + x[i];
  if (s == 12345.f) out[1] = 1;
  if (threadIdx.x == 0) out[0] = t1 - t0;
}
const char* names[] = {"MUFU.EX2", "I2F+IADD+LOP", "F2FP e4m3x2", "FADD", "IMNMX", "F2FP f16x2", "IADD+LOP+SHF", "magic IADD+FADD+..."};
template <int A, int B>
void run(long long* d, int warps_per_smsp) {
  bench<A, B><<<132, 128 * warps_per_smsp>>>(d, 0.001f);
  long long h;
  cudaMemcpy(&h, d, 8, cudaMemcpyDeviceToHost);
  double per = double(h) / (ITERS * N * (B >= 0 ? 2 : 1));
  printf("%-22s %-22s warps/SMSP %d: %6.2f cycles per warp-instruction per SMSP (%.2f per warp)\n", names[A],
         B >= 0 ? names[B] : "-", warps_per_smsp, per / warps_per_smsp, per);
}
int main() {
  long long* d; cudaMalloc(&d, 16);
  for (int w = 1; w <= 2; ++w) {
    run<0, -1>(d, w); run<1, -1>(d, w); run<2, -1>(d, w); run<3, -1>(d, w); run<4, -1>(d, w); run<5, -1>(d, w);
    run<0, 1>(d, w); run<0, 2>(d, w); run<0, 3>(d, w); run<1, 2>(d, w); run<0, 5>(d, w);
    run<6, -1>(d, w); run<7, -1>(d, w); run<0, 6>(d, w); run<0, 7>(d, w);
  }
  return 0;
}
