// The 8-bit AdamW step on the CPU (ldmfast/train/adamw8bit.py defines it in plain torch): one pass
// per block of kBlock values, in place, blocks across threads. The plain-torch definition's ~25
// passes over temporaries cost ~85 ns per parameter and step on one Zen 4 core (the demo cLDM
// trained 3x slower than with float32 AdamW); this loop ~9 ns (2.6 M parameters: 20-27 ms).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cfloat>
#include <cstring>

#include <omp.h>

#include "cpu/ops.h"

namespace ldmfast::cpu {
namespace {

constexpr int64_t kBlock = 256;
constexpr float kTiny = 1.17549435e-38f;  // float's smallest normal: an all-zero block's scale
constexpr int kKeyShift = 14;  // adamw8bit._KEY_SHIFT: a float's top 18 bits key the index tables

// adamw8bit._hash32 in uint32 arithmetic
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  return x ^ (x >> 16);
}

inline float uniform(int64_t index, uint32_t key) {
  return static_cast<float>(hash32(static_cast<uint32_t>(index) + key) >> 8) * (1.0f / 16777216.0f);
}

// One block: dequantize, update the moments and the parameter, requantize, in loops over the
// block's lanes that vectorize (gathers for the table lookups). Compiled for AVX-512, AVX2 and
// the baseline, picked at load time.
__attribute__((target_clones("avx512f", "avx2", "default")))
void block_step(float* __restrict p, const float* __restrict g, uint8_t* __restrict mc, float* m_scale,
                uint8_t* __restrict rc, float* r_scale, const float* __restrict sc, const float* __restrict uc,
                int64_t first, int64_t len, const AdamW8bitHyper& h) {
  float m[kBlock], r[kBlock];
  const float ms = *m_scale, rs = *r_scale;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float gv = g[i];
    const float mv = sc[mc[i]] * ms * h.beta1 + h.one_minus_beta1 * gv;
    const float rv = uc[rc[i]] * rs;
    const float v = std::min(rv * rv * h.beta2 + h.one_minus_beta2 * gv * gv, FLT_MAX);  // (as the definition)
    p[i] = p[i] * h.decay_factor - h.lr * ((mv / h.bc1) / (std::sqrt(v / h.bc2) + h.eps));
    m[i] = mv;
    r[i] = std::sqrt(v);
  }
  // (past the parameter's end the moments stay 0: no gradient ever reaches them)
  for (int64_t i = len; i < kBlock; ++i) m[i] = r[i] = 0.0f;
  const float* tables[2] = {sc, uc};
  const uint8_t* index[2] = {h.signed_index, h.unsigned_index};
  float* values[2] = {m, r};
  uint8_t* codes[2] = {mc, rc};
  float* scales[2] = {m_scale, r_scale};
  const uint32_t keys[2] = {h.key_m, h.key_v};
  for (int t = 0; t < 2; ++t) {
    const float* __restrict code = tables[t];
    const float* __restrict x = values[t];
    uint8_t* __restrict out = codes[t];
    float s = 0.0f;
#pragma omp simd reduction(max : s)
    for (int64_t i = 0; i < kBlock; ++i) s = std::max(s, std::fabs(x[i]));
    s = std::max(s, kTiny);  // (NaN left out by max; at least the smallest normal, as the definition)
    *scales[t] = s;
    const float inv = 1.0f / s;
    const bool squared = t == 1;
    // (Scalar: vectorized, the table lookups' gathers ran 2.7x slower on a Zen 4 core.)
    for (int64_t i = 0; i < kBlock; ++i) {
      const float xn = std::min(std::max(x[i] * inv, -1.0f), 1.0f);
      uint32_t bits;
      std::memcpy(&bits, &xn, sizeof bits);
      int idx = index[t][bits >> kKeyShift];  // the largest index in 0..254 with code[idx] <= xn
      idx += (idx < 254 && code[idx + 1] <= xn) ? 1 : 0;
      const float lo = code[idx], hi = code[idx + 1];
      const float pr = squared ? (xn * xn - lo * lo) / (hi * hi - lo * lo) : (xn - lo) / (hi - lo);
      out[i] = static_cast<uint8_t>(idx + (uniform(first + i, keys[t]) < pr ? 1 : 0));
    }
  }
}

}  // namespace

void adamw8bit_step(float* p, const float* g, uint8_t* m_codes, float* m_scale, uint8_t* r_codes, float* r_scale,
                    const float* signed_code, const float* unsigned_code, int64_t n, const AdamW8bitHyper& h,
                    int num_threads) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t e0 = b * kBlock;
    block_step(p + e0, g + e0, m_codes + e0, m_scale + b, r_codes + e0, r_scale + b, signed_code, unsigned_code, e0,
               std::min(kBlock, n - e0), h);
  }
}

}  // namespace ldmfast::cpu
