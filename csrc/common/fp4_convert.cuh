// FP4 E2M1 and FP8 E4M3 conversions for the NVFP4 kernels (pure CUDA, no torch).
//
// Semantics follow sage3_diffusers/numerics/formats.py exactly:
// - E4M3 ("e4m3fn"): round to nearest even, saturate at +-448 (the .satfinite cvt).
// - E2M1: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; round to nearest, ties to the even code, saturate at 6;
//   the sign bit is the input's sign bit (so -0.1 encodes as 0x8, "-0"); NaN encodes as +6 (code 7).
// - Two codes per byte: element 2i in the LOW nibble, 2i+1 in the high nibble (formats.pack_fp4).
//
// On sm_100a/sm_120a/sm_121a the packing uses the hardware `cvt.rn.satfinite.e2m1x2.f32`; every other target
// (the sm_90a emulation build) uses the integer path below, which the GPU tests check bit-exactly against the
// torch specification.
#pragma once

#include <cstdint>
#include <cuda_fp8.h>

#if defined(__CUDA_ARCH__) &&                                                                              \
    (defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL) ||                         \
     defined(__CUDA_ARCH_FEAT_SM100_ALL) ||                                                                \
     (defined(__CUDA_ARCH_SPECIFIC__) &&                                                                   \
      (__CUDA_ARCH_SPECIFIC__ == 1200 || __CUDA_ARCH_SPECIFIC__ == 1210 || __CUDA_ARCH_SPECIFIC__ == 1000)))
#define SAGE3_HW_E2M1_CVT 1
#else
#define SAGE3_HW_E2M1_CVT 0
#endif

namespace sage3 {

constexpr float kE2M1Max = 6.0f;
constexpr float kE4M3Max = 448.0f;

// Round a non-negative or signed fp32 to E4M3 (RNE, satfinite); returns the raw byte.
__device__ __forceinline__ uint8_t e4m3_encode(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// E4M3 byte -> fp32 (exact). 0x7F / 0xFF are NaN.
__device__ __forceinline__ float e4m3_decode(uint8_t b) {
  const int sign = b >> 7, exp = (b >> 3) & 0xF, man = b & 0x7;
  float mag;
  if (exp == 0xF && man == 0x7) {
    mag = __int_as_float(0x7fc00000);
  } else if (exp == 0) {
    mag = ldexpf(static_cast<float>(man), -9);            // subnormal: man * 2^-9
  } else {
    mag = ldexpf(static_cast<float>(8 + man), exp - 10);  // (1 + man/8) * 2^(exp-7)
  }
  return sign ? -mag : mag;
}

// Software E2M1 encode, the specification's threshold table: codes 1..7 start above 0.25, at 0.75, above
// 1.25, at 1.75, above 2.5, at 3.5, above 5 (ties go to the even code).
__device__ __forceinline__ uint32_t e2m1_encode_soft(float x) {
  if (isnan(x)) return 7u;
  const float m = fabsf(x);
  uint32_t code = (m > 0.25f) + (m >= 0.75f) + (m > 1.25f) + (m >= 1.75f) + (m > 2.5f) + (m >= 3.5f) + (m > 5.0f);
  return code | (signbit(x) ? 8u : 0u);
}

// Two values -> one byte, `lo` in the low nibble.
__device__ __forceinline__ uint32_t e2m1x2_pack(float lo, float hi) {
#if SAGE3_HW_E2M1_CVT
  uint16_t out;
  // PTX: the first source goes to the upper nibble, the second to the lower one.
  asm("{\n\t.reg .b8 t;\n\tcvt.rn.satfinite.e2m1x2.f32 t, %1, %2;\n\tcvt.u16.u8 %0, t;\n\t}"
      : "=h"(out) : "f"(hi), "f"(lo));
  return out & 0xFFu;
#else
  return e2m1_encode_soft(lo) | (e2m1_encode_soft(hi) << 4);
#endif
}

// Eight values (element i -> nibble i) -> one 32-bit word, the fragment unit of the m16n8k64 FP4 MMA.
__device__ __forceinline__ uint32_t e2m1x8_pack(const float v[8]) {
  return e2m1x2_pack(v[0], v[1]) | (e2m1x2_pack(v[2], v[3]) << 8) | (e2m1x2_pack(v[4], v[5]) << 16) |
         (e2m1x2_pack(v[6], v[7]) << 24);
}

// E2M1 code -> fp32 value.
__device__ __forceinline__ float e2m1_decode(uint32_t code) {
  const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = mags[code & 7u];
  return (code & 8u) ? -m : m;
}

}  // namespace sage3
