// Elementwise math that vectorizes: arithmetic and bit operations only, no libm calls (libm's
// expf does not vectorize without -ffast-math). Shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/half.h"

namespace ldmfast::cpu {

// exp(x): Cephes' expf polynomial (about 1 ulp) with branch-free range reduction
// so that loops over it vectorize. |x| is clamped to 87 (2^n stays a normal float) with an integer
// min on the magnitude's bits: a float min/max clamp made GCC split the loop into a second,
// constant-folded division path (4x slower) or not vectorize it at all.
inline __attribute__((always_inline)) float exp_approx(float x) {
  const uint32_t ix = float_to_bits(x);
  x = bits_to_float(std::min(ix & 0x7fffffffu, 0x42AE0000u /* 87.0f */) | (ix & 0x80000000u));
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  const float n = t - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t)) - 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
}

}  // namespace ldmfast::cpu
