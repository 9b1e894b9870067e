// Elementwise math that vectorizes: arithmetic and bit operations only, no libm calls (libm's
// expf does not vectorize without -ffast-math). Shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/half.h"

namespace ldmfast::cpu {

// a * b + c: one fused multiply-add where kFma (a caller compiled for FMA: __builtin_fmaf is then one
// instruction), else a multiply and an add. For code compiled with -ffp-contract=off (group_norm.cpp),
// where GCC's own contraction had fused different products in different instantiations of one loop.
template <bool kFma>
inline __attribute__((always_inline)) float madd(float a, float b, float c) {
  if constexpr (kFma) return __builtin_fmaf(a, b, c);
  return a * b + c;
}

// exp(x), branch-free so that loops over it vectorize. x = n ln2 + r with |r| <= ln2/2 (Cody-Waite:
// ln2 in two parts, so r stays exact to float rounding for every |x| <= 87), e^r by a degree-5
// polynomial fitted for relative error (1.7e-7 at most over [-86.5, 86.5], about 2 ulp), and 2^n
// added into the result's exponent bits. Cephes' degree-7 polynomial (1 ulp) and a final multiply
// by 2^n cost three more multiplies or multiply-adds, the unit that bounds this loop on AVX-512
// (Zen 4: one 16-float FMA per cycle): a SiLU loop 0.28 -> 0.23 ns per element on one core.
// |x| is clamped to 87 (n stays in [-126, 126]) with an integer min on the magnitude's bits: a
// float min/max clamp made GCC split the loop into a second, constant-folded division path (4x
// slower) or not vectorize it at all. exp(-inf) and exp(-87) give ~1e-38 (0 for every use here).
// Its multiply-adds fused (kFma) or not, as madd; exp_approx(x) is exp_approx_t<false>, which a file
// compiled with contraction (the default) fuses where GCC chooses.
// exp_approx's constants, shared with its AVX-512 intrinsics twin (group_norm.cpp), which must give
// the same bits.
namespace exp_consts {
constexpr uint32_t kClampBits = 0x42AE0000u;  // 87.0f
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x / ln2 + kRound rounds to the integer n
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
// e^r = 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3), minimax in relative error on |r| <= ln2/2
constexpr float kC5 = 8.312525870700754e-3f, kC4 = 4.189011550148262e-2f, kC3 = 1.6667114462479737e-1f,
                kC2 = 4.999923177253508e-1f;
}  // namespace exp_consts

template <bool kFma>
inline __attribute__((always_inline)) float exp_approx_t(float x) {
  using namespace exp_consts;
  const uint32_t ix = float_to_bits(x);
  x = bits_to_float(std::min(ix & 0x7fffffffu, kClampBits) | (ix & 0x80000000u));
  // kRound rounds x / ln2 to the integer n, which then sits in t's low mantissa bits.
  const float t = madd<kFma>(x, kLog2e, kRound);
  const float n = t - kRound;
  float r = madd<kFma>(-n, kLn2Hi, x);
  r = madd<kFma>(-n, kLn2Lo, r);
  float p = kC5;
  p = madd<kFma>(p, r, kC4);
  p = madd<kFma>(p, r, kC3);
  p = madd<kFma>(p, r, kC2);
  p = madd<kFma>(p, r, 1.0f);
  p = madd<kFma>(p, r, 1.0f);
  // t's bits << 23 keep n's low 9 bits in the exponent field (the magic constant's low bits are 0);
  // the integer add scales p by 2^n.
  return bits_to_float(float_to_bits(p) + (float_to_bits(t) << 23));
}

inline __attribute__((always_inline)) float exp_approx(float x) { return exp_approx_t<false>(x); }

// 2^x, as exp_approx but for x in log2 units (the attention forward folds log2(e) into its scale):
// n = round(x) and r = x - n are exact, so no two-part ln2 is needed, and the same polynomial in
// r ln2 has its coefficients multiplied by powers of ln2 (1.8e-7 relative error at most on
// |r| <= 1/2). |x| is clamped to 126 as exp_approx clamps to 87; 2^-inf gives ~1e-38.
inline __attribute__((always_inline)) float exp2_approx(float x) {
  const uint32_t ix = float_to_bits(x);
  x = bits_to_float(std::min(ix & 0x7fffffffu, 0x42FC0000u /* 126.0f */) | (ix & 0x80000000u));
  const float t = x + 12582912.0f;
  const float n = t - 12582912.0f;
  const float r = x - n;
  float p = 1.330026564e-3f;
  p = p * r + 9.669708941e-3f;
  p = p * r + 5.550559994e-2f;
  p = p * r + 2.402228160e-1f;
  p = p * r + 6.931471806e-1f;
  p = p * r + 1.0f;
  return bits_to_float(float_to_bits(p) + (float_to_bits(t) << 23));
}

}  // namespace ldmfast::cpu
