// Fused DDIM update on the CPU: one pass over x_t, the model output and the noise.
#include <algorithm>
#include <type_traits>

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/half.h"
#include "cpu/ops.h"

namespace ldmfast::cpu {
namespace {

// Elements per work item: large enough to amortize scheduling, small enough to balance
// two cores on a batch of one.
constexpr int64_t kChunk = 16384;

template <typename T, bool kNoise, bool kClip, bool kWriteX0>
void ddim_chunk(const T* __restrict x, const T* __restrict o, const T* __restrict nz, const float* c,
                T* __restrict y, T* __restrict x0_out, int64_t len, float clip_value) {
  const float c0 = c[C_X0_X], c1 = c[C_X0_OUT], c2 = c[C_EPS_X], c3 = c[C_EPS_OUT];
  const float c4 = c[C_PREV_X0], c5 = c[C_PREV_EPS], c6 = c[C_PREV_NOISE];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float xv = to_float(x[i]);
    const float ov = to_float(o[i]);
    float x0 = c0 * xv + c1 * ov;
    if constexpr (kClip) x0 = std::min(std::max(x0, -clip_value), clip_value);
    const float eps = c2 * xv + c3 * ov;
    float prev = c4 * x0 + c5 * eps;
    if constexpr (kNoise) prev += c6 * to_float(nz[i]);
    y[i] = from_float<T>(prev);
    if constexpr (kWriteX0) x0_out[i] = from_float<T>(x0);
  }
}

#if defined(__x86_64__)
// fp16 with the F16C conversion instructions (8 at a time): the portable bit-trick conversion
// does not vectorize well and ran at ~1.5 GB/s. Selected at run time where the CPU has them.
__attribute__((target("avx2,f16c"))) inline __m256 load(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,f16c"))) inline void store(half_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <bool kNoise, bool kClip, bool kWriteX0>
__attribute__((target("avx2,f16c"))) void ddim_chunk_f16c(
    const half_t* __restrict x, const half_t* __restrict o, const half_t* __restrict nz, const float* c,
    half_t* __restrict y, half_t* __restrict x0_out, int64_t len, float clip_value) {
  const __m256 c0 = _mm256_set1_ps(c[C_X0_X]), c1 = _mm256_set1_ps(c[C_X0_OUT]);
  const __m256 c2 = _mm256_set1_ps(c[C_EPS_X]), c3 = _mm256_set1_ps(c[C_EPS_OUT]);
  const __m256 c4 = _mm256_set1_ps(c[C_PREV_X0]), c5 = _mm256_set1_ps(c[C_PREV_EPS]);
  const __m256 c6 = _mm256_set1_ps(c[C_PREV_NOISE]);
  const __m256 hi = _mm256_set1_ps(clip_value), lo = _mm256_set1_ps(-clip_value);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 xv = load(x + i), ov = load(o + i);
    __m256 x0 = _mm256_add_ps(_mm256_mul_ps(c0, xv), _mm256_mul_ps(c1, ov));
    if constexpr (kClip) x0 = _mm256_min_ps(_mm256_max_ps(x0, lo), hi);
    const __m256 eps = _mm256_add_ps(_mm256_mul_ps(c2, xv), _mm256_mul_ps(c3, ov));
    __m256 prev = _mm256_add_ps(_mm256_mul_ps(c4, x0), _mm256_mul_ps(c5, eps));
    if constexpr (kNoise) prev = _mm256_add_ps(prev, _mm256_mul_ps(c6, load(nz + i)));
    store(y + i, prev);
    if constexpr (kWriteX0) store(x0_out + i, x0);
  }
  ddim_chunk<half_t, kNoise, kClip, kWriteX0>(x + i, o + i, kNoise ? nz + i : nullptr, c, y + i,
                                               kWriteX0 ? x0_out + i : nullptr, len - i, clip_value);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <typename T, bool kNoise, bool kClip, bool kWriteX0>
void ddim_typed(const void* x_t, const void* out, const void* noise, const float* coef, void* x_prev,
                void* x0_out, int64_t n, int64_t m, float clip_value, int num_threads) {
  const T* x = static_cast<const T*>(x_t);
  const T* o = static_cast<const T*>(out);
  const T* nz = static_cast<const T*>(noise);
  T* y = static_cast<T*>(x_prev);
  T* x0 = static_cast<T*>(x0_out);
  const int64_t chunks_per_sample = (m + kChunk - 1) / kChunk;
  const int64_t items = n * chunks_per_sample;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), items));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t sample = item / chunks_per_sample;
    const int64_t begin = (item % chunks_per_sample) * kChunk;
    const int64_t len = std::min(kChunk, m - begin);
    const int64_t off = sample * m + begin;
    auto chunk = ddim_chunk<T, kNoise, kClip, kWriteX0>;
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, half_t>) {
      if (cpu_has_f16c()) chunk = ddim_chunk_f16c<kNoise, kClip, kWriteX0>;
    }
#endif
    chunk(x + off, o + off, kNoise ? nz + off : nullptr, coef + sample * DDIM_COEF_STRIDE, y + off,
          kWriteX0 ? x0 + off : nullptr, len, clip_value);
  }
}

template <typename T>
void ddim_dispatch_flags(const void* x_t, const void* out, const void* noise, const float* coef,
                         void* x_prev, void* x0_out, int64_t n, int64_t m, bool clip, float clip_value,
                         int num_threads) {
  // Eight specializations keep the branches out of the vectorized loop.
  const int key = (noise != nullptr) * 4 + clip * 2 + (x0_out != nullptr);
  using Fn = void (*)(const void*, const void*, const void*, const float*, void*, void*, int64_t,
                      int64_t, float, int);
  static constexpr Fn table[8] = {
      ddim_typed<T, false, false, false>, ddim_typed<T, false, false, true>,
      ddim_typed<T, false, true, false>,  ddim_typed<T, false, true, true>,
      ddim_typed<T, true, false, false>,  ddim_typed<T, true, false, true>,
      ddim_typed<T, true, true, false>,   ddim_typed<T, true, true, true>};
  table[key](x_t, out, noise, coef, x_prev, x0_out, n, m, clip_value, num_threads);
}

}  // namespace

void ddim_step(DType dtype, const void* x_t, const void* out, const void* noise, const float* coef,
               void* x_prev, void* x0_out, int64_t n, int64_t m, bool clip, float clip_value,
               int num_threads) {
  switch (dtype) {
    case DType::Float32:
      return ddim_dispatch_flags<float>(x_t, out, noise, coef, x_prev, x0_out, n, m, clip, clip_value, num_threads);
    case DType::Float16:
      return ddim_dispatch_flags<half_t>(x_t, out, noise, coef, x_prev, x0_out, n, m, clip, clip_value, num_threads);
    case DType::BFloat16:
      return ddim_dispatch_flags<bfloat16_t>(x_t, out, noise, coef, x_prev, x0_out, n, m, clip, clip_value, num_threads);
  }
}

}  // namespace ldmfast::cpu
