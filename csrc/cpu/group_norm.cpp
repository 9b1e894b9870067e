// Fused GroupNorm (+ SiLU) on the CPU, forward and backward, contiguous and channels-last.
//
// Contiguous (N, C, S): each thread takes a contiguous range of (sample, group) items, whose C/G*S
// elements are one run: a statistics pass, then a normalize pass over the same run while it is
// still in cache, the first pass of a group in the same loop as the second pass of the one before
// (memory-bound beside arithmetic-bound work; the backward likewise).
// Channels-last (N, S, C): each thread takes a chunk of rows of every sample and accumulates
// per-channel partial sums over whole rows of C channels; the partial sums are combined per group,
// in a fixed order, and a second pass over the rows normalizes; one sample's first pass runs in the
// same loop as the previous sample's second.
//
// Statistics: sums of x - K, where K is the group's first element (a shift that keeps the sum
// of squares free of cancellation when |mean| >> std), accumulated in float over blocks of at
// most kBlock elements or kRows rows, and in double across blocks. The backward reduces first per
// (sample, channel) and then in a fixed order over channels and samples: deterministic results.
//
// The hot loops are compiled three times, for baseline x86-64, AVX2+FMA+F16C and AVX-512, and the
// variant is picked at run time; bfloat16 data takes AVX512-BF16's rounding where the CPU has it
// (bfloat16_hw_t). The AVX-512 variant's contiguous SiLU backward runs short rows through
// intrinsics (bwd_row_avx512), whose sums end in a tree rather than GCC's serial chain, and its
// bfloat16 SiLU rows (AVX512-BF16 CPUs) too, forward and backward, which widen and round in registers.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/group_norm.h"
#include "cpu/half.h"
#include "cpu/isa.h"
#include "cpu/line_aligned.h"
#include "cpu/vec_math.h"

#define LDMFAST_AI inline __attribute__((always_inline))

namespace ldmfast {

// bfloat16 data on a CPU with AVX512-BF16: the same bits as bfloat16_t, but the kernels stage it
// through float blocks (as they do half) so that the float -> bfloat16 rounding is one
// vcvtneps2bf16 per 16 values. Converting inside the vectorized loops with integer operations
// (bfloat16_t's from_float) took 0.52 ns per element of the SiLU-normalize loop on a Zen 4 core,
// against 0.34 through the instruction (float data: 0.30).
struct bfloat16_hw_t { uint16_t bits; };

inline float to_float(bfloat16_hw_t v) { return to_float(bfloat16_t{v.bits}); }
template <> inline bfloat16_hw_t from_float<bfloat16_hw_t>(float f) {
  return bfloat16_hw_t{from_float<bfloat16_t>(f).bits};
}

}  // namespace ldmfast

namespace ldmfast::cpu {
namespace {

constexpr int64_t kBlock = 512;  // elements per float block (stack buffers)
constexpr int64_t kRows = 64;  // channels-last rows per float accumulation before flushing to double
constexpr int64_t kScratchMax = int64_t{1} << 22;  // floats of the backward's per-thread buffer, at most

// ---- elementwise math ---------------------------------------------------------------------------

// This file is compiled without floating-point contraction (CMakeLists.txt): GCC fused different
// multiplies and adds into FMAs in different instantiations of one loop (a group's statistics or
// normalization alone, or paired with another group's), so a group's outputs changed in the last bit
// with where a thread's range of groups began, i.e. with the thread count. The multiply-adds are
// fused explicitly instead (madd<kFma>, kFma: the AVX2 and AVX-512 variants), the same in every loop.
template <bool kSilu, bool kFma>
LDMFAST_AI float act(float z) {
  if constexpr (kSilu) return z / (1.0f + exp_approx_t<kFma>(-z));
  return z;
}

// d act / dz
template <bool kSilu, bool kFma>
LDMFAST_AI float act_grad(float z) {
  if constexpr (kSilu) {
    const float sg = 1.0f / (1.0f + exp_approx_t<kFma>(-z));
    return sg * madd<kFma>(z, 1.0f - sg, 1.0f);
  }
  return 1.0f;
}

// ---- conversions of blocks to and from float ------------------------------------------------------

#if defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) inline void half_to_float_f16c(const half_t* p, float* out, int64_t len) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < len; ++i) out[i] = to_float(p[i]);
}

__attribute__((target("avx2,fma,f16c"))) inline void float_to_half_f16c(const float* in, half_t* p, int64_t len) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < len; ++i) p[i] = from_float<half_t>(in[i]);
}
#endif

#if defined(__x86_64__)
// Not inlined: its instruction set is a superset of the AVX-512 variant's that calls it.
// The tail goes through the instruction too, under a mask: rows of 168 values (12x14 maps) end in
// 8, which converted one at a time cost the bfloat16 forward 7 % at that size.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), noinline)) void float_to_bf16_hw(
    const float* in, bfloat16_hw_t* p, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
  if (i < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - i)) - 1);
    _mm256_mask_storeu_epi16(p + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, in + i)));
  }
}
#endif

#if defined(__x86_64__)
// bfloat16 -> float, 16 values per instruction and the tail under a mask. The vectorized loop below
// (load_block's own) made the staged bfloat16 kernels slower at rows of 168 (12x14 maps, whose last
// 16 values are converted once more for the overlapping vector): one Xeon core, SiLU backward at
// (4, 1792, 12x14) 1.6 ns per element with it, 1.2 with this.
__attribute__((target("avx512f,avx512bw,avx512vl"), noinline)) void bf16_to_float_hw(
    const bfloat16_hw_t* p, float* out, int64_t len) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  if (i < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - i)) - 1);
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p + i));
    _mm512_mask_storeu_ps(out + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
}
#endif

template <typename T, bool kAvx2>
LDMFAST_AI void load_block(const T* __restrict p, float* __restrict out, int64_t len) {
#if defined(__x86_64__)
  if constexpr (kAvx2 && std::is_same_v<T, half_t>) return half_to_float_f16c(p, out, len);
  if constexpr (std::is_same_v<T, bfloat16_hw_t>) return bf16_to_float_hw(p, out, len);
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] = to_float(p[i]);
}

template <typename T, bool kAvx2>
LDMFAST_AI void store_block(const float* __restrict in, T* __restrict p, int64_t len) {
#if defined(__x86_64__)
  if constexpr (kAvx2 && std::is_same_v<T, half_t>) return float_to_half_f16c(in, p, len);
  if constexpr (std::is_same_v<T, bfloat16_hw_t>) return float_to_bf16_hw(in, p, len);
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) p[i] = from_float<T>(in[i]);
}

// Blocks as the compute loops read and write them: float and bf16 data in place (bf16 converts
// inside the vectorized loop with integer ops: a shift in, a rounding out), fp16 through float
// buffers both ways (F16C conversions), and bf16 on AVX512-BF16 CPUs (bfloat16_hw_t) through float
// buffers both ways in the contiguous kernels: read in place there, GCC vectorized their loops over
// 16 values at a time in 256-bit registers (a float vector beside a 16-bit one), half the AVX-512
// width; staged, they run in 512-bit ones (one Xeon core, bfloat16 SiLU backward at (4, 448..1856
// channels, 160..672 values per row): 1.0-1.2 -> 0.86-1.0 ns per element). The channels-last rows
// keep the in-place read (InStageRows): staged, they ran 10-25 % slower.
template <typename T>
using InStage = std::conditional_t<std::is_same_v<T, half_t> || std::is_same_v<T, bfloat16_hw_t>, float, T>;
template <typename T>
using InStageRows = std::conditional_t<std::is_same_v<T, half_t>, float, T>;
template <typename T>
using OutStage = InStage<T>;  // the same types, staged both ways

template <typename T, bool kAvx2, typename S = InStage<T>>
LDMFAST_AI const S* view_in(const T* p, float* buf, int64_t len) {
  if constexpr (std::is_same_v<S, T>) {
    (void)buf;
    (void)len;
    return p;
  } else {
    load_block<T, kAvx2>(p, buf, len);
    return buf;
  }
}

template <typename T>
LDMFAST_AI OutStage<T>* view_out(T* p, float* buf) {
  if constexpr (std::is_same_v<OutStage<T>, T>) {
    (void)buf;
    return p;
  } else {
    (void)p;
    return buf;
  }
}

template <typename T, bool kAvx2>
LDMFAST_AI void flush_out(const float* buf, T* p, int64_t len) {
  if constexpr (!std::is_same_v<OutStage<T>, T>) store_block<T, kAvx2>(buf, p, len);
}

// The contiguous loops run over whole vectors of kLanes floats, and over the last kLanes elements of
// a row once more when the row does not end on a whole vector: a vector that overlaps elements
// already done (out of place, so they come out the same; the backward's sums leave those lanes
// out). The vectorizer's own remainder is scalar where the loop reduces (and for bfloat16 input): a
// scalar exp for each of the 8 values that end a row of 168 (12x14 maps). One core, float32
// backward at (4, 1792, 12x14): 0.90 -> 0.79 ns per element (rows of 176: 0.70); bfloat16 forward
// 0.55 -> 0.46, backward 1.10 -> 0.93. A zero-padded copy of the tail was slower than either
// (store-forwarding stalls).
constexpr int64_t kLanes = 16;

// The overlapping vector's count of lanes done already (a runtime value; std::false_type for none).
struct SkipLanes {
  static constexpr bool value = true;
  int64_t n;
  operator int64_t() const { return n; }
};

// fn(from, len, skip) over the row [off, off + len): whole vectors, then the overlapping one
template <typename Fn>
LDMFAST_AI void over_vectors(int64_t off, int64_t len, Fn&& fn) {
  const int64_t full = len - len % kLanes;
  if (full == len || len < kLanes) return fn(off, len, std::false_type{});
  fn(off, full, std::false_type{});
  fn(off + len - kLanes, kLanes, SkipLanes{kLanes - (len - full)});
}

// ---- arguments ---------------------------------------------------------------------------------

struct Sizes {
  int64_t n, c, s, groups, cg;  // cg: channels per group
  int64_t m() const { return cg * s; }
};

struct FwdArgs {
  Sizes z;
  const void* x;
  const float* weight;
  const float* bias;
  void* y;
  float* mean;
  float* rstd;
  float eps;
  // channels-last workspace
  int64_t chunks, rows_per_chunk;
  double* partial;  // [n][chunks][2][c]
  float* scale;     // [n][c]
  float* shift;     // [n][c]: b - mean * scale where the sample folds (see folds), else the group's mean
  char* fold;       // [n]
};

struct BwdArgs {
  Sizes z;
  const void* dy;
  const void* x;
  const float* weight;
  const float* bias;
  const float* mean;
  const float* rstd;
  void* dx;
  double* sum_g;   // [n][c]: sum over s of g
  double* sum_gx;  // [n][c]: sum over s of g * xhat
  // channels-last workspace
  int64_t chunks, rows_per_chunk;
  double* partial;  // [n][chunks][2][c]
  float* scale;     // [n][c] rstd * weight: z = (x - mu) * scale + bias, dx = scale * g + cb * (x - mu) + cd
  float* cb;
  float* cd;
  float* mu;        // [n][c] the mean of the channel's group
};

void finish_stats(double s1, double s2, double count, float k, float eps, float* mean, float* rstd) {
  const double md = s1 / count;
  const double var = std::max(s2 / count - md * md, 0.0);
  *mean = static_cast<float>(k + md);
  *rstd = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
}

// Whether a group normalizes as x * sc + (b - mean * sc), one multiply-add, or as (x - mean) * sc + b.
// The folded shift's two large terms cancel when |mean| >> std: its error is about |mean| * rstd
// float roundings (mean 1000, std 1: 3e-5 relative, torch's form and error; a one-element group,
// whose output is exactly b, came out 1e-5 off). Up to 8 it stays under 1e-6; beyond, the
// subtraction costs a few percent (7-15 % on L2-resident maps, a third per-channel array in
// channels-last rows).
constexpr float kFoldLimit = 8.0f;

inline bool folds(float mean, float rstd) { return std::fabs(mean) * rstd <= kFoldLimit; }

// The folded form's shift b - mean * sc in one rounding (std::fma: an instruction where the caller is
// compiled for FMA, else libm's, the same bits either way). Rounded twice, x * sc + shift missed b by
// an ulp at x == mean (a one-element group, whose output is exactly b) in about 1 case in 40.
inline float fold_shift(float mean, float sc, float bias) { return std::fma(-mean, sc, bias); }

// Whether the contiguous kernels pair one group's first pass with the previous group's second, in
// the forward and the backward: data read through float blocks, i.e. float32 and the 16-bit types
// staged by their conversion instructions. bfloat16 converted inside the loops (no AVX512-BF16) ran
// slower paired (forward 0.40 -> 0.49 ns per element at (4, 896, 24x28)). Paired or alone, a
// group's loops do the same arithmetic (no contraction, see act), so the bits do not depend on
// where a thread's range begins. The staged 16-bit backward, paired (2026-11-29; one Xeon core,
// bench/ab_group_norm.py both ways round, SiLU at the benchmark shapes): bfloat16 about 1.05x,
// float16 1.05-1.12x. Earlier measurements had it losing at large groups, with a harness that
// favoured one build, and giving other bits, before this file's multiply-adds were made explicit.
// The forward, paired: bfloat16 1.04-1.12x, float16 1.06-1.08x.
template <typename T>
constexpr bool kPairsGroups = std::is_same_v<T, float> || std::is_same_v<T, half_t> || std::is_same_v<T, bfloat16_hw_t>;

// ---- forward, contiguous, pipelined: the statistics of a group in the same loop as the normalization
// of the one before

// The statistics pass only reads (memory-bound), the normalization computes the SiLU (bound by
// arithmetic): in one loop, group k's statistics beside group k-1's normalization (channel rows line
// up), the core overlaps them, as in the backward below: one core, float32, 0.35 -> 0.31 ns per
// element at (4, 896, 24x28). Each thread takes a contiguous range of groups.

// One channel row of a group as the statistics pass reads it: sums of x - k.
template <typename T>
struct StatsRow {
  const T* x;
  float k;
  double s1 = 0, s2 = 0;
};

// One channel row as the normalization writes it: y = act(x * sc + sh) where the group folds, else
// act((x - mean) * sc + bc).
template <typename T>
struct NormRow {
  const T* x;
  T* y;
  float mean, sc, sh, bc;
};

#if defined(__x86_64__)
#define LDMFAST_AVX512_AI \
  inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// exp_approx_t<true> on 16 floats: the same operations in the same order on the same constants
// (exp_consts), so the same bits.
LDMFAST_AVX512_AI __m512 exp_approx_avx512(__m512 x) {
  using namespace exp_consts;
  const __m512i ix = _mm512_castps_si512(x);
  const __m512i mag = _mm512_min_epu32(_mm512_and_si512(ix, _mm512_set1_epi32(0x7fffffff)),
                                       _mm512_set1_epi32(static_cast<int>(kClampBits)));
  x = _mm512_castsi512_ps(_mm512_or_si512(mag, _mm512_and_si512(ix, _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
  const __m512 round = _mm512_set1_ps(kRound);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), round);
  const __m512 n = _mm512_sub_ps(t, round);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 q = _mm512_set1_ps(kC5);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kC4));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kC3));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kC2));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(q), _mm512_slli_epi32(_mm512_castps_si512(t), 23)));
}

// act<true, true> (SiLU) on 16 floats, the same operations as the scalar code.
LDMFAST_AVX512_AI __m512 silu_avx512(__m512 z) {
  const __m512 e = exp_approx_avx512(_mm512_xor_ps(z, _mm512_set1_ps(-0.0f)));
  return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// act_grad<true, true> (SiLU's derivative) on 16 floats, the same operations as the scalar code.
LDMFAST_AVX512_AI __m512 silu_grad_avx512(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_approx_avx512(_mm512_xor_ps(z, _mm512_set1_ps(-0.0f)));
  const __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, e));
  return _mm512_mul_ps(sg, _mm512_fmadd_ps(z, _mm512_sub_ps(one, sg), one));
}
#endif

#if defined(__x86_64__)
#define LDMFAST_AVX512BF16_AI \
  inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
// The first min(left, 16) lanes.
LDMFAST_AVX512BF16_AI __mmask16 lanes_mask(int64_t left) {
  return left >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}
// Up to 16 values under a mask: loaded as floats (bfloat16 widened), stored from floats (rounded to
// bfloat16 by vcvtneps2bf16).
LDMFAST_AVX512BF16_AI __m512 load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
LDMFAST_AVX512BF16_AI __m512 load16(__mmask16 m, const bfloat16_hw_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
LDMFAST_AVX512BF16_AI void store16(__mmask16 m, float* p, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
LDMFAST_AVX512BF16_AI void store16(__mmask16 m, bfloat16_hw_t* p, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// fwd_contig_rows' SiLU loop in AVX-512 intrinsics, the row's tail under a mask. The normalization
// gives the compiled loop's bits (the same operations: act's SiLU as silu_avx512); the statistics add
// their lanes in another order (a tree per block of kBlock values, into double as before). Two uses:
// - bfloat16 rows on AVX512-BF16 CPUs: the values widened in registers and the outputs rounded by
//   vcvtneps2bf16 as they are stored, where the compiled loop went through float blocks both ways
//   (three more loads and stores per value: a bfloat16 forward 1.3x slower than float32's at
//   (4, 224, 48x56) on a Xeon core);
// - float data (float32, float16 staged) at rows of one block that end in a partial vector and are
//   longer than one vector, where it lets the forward pair groups (see pairs_forward_groups) and
//   normalizes the rows of fwd_contig_item (one Xeon core, rows of 35 to 63: float16 1.13-1.33x,
//   float32 equal; rows under one vector go to fwd_norm_flat, as float32 and float16 ran up to 2.2x
//   slower through this function at rows of 1 and 4 than through GCC's loop).
// As bwd_row_avx512: the float instance runs on any AVX-512 CPU; not inlined; no __restrict on the
// normalization's input and output (a float16 row's staging buffer is both).
template <typename T, bool kStats, bool kNorm, bool kFold>
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))) void fwd_row_avx512(
    const T* __restrict xs, float k, double* s1, double* s2, const T* xn, T* y, float mean, float sc, float sh,
    float bc, int64_t s) {
  const __m512 vk = _mm512_set1_ps(k), vmean = _mm512_set1_ps(mean), vsc = _mm512_set1_ps(sc);
  const __m512 vsh = _mm512_set1_ps(sh), vbc = _mm512_set1_ps(bc);
  for (int64_t off = 0; off < s; off += kBlock) {
    const int64_t end = std::min(s, off + kBlock);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t i = off; i < end; i += kLanes) {
      const __mmask16 m = lanes_mask(end - i);
      if constexpr (kStats) {
        const __m512 d = _mm512_maskz_sub_ps(m, load16(m, xs + i), vk);  // masked-off lanes: 0
        a1 = _mm512_add_ps(a1, d);
        a2 = _mm512_fmadd_ps(d, d, a2);
      }
      if constexpr (kNorm) {
        const __m512 x = load16(m, xn + i);
        const __m512 z = kFold ? _mm512_fmadd_ps(x, vsc, vsh) : _mm512_fmadd_ps(_mm512_sub_ps(x, vmean), vsc, vbc);
        store16(m, y + i, silu_avx512(z));
      }
    }
    if constexpr (kStats) {
      *s1 += _mm512_reduce_add_ps(a1);
      *s2 += _mm512_reduce_add_ps(a2);
    }
  }
}
#endif

// Statistics over p's row (kStats) and normalization of q's row (kNorm), in one loop; rows of s.
// kAvx512: the AVX-512 variant, whose SiLU forward takes fwd_row_avx512 on bfloat16 (AVX512-BF16) and
// on data read as float at rows of one block that end in a partial vector (longer than one vector).
// Also the normalization of fwd_contig_item (kStats false).
template <typename T, bool kSilu, bool kAvx2, bool kStats, bool kNorm, bool kFold, bool kAvx512 = false>
LDMFAST_AI void fwd_contig_rows(StatsRow<T>& p, const NormRow<T>& q, int64_t s) {
#if defined(__x86_64__)
  if constexpr (kAvx512 && kSilu && std::is_same_v<T, bfloat16_hw_t>) {
    return fwd_row_avx512<T, kStats, kNorm, kFold>(p.x, p.k, &p.s1, &p.s2, q.x, q.y, q.mean, q.sc, q.sh, q.bc, s);
  }
#endif
  float xb[kBlock], xq[kBlock];
#if defined(__x86_64__)
  if constexpr (kAvx512 && kSilu && std::is_same_v<InStage<T>, float>) {
    if (s <= kBlock && s % kLanes != 0 && s > kLanes) {
      const float* xv = kStats ? view_in<T, kAvx2>(p.x, xb, s) : nullptr;
      const float* xv2 = kNorm ? view_in<T, kAvx2>(q.x, xq, s) : nullptr;
      float* yv = kNorm ? view_out<T>(q.y, xq) : nullptr;
      fwd_row_avx512<float, kStats, kNorm, kFold>(xv, p.k, &p.s1, &p.s2, xv2, yv, q.mean, q.sc, q.sh, q.bc, s);
      if constexpr (kNorm) flush_out<T, kAvx2>(xq, q.y, s);
      return;
    }
  }
#endif
  auto row = [&](int64_t from, int64_t len, auto skip) {
    const InStage<T>* __restrict xv = kStats ? view_in<T, kAvx2>(p.x + from, xb, len) : nullptr;
    const InStage<T>* __restrict xv2 = kNorm ? view_in<T, kAvx2>(q.x + from, xq, len) : nullptr;
    OutStage<T>* __restrict yv = kNorm ? view_out<T>(q.y + from, xq) : nullptr;
    const float k = p.k, mean = q.mean, sc = q.sc, sh = q.sh, bc = q.bc;
    float a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = 0; i < len; ++i) {
      if constexpr (kStats) {
        const float d = decltype(skip)::value && i < skip ? 0.0f : to_float(xv[i]) - k;
        a1 += d;
        a2 += d * d;  // (not madd: a fused reduction made GCC's paired 16-bit loop 1.3-2.4x slower)
      }
      if constexpr (kNorm) {
        const float zv = kFold ? madd<kAvx2>(to_float(xv2[i]), sc, sh) : madd<kAvx2>(to_float(xv2[i]) - mean, sc, bc);
        yv[i] = from_float<OutStage<T>>(act<kSilu, kAvx2>(zv));
      }
    }
    if constexpr (kStats) {
      p.s1 += a1;
      p.s2 += a2;
    }
    if constexpr (kNorm) flush_out<T, kAvx2>(xq, q.y + from, len);
  };
  for (int64_t off = 0; off < s; off += kBlock) over_vectors(off, std::min(kBlock, s - off), row);
}

// One loop over the rows of group si's statistics (kStats) and group di's normalization (kNorm);
// which passes run is a template argument, as in the backward's bwd_contig_step below.
template <typename T, bool kSilu, bool kAvx2, bool kStats, bool kNorm, bool kAvx512>
LDMFAST_AI void fwd_contig_step(const FwdArgs& a, int64_t si, int64_t di) {
  const Sizes& z = a.z;
  const int64_t m = z.m();
  const T* xs = kStats ? static_cast<const T*>(a.x) + si * m : nullptr;
  const float k = kStats ? to_float(xs[0]) : 0.0f;
  const float mean = kNorm ? a.mean[di] : 0.0f, rstd = kNorm ? a.rstd[di] : 0.0f;
  const bool fold = folds(mean, rstd);
  double s1 = 0, s2 = 0;
  for (int64_t j = 0; j < z.cg; ++j) {
    StatsRow<T> p{};
    NormRow<T> q{};
    if constexpr (kStats) p = StatsRow<T>{xs + j * z.s, k};
    if constexpr (kNorm) {
      const int64_t c = di % z.groups * z.cg + j;
      const float sc = rstd * a.weight[c];
      q = NormRow<T>{static_cast<const T*>(a.x) + di * m + j * z.s, static_cast<T*>(a.y) + di * m + j * z.s, mean, sc,
                     fold_shift(mean, sc, a.bias[c]), a.bias[c]};
    }
    if (fold) {
      fwd_contig_rows<T, kSilu, kAvx2, kStats, kNorm, true, kAvx512>(p, q, z.s);
    } else {
      fwd_contig_rows<T, kSilu, kAvx2, kStats, kNorm, false, kAvx512>(p, q, z.s);
    }
    s1 += p.s1;
    s2 += p.s2;
  }
  if constexpr (kStats) finish_stats(s1, s2, static_cast<double>(m), k, a.eps, &a.mean[si], &a.rstd[si]);
}

// Groups [first, last) of a thread (see kPairsGroups).
template <typename T, bool kSilu, bool kAvx2, bool kAvx512 = false>
LDMFAST_AI void fwd_contig_range(const FwdArgs& a, int64_t first, int64_t last) {
  if (first >= last) return;
  fwd_contig_step<T, kSilu, kAvx2, true, false, kAvx512>(a, first, -1);
  for (int64_t item = first + 1; item < last; ++item) {
    fwd_contig_step<T, kSilu, kAvx2, true, true, kAvx512>(a, item, item - 1);
  }
  fwd_contig_step<T, kSilu, kAvx2, false, true, kAvx512>(a, -1, last - 1);
}

// ---- forward, contiguous: one item per (sample, group) -------------------------------------------

// The normalization of group g (its m values at xg, yg) as one run of whole vectors, each value's
// channel coefficients spread into per-value arrays (sh: the folded shift, or the bias), for rows
// shorter than a vector, which fwd_contig_rows would run one partial vector at a time. One Xeon
// core, SiLU forward at rows of 1, 4 and 9: float32 1.2x, 1.8x, 1.05x; float16 1.6x, 3.6x, 1.5x;
// bfloat16 1.1x, 1.15-1.3x, 0.96x. At rows of 35 to 63 the rows were faster (float32 and bfloat16
// 0.8x flat, float16 1.5x). The same arithmetic per value as fwd_contig_rows' loop, so the same bits.
template <typename T, bool kSilu, bool kAvx2, bool kFold>
LDMFAST_AI void fwd_norm_flat(const FwdArgs& a, int64_t g, const T* xg, T* yg, float mean, float rstd) {
  const Sizes& z = a.z;
  const int64_t m = z.m();
  float csc[kBlock], csh[kBlock], xq[kBlock];
  for (int64_t off = 0; off < m; off += kBlock) {
    const int64_t len = std::min(kBlock, m - off);
    for (int64_t i = 0; i < len;) {  // the channels' runs of values within this block
      const int64_t j = (off + i) / z.s, end = std::min(len, (j + 1) * z.s - off);
      const int64_t c = g * z.cg + j;
      const float sc = rstd * a.weight[c];
      std::fill(csc + i, csc + end, sc);
      std::fill(csh + i, csh + end, kFold ? fold_shift(mean, sc, a.bias[c]) : a.bias[c]);
      i = end;
    }
    const InStage<T>* __restrict xv = view_in<T, kAvx2>(xg + off, xq, len);
    OutStage<T>* __restrict yv = view_out<T>(yg + off, xq);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float zv = kFold ? madd<kAvx2>(to_float(xv[i]), csc[i], csh[i])
                             : madd<kAvx2>(to_float(xv[i]) - mean, csc[i], csh[i]);
      yv[i] = from_float<OutStage<T>>(act<kSilu, kAvx2>(zv));
    }
    flush_out<T, kAvx2>(xq, yg + off, len);
  }
}

// The statistics over the whole group, then its rows normalized as the paired kernels' second pass
// does (fwd_contig_step), or by fwd_norm_flat where they are shorter than a vector.
template <typename T, bool kSilu, bool kAvx2, bool kAvx512 = false>
LDMFAST_AI void fwd_contig_item(const FwdArgs& a, int64_t item) {
  const Sizes& z = a.z;
  const int64_t ng = item, g = item % z.groups;
  const int64_t m = z.m();
  const T* xg = static_cast<const T*>(a.x) + ng * m;
  T* yg = static_cast<T*>(a.y) + ng * m;
  float buf[kBlock];
  const float k = to_float(xg[0]);
  double s1 = 0, s2 = 0;
  for (int64_t off = 0; off < m; off += kBlock) {
    const int64_t len = std::min(kBlock, m - off);
    const auto* xv = view_in<T, kAvx2>(xg + off, buf, len);
    float a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = 0; i < len; ++i) {
      const float d = to_float(xv[i]) - k;
      a1 += d;
      a2 += d * d;
    }
    s1 += a1;
    s2 += a2;
  }
  float mean, rstd;
  finish_stats(s1, s2, static_cast<double>(m), k, a.eps, &mean, &rstd);
  a.mean[ng] = mean;
  a.rstd[ng] = rstd;
  const bool fold = folds(mean, rstd);
  if (z.s < kLanes) {
    return fold ? fwd_norm_flat<T, kSilu, kAvx2, true>(a, g, xg, yg, mean, rstd)
                : fwd_norm_flat<T, kSilu, kAvx2, false>(a, g, xg, yg, mean, rstd);
  }
  fwd_contig_step<T, kSilu, kAvx2, false, true, kAvx512>(a, -1, ng);  // the normalization alone
}

// ---- forward, channels-last: partial sums per (sample, chunk of rows), then normalize ----------

// A sample's statistics need all of its rows before any row is normalized, and a sample of the
// benchmark's sizes (2.4 to 22 MB) does not stay in L2, so both passes read it from L3: one Xeon
// core, float32 SiLU at (4, 224, 48x56), statistics 0.14 ns per element and normalization 0.30,
// against 0.33 for the whole contiguous forward, which reads each group once from L3 and once from
// L2. As the contiguous kernels pair groups, sample n + 1's statistics run in the same row loop as
// sample n's normalization (pipeline_samples), one chunk of rows per thread. Against the earlier
// kernels (statistics of every sample, then every normalization, over a dynamic queue of chunks):
// one thread 1.01x (bench/ab_group_norm.py both orders), two threads 1.02-1.17x wall time
// (2026-11-29; the backward, done the same way, 1.00-1.08x). The L3 traffic stays.
// Tried: blocks of a few groups' columns over all rows, sized to stay in L2 for the second pass
// (1.7-2.3x slower at (2, 512, 48x56) and (4, 224, 48x56): rows 2 KB apart put a block's lines
// in 1/32 of L2's sets, and a block of a width that is no multiple of 16 channels ends in scalar code).

// One row of c channels: sums of x - k into u1, u2 (kStats) and the normalization of another row
// (kNorm), in one loop, so that the core overlaps the two passes' work channel by channel. A
// function, not a lambda (see bwd_contig_step). float16: the normalization reads and writes one
// staging buffer in place (xn, y), so those have no __restrict.
template <typename T, bool kSilu, bool kStats, bool kNorm, bool kFold, bool kAvx2, typename S, typename O>
LDMFAST_AI void fwd_cl_row(const S* xs, const float* __restrict k, float* __restrict u1, float* __restrict u2,
                           const S* xn, const float* __restrict sc, const float* __restrict sh,
                           const float* __restrict bias, O* y, int64_t c) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) {
    if constexpr (kStats) {
      const float d = to_float(xs[i]) - k[i];
      u1[i] += d;
      u2[i] = madd<kAvx2>(d, d, u2[i]);
    }
    if constexpr (kNorm) {
      const float zv = kFold ? madd<kAvx2>(to_float(xn[i]), sc[i], sh[i]) : madd<kAvx2>(to_float(xn[i]) - sh[i], sc[i], bias[i]);
      y[i] = from_float<O>(act<kSilu, kAvx2>(zv));
    }
  }
}

// Rows [r0, r1) of chunk p: sample sn's partial sums (kStats), sample dn's normalization (kNorm).
template <typename T, bool kSilu, bool kStats, bool kNorm, bool kAvx2, bool kAvx512 = false>
LDMFAST_AI void fwd_cl_step(const FwdArgs& a, int64_t p, int64_t sn, int64_t dn) {
  const Sizes& z = a.z;
  const int64_t r0 = p * a.rows_per_chunk, r1 = std::min(z.s, r0 + a.rows_per_chunk);
  const T* xs = kStats ? static_cast<const T*>(a.x) + sn * z.s * z.c : nullptr;
  const T* xd = kNorm ? static_cast<const T*>(a.x) + dn * z.s * z.c : nullptr;
  T* yd = kNorm ? static_cast<T*>(a.y) + dn * z.s * z.c : nullptr;
  double* out = kStats ? a.partial + (sn * a.chunks + p) * 2 * z.c : nullptr;
  FloatBuffer shift(z.c), buf(z.c), t1(z.c), t2(z.c), nbuf(z.c);
  if constexpr (kStats) {
    for (int64_t c = 0; c < z.c; ++c) shift[c] = to_float(xs[(c / z.cg) * z.cg]);
    std::fill(out, out + 2 * z.c, 0.0);
  }
  const float* __restrict sc = a.scale + (kNorm ? dn : 0) * z.c;
  const float* __restrict sh = a.shift + (kNorm ? dn : 0) * z.c;  // folded: b - mean * sc; else the group's mean
  const float* __restrict bp = a.bias;
  const bool fold = kNorm && a.fold[dn];
  const float* __restrict k = shift.data();
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    float* __restrict u1 = t1.data();
    float* __restrict u2 = t2.data();
    if constexpr (kStats) {
      std::fill(u1, u1 + z.c, 0.0f);
      std::fill(u2, u2 + z.c, 0.0f);
    }
    for (int64_t r = rb; r < std::min(r1, rb + kRows); ++r) {
      const auto* xv = kStats ? view_in<T, kAvx2, InStageRows<T>>(xs + r * z.c, buf.data(), z.c) : nullptr;
      const auto* xn = kNorm ? view_in<T, kAvx2, InStageRows<T>>(xd + r * z.c, nbuf.data(), z.c) : nullptr;
      auto* yv = kNorm ? view_out<T>(yd + r * z.c, nbuf.data()) : nullptr;
      if (fold) {
        fwd_cl_row<T, kSilu, kStats, kNorm, true, kAvx2>(xv, k, u1, u2, xn, sc, sh, bp, yv, z.c);
      } else {
        fwd_cl_row<T, kSilu, kStats, kNorm, false, kAvx2>(xv, k, u1, u2, xn, sc, sh, bp, yv, z.c);
      }
      if constexpr (kNorm) flush_out<T, kAvx2>(nbuf.data(), yd + r * z.c, z.c);
    }
    if constexpr (kStats) {
      for (int64_t c = 0; c < z.c; ++c) {
        out[c] += u1[c];
        out[z.c + c] += u2[c];
      }
    }
  }
}

// Sample n's statistics from its chunks' partial sums, in a fixed order, and the normalization's
// per-channel coefficients, by the sample's form.
template <typename T>
void fwd_cl_finish(const FwdArgs& a, int64_t n) {
  const Sizes& z = a.z;
  const T* x = static_cast<const T*>(a.x);
  bool fold = true;
  for (int64_t g = 0; g < z.groups; ++g) {
    double s1 = 0, s2 = 0;
    for (int64_t p = 0; p < a.chunks; ++p) {
      const double* part = a.partial + (n * a.chunks + p) * 2 * z.c;
      for (int64_t j = 0; j < z.cg; ++j) {
        s1 += part[g * z.cg + j];
        s2 += part[z.c + g * z.cg + j];
      }
    }
    const float k = to_float(x[n * z.s * z.c + g * z.cg]);
    float mean, rstd;
    finish_stats(s1, s2, static_cast<double>(z.m()), k, a.eps, &mean, &rstd);
    a.mean[n * z.groups + g] = mean;
    a.rstd[n * z.groups + g] = rstd;
    fold = fold && folds(mean, rstd);
  }
  a.fold[n] = fold;
  for (int64_t c = 0; c < z.c; ++c) {
    const int64_t ng = n * z.groups + c / z.cg;
    const float sc = a.rstd[ng] * a.weight[c];
    a.scale[n * z.c + c] = sc;
    a.shift[n * z.c + c] = fold ? fold_shift(a.mean[ng], sc, a.bias[c]) : a.mean[ng];
  }
}

// A per-thread float buffer that lives across calls (OpenMP threads persist), for the backward's
// g = dy * act'(z) of one or two groups: the second pass reads it instead of computing the sigmoid again.
float* thread_scratch(int64_t n) {
  thread_local FloatBuffer buf;  // (cache-line aligned)
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// ---- backward, contiguous, without a buffer: one item per (sample, group) --------------------------

// No SiLU (g is dy), or groups over half of kScratchMax: the dx pass computes g again.
template <typename T, bool kSilu, bool kAvx2, bool kAvx512 = false>
LDMFAST_AI void bwd_contig_item(const BwdArgs& a, int64_t item) {
  const Sizes& z = a.z;
  const int64_t ng = item, n = item / z.groups, g = item % z.groups;
  const int64_t m = z.m();
  const T* xg = static_cast<const T*>(a.x) + ng * m;
  const T* dyg = static_cast<const T*>(a.dy) + ng * m;
  T* dxg = static_cast<T*>(a.dx) + ng * m;
  const float mean = a.mean[ng], rstd = a.rstd[ng];
  float xb[kBlock], db[kBlock];
  double ga = 0, gb = 0;  // sums over the group of weight * g and weight * g * xhat
  for (int64_t j = 0; j < z.cg; ++j) {
    const int64_t c = g * z.cg + j;
    const float sc = rstd * a.weight[c];
    const float bc = a.bias[c];
    double s1 = 0, s2 = 0;  // sums of g and of g * (x - mean); rstd multiplies the second once, below
    for (int64_t off = 0; off < z.s; off += kBlock) {
      const int64_t len = std::min(kBlock, z.s - off);
      const auto* xv = view_in<T, kAvx2>(xg + j * z.s + off, xb, len);
      const auto* dv = view_in<T, kAvx2>(dyg + j * z.s + off, db, len);
      float a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = 0; i < len; ++i) {
        const float d = to_float(xv[i]) - mean;
        const float gv = to_float(dv[i]) * act_grad<kSilu, kAvx2>(madd<kAvx2>(d, sc, bc));
        a1 += gv;
        a2 = madd<kAvx2>(gv, d, a2);
      }
      s1 += a1;
      s2 += a2;
    }
    s2 *= rstd;
    a.sum_g[n * z.c + c] = s1;
    a.sum_gx[n * z.c + c] = s2;
    ga += a.weight[c] * s1;
    gb += a.weight[c] * s2;
  }
  const double inv_m = 1.0 / static_cast<double>(m);
  const float cb = static_cast<float>(-static_cast<double>(rstd) * rstd * gb * inv_m);
  // dx = rstd * weight * g + cb * (x - mean) + cd: x - mean first, as cb * x - cb * mean cancels
  // when |mean| >> std.
  const float cd = static_cast<float>(-static_cast<double>(rstd) * ga * inv_m);
  for (int64_t j = 0; j < z.cg; ++j) {
    const int64_t c = g * z.cg + j;
    const float sc = rstd * a.weight[c];
    const float bc = a.bias[c];
    for (int64_t off = 0; off < z.s; off += kBlock) {
      const int64_t len = std::min(kBlock, z.s - off);
      const auto* xv = view_in<T, kAvx2>(xg + j * z.s + off, xb, len);
      auto* ov = view_out<T>(dxg + j * z.s + off, xb);
      const auto* dv = view_in<T, kAvx2>(dyg + j * z.s + off, db, len);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float d = to_float(xv[i]) - mean;
        const float gv = to_float(dv[i]) * act_grad<kSilu, kAvx2>(madd<kAvx2>(d, sc, bc));
        ov[i] = from_float<OutStage<T>>(madd<kAvx2>(sc, gv, madd<kAvx2>(cb, d, cd)));
      }
      flush_out<T, kAvx2>(xb, dxg + j * z.s + off, len);
    }
  }
}

// ---- backward, contiguous, pipelined: pass 1 of a group runs in the same loop as pass 2 of the one before

// Pass 1 (g = dy * act'(z) into a per-thread buffer, and the channel's sums) is bound by arithmetic
// (the sigmoid's exp and division), pass 2 (dx from g and x, both still in cache) by memory (dx's
// stores). Run one after the other, each leaves the other's unit idle; run in one loop, group k's
// pass 1 beside group k-1's pass 2 (whose channel rows line up: same channel count and length), the
// core overlaps them. One core, float32 SiLU backward: 0.77 -> 0.65 ns per element at (4, 896, 24x28).
// Each thread takes a contiguous range of groups; a range's first group has no pass 2 beside it and
// its last no pass 1.

// One channel row of a group as pass 1 reads it.
template <typename T>
struct SumsRow {
  const T* x;
  const T* dy;
  float* g;
  float mean, sc, bc;
  double s1 = 0, s2 = 0;  // sums of g and of g * (x - mean)
};

// One channel row of a group as pass 2 writes it: dx = sc * g + cb * (x - mean) + cd.
template <typename T>
struct DxRow {
  const T* x;
  T* dx;
  const float* g;
  float mean, sc, cb, cd;
};

#if defined(__x86_64__)
// bwd_contig_rows' SiLU loop in AVX-512 intrinsics: the same elementwise arithmetic as the compiled
// loop, the row's tail under a mask, and the sums reduced by a tree per block of kBlock values (into
// double, as the compiled loop's per-block float sums). Two uses:
// - float data (float32, and float16 staged through float blocks) at short rows: GCC 12 ends every
//   `omp simd` reduction with a serial chain of 16 scalar adds through the stack, per row and per
//   sum: a quarter of the float32 backward's time at rows of 168 (12x14 maps);
// - bfloat16 rows on AVX512-BF16 CPUs, whole: x and dy widened in registers and dx rounded by
//   vcvtneps2bf16 as stored, where the compiled loop staged all three through float blocks
//   (bench/ab_group_norm.py both orders: backward 1.07-1.29x).
// Compiled with AVX512-BF16 enabled for the bfloat16 instance; the float instance contains no
// BF16 instruction (only the bfloat16 loads and stores do), so it runs on any AVX-512 CPU. Not
// inlined: its caller's chain of always-inline functions has no target of its own (GCC inlines no
// function with a wider instruction set into one); one call per row.
template <typename T, bool kSums, bool kDx>
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))) void bwd_row_avx512(
    const T* __restrict xv, const T* __restrict dv, float* __restrict gout, float mean, float sc, float bc,
    const T* xv2, T* ov, const float* __restrict gin, float mean2, float sc2, float cb, float cd, int64_t s,
    double* s1, double* s2) {
  const __m512 vmean = _mm512_set1_ps(mean), vsc = _mm512_set1_ps(sc), vbc = _mm512_set1_ps(bc);
  const __m512 vmean2 = _mm512_set1_ps(mean2), vsc2 = _mm512_set1_ps(sc2), vcb = _mm512_set1_ps(cb);
  const __m512 vcd = _mm512_set1_ps(cd);
  for (int64_t off = 0; off < s; off += kBlock) {
    const int64_t end = std::min(s, off + kBlock);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t i = off; i < end; i += kLanes) {
      const __mmask16 m = lanes_mask(end - i);
      if constexpr (kSums) {
        const __m512 d = _mm512_sub_ps(load16(m, xv + i), vmean);
        const __m512 gv = _mm512_mul_ps(load16(m, dv + i), silu_grad_avx512(_mm512_fmadd_ps(d, vsc, vbc)));
        _mm512_mask_storeu_ps(gout + i, m, gv);  // masked-off lanes: dy loaded as 0, so gv is 0
        a1 = _mm512_add_ps(a1, gv);
        a2 = _mm512_fmadd_ps(gv, d, a2);
      }
      if constexpr (kDx) {
        const __m512 d2 = _mm512_sub_ps(load16(m, xv2 + i), vmean2);
        store16(m, ov + i, _mm512_fmadd_ps(vsc2, _mm512_maskz_loadu_ps(m, gin + i), _mm512_fmadd_ps(vcb, d2, vcd)));
      }
    }
    if constexpr (kSums) {
      *s1 += _mm512_reduce_add_ps(a1);
      *s2 += _mm512_reduce_add_ps(a2);
    }
  }
}
#endif

// Pass 1 over p's row (kSums) and pass 2 over q's row (kDx), in one loop; rows of s elements.
// Rows of at most kShortRow values go through bwd_row_avx512 in the AVX-512 variant. One Xeon core,
// SiLU backward (bench/ab_group_norm.py both ways round): rows of 168 (12x14 maps) float32 1.21x,
// bfloat16 1.16x; rows of 672 and more float32 0.99-1.06x, bfloat16 0.90-0.95x (GCC's loop is
// better there, where one reduction's end is spread over more elements).
constexpr int64_t kShortRow = 256;

// kAvx512: the AVX-512 variant, whose SiLU backward takes bwd_row_avx512 on bfloat16 (AVX512-BF16)
// and at short rows on data read as float.
template <typename T, bool kSilu, bool kAvx2, bool kSums, bool kDx, bool kAvx512 = false>
LDMFAST_AI void bwd_contig_rows(SumsRow<T>& p, const DxRow<T>& q, int64_t s) {
#if defined(__x86_64__)
  if constexpr (kAvx512 && kSilu && std::is_same_v<T, bfloat16_hw_t>) {
    return bwd_row_avx512<T, kSums, kDx>(p.x, p.dy, p.g, p.mean, p.sc, p.bc, q.x, q.dx, q.g, q.mean, q.sc, q.cb, q.cd, s,
                                         &p.s1, &p.s2);
  }
#endif
  float xb[kBlock], db[kBlock], xq[kBlock];
#if defined(__x86_64__)
  if constexpr (kAvx512 && kSilu && std::is_same_v<InStage<T>, float>) {
    static_assert(kShortRow <= kBlock, "a short row is one block");
    if (s <= kShortRow) {
      const float* xv = kSums ? view_in<T, kAvx2>(p.x, xb, s) : nullptr;
      const float* dv = kSums ? view_in<T, kAvx2>(p.dy, db, s) : nullptr;
      const float* xv2 = kDx ? view_in<T, kAvx2>(q.x, xq, s) : nullptr;
      float* ov = kDx ? view_out<T>(q.dx, xq) : nullptr;
      bwd_row_avx512<float, kSums, kDx>(xv, dv, p.g, p.mean, p.sc, p.bc, xv2, ov, q.g, q.mean, q.sc, q.cb, q.cd, s,
                                        &p.s1, &p.s2);
      if constexpr (kDx) flush_out<T, kAvx2>(xq, q.dx, s);
      return;
    }
  }
#endif
  auto row = [&](int64_t from, int64_t len, auto skip) {
    const InStage<T>* __restrict xv = kSums ? view_in<T, kAvx2>(p.x + from, xb, len) : nullptr;
    const InStage<T>* __restrict dv = kSums ? view_in<T, kAvx2>(p.dy + from, db, len) : nullptr;
    float* __restrict gout = kSums ? p.g + from : nullptr;
    const InStage<T>* __restrict xv2 = kDx ? view_in<T, kAvx2>(q.x + from, xq, len) : nullptr;
    OutStage<T>* __restrict ov = kDx ? view_out<T>(q.dx + from, xq) : nullptr;
    const float* __restrict gin = kDx ? q.g + from : nullptr;
    const float mean = p.mean, sc = p.sc, bc = p.bc;
    const float mean2 = q.mean, sc2 = q.sc, cb = q.cb, cd = q.cd;
    float a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = 0; i < len; ++i) {
      if constexpr (kSums) {
        const float d = to_float(xv[i]) - mean;
        const float gv = to_float(dv[i]) * act_grad<kSilu, kAvx2>(madd<kAvx2>(d, sc, bc));
        gout[i] = gv;
        const float counted = decltype(skip)::value && i < skip ? 0.0f : gv;
        a1 += counted;
        a2 = madd<kAvx2>(counted, d, a2);
      }
      if constexpr (kDx) ov[i] = from_float<OutStage<T>>(madd<kAvx2>(sc2, gin[i], madd<kAvx2>(cb, to_float(xv2[i]) - mean2, cd)));
    }
    if constexpr (kSums) {
      p.s1 += a1;
      p.s2 += a2;
    }
    if constexpr (kDx) flush_out<T, kAvx2>(xq, q.dx + from, len);
  };
  for (int64_t off = 0; off < s; off += kBlock) over_vectors(off, std::min(kBlock, s - off), row);
}

// The backward's state across the groups of one thread's range: each group's g in one half of the
// thread's buffer (paired) or the whole of it, and the dx coefficients of the group in each half.
struct BwdRange {
  int64_t first;
  float* gbuf;  // kHalves<T> * m floats
  float cb[2] = {0, 0}, cd[2] = {0, 0};
};

// Groups whose g the backward's buffer holds at once: 2 where the passes of two groups run paired,
// else 1 (g of one group stays in cache).
template <typename T>
constexpr int64_t kHalves = kPairsGroups<T> ? 2 : 1;

// One loop over the rows of pass 1 of group si (kSums) and pass 2 of group di (kDx). A function, not
// a lambda: GCC compiles a lambda that it does not inline for the baseline ISA, whatever the
// enclosing function's target (3x slower here). Which passes run is a template argument: with
// run-time flags, GCC left the bfloat16 loops of the unpaired schedule scalar (5 ns per element).
template <typename T, bool kSilu, bool kAvx2, bool kSums, bool kDx, bool kAvx512>
LDMFAST_AI void bwd_contig_step(const BwdArgs& a, BwdRange& r, int64_t si, int64_t di) {
  const Sizes& z = a.z;
  const int64_t m = z.m();
  const int64_t hs = kSums ? (si - r.first) % kHalves<T> : 0, hd = kDx ? (di - r.first) % kHalves<T> : 0;
  const float mean = kSums ? a.mean[si] : 0.0f, rstd = kSums ? a.rstd[si] : 0.0f;
  const float mean2 = kDx ? a.mean[di] : 0.0f, rstd2 = kDx ? a.rstd[di] : 0.0f;
  double ga = 0, gb = 0;  // sums over the group of weight * g and weight * g * xhat
  for (int64_t j = 0; j < z.cg; ++j) {
    SumsRow<T> p{};
    DxRow<T> q{};
    if constexpr (kSums) {
      const int64_t c = si % z.groups * z.cg + j;
      p = SumsRow<T>{static_cast<const T*>(a.x) + si * m + j * z.s, static_cast<const T*>(a.dy) + si * m + j * z.s,
                     r.gbuf + hs * m + j * z.s, mean, rstd * a.weight[c], a.bias[c]};
    }
    if constexpr (kDx) {
      const int64_t c = di % z.groups * z.cg + j;
      q = DxRow<T>{static_cast<const T*>(a.x) + di * m + j * z.s, static_cast<T*>(a.dx) + di * m + j * z.s,
                   r.gbuf + hd * m + j * z.s, mean2, rstd2 * a.weight[c], r.cb[hd], r.cd[hd]};
    }
    bwd_contig_rows<T, kSilu, kAvx2, kSums, kDx, kAvx512>(p, q, z.s);
    if constexpr (kSums) {
      const int64_t n = si / z.groups, c = si % z.groups * z.cg + j;
      const double s2 = p.s2 * rstd;
      a.sum_g[n * z.c + c] = p.s1;
      a.sum_gx[n * z.c + c] = s2;
      ga += a.weight[c] * p.s1;
      gb += a.weight[c] * s2;
    }
  }
  if constexpr (kSums) {  // dx = rstd * weight * g + cb * (x - mean) + cd: x - mean first, as
                          // cb * x - cb * mean cancels when |mean| >> std
    const double inv_m = 1.0 / static_cast<double>(m);
    r.cb[hs] = static_cast<float>(-static_cast<double>(rstd) * rstd * gb * inv_m);
    r.cd[hs] = static_cast<float>(-static_cast<double>(rstd) * ga * inv_m);
  }
}

// Groups [first, last) of a thread.
template <typename T, bool kSilu, bool kAvx2, bool kAvx512 = false>
LDMFAST_AI void bwd_contig_range(const BwdArgs& a, int64_t first, int64_t last) {
  if (first >= last) return;
  BwdRange r{first, thread_scratch(kHalves<T> * a.z.m())};
  if constexpr (kPairsGroups<T>) {
    bwd_contig_step<T, kSilu, kAvx2, true, false, kAvx512>(a, r, first, -1);
    for (int64_t item = first + 1; item < last; ++item) {
      bwd_contig_step<T, kSilu, kAvx2, true, true, kAvx512>(a, r, item, item - 1);
    }
    bwd_contig_step<T, kSilu, kAvx2, false, true, kAvx512>(a, r, -1, last - 1);
  } else {
    for (int64_t item = first; item < last; ++item) {
      bwd_contig_step<T, kSilu, kAvx2, true, false, kAvx512>(a, r, item, -1);
      bwd_contig_step<T, kSilu, kAvx2, false, true, kAvx512>(a, r, -1, item);
    }
  }
}

// ---- backward, channels-last: per-channel partial sums per (sample, chunk of rows), then dx -------

// As the forward (fwd_cl_step): sample n + 1's sums in the same row loop as sample n's dx. Both
// passes compute g = dy * act'(z) (a buffer of g would add its write and read to the L3 traffic).

// Rows of chunk p: sample sn's sums of g and g * xhat per channel (kSums), sample dn's dx (kDx).
template <typename T, bool kSilu, bool kSums, bool kDx, bool kAvx2, bool kAvx512 = false>
LDMFAST_AI void bwd_cl_step(const BwdArgs& a, int64_t p, int64_t sn, int64_t dn) {
  const Sizes& z = a.z;
  const int64_t r0 = p * a.rows_per_chunk, r1 = std::min(z.s, r0 + a.rows_per_chunk);
  const int64_t si = kSums ? sn : 0, di = kDx ? dn : 0;  // (a pass that does not run points at sample 0)
  const T* xs = static_cast<const T*>(a.x) + si * z.s * z.c;
  const T* dys = static_cast<const T*>(a.dy) + si * z.s * z.c;
  const T* xd = static_cast<const T*>(a.x) + di * z.s * z.c;
  const T* dyd = static_cast<const T*>(a.dy) + di * z.s * z.c;
  T* dxd = static_cast<T*>(a.dx) + di * z.s * z.c;
  double* out = kSums ? a.partial + (sn * a.chunks + p) * 2 * z.c : nullptr;
  FloatBuffer xbuf(z.c), dbuf(z.c), xbuf2(z.c), dbuf2(z.c), t1(z.c), t2(z.c);
  if constexpr (kSums) std::fill(out, out + 2 * z.c, 0.0);
  const float* __restrict bp = a.bias;
  const float* __restrict sc = a.scale + si * z.c;
  const float* __restrict mp = a.mu + si * z.c;
  const float* rstd = a.rstd + si * z.groups;
  const float* __restrict sc2 = a.scale + di * z.c;
  const float* __restrict mu2 = a.mu + di * z.c;
  const float* __restrict cb = a.cb + di * z.c;
  const float* __restrict cd = a.cd + di * z.c;
  float* __restrict u1 = t1.data();
  float* __restrict u2 = t2.data();
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    if constexpr (kSums) {
      std::fill(u1, u1 + z.c, 0.0f);
      std::fill(u2, u2 + z.c, 0.0f);
    }
    for (int64_t r = rb; r < std::min(r1, rb + kRows); ++r) {
      const auto* xv = kSums ? view_in<T, kAvx2, InStageRows<T>>(xs + r * z.c, xbuf.data(), z.c) : nullptr;
      const auto* dv = kSums ? view_in<T, kAvx2, InStageRows<T>>(dys + r * z.c, dbuf.data(), z.c) : nullptr;
      const auto* xv2 = kDx ? view_in<T, kAvx2, InStageRows<T>>(xd + r * z.c, xbuf2.data(), z.c) : nullptr;
      const auto* dv2 = kDx ? view_in<T, kAvx2, InStageRows<T>>(dyd + r * z.c, dbuf2.data(), z.c) : nullptr;
      auto* ov = kDx ? view_out<T>(dxd + r * z.c, xbuf2.data()) : nullptr;
#pragma omp simd
      for (int64_t c = 0; c < z.c; ++c) {
        if constexpr (kSums) {
          const float d = to_float(xv[c]) - mp[c];
          const float gv = to_float(dv[c]) * act_grad<kSilu, kAvx2>(madd<kAvx2>(d, sc[c], bp[c]));
          u1[c] += gv;
          u2[c] = madd<kAvx2>(gv, d, u2[c]);
        }
        if constexpr (kDx) {
          const float d = to_float(xv2[c]) - mu2[c];
          const float gv = to_float(dv2[c]) * act_grad<kSilu, kAvx2>(madd<kAvx2>(d, sc2[c], bp[c]));
          ov[c] = from_float<OutStage<T>>(madd<kAvx2>(sc2[c], gv, madd<kAvx2>(cb[c], d, cd[c])));
        }
      }
      if constexpr (kDx) flush_out<T, kAvx2>(xbuf2.data(), dxd + r * z.c, z.c);
    }
    if constexpr (kSums) {
      for (int64_t c = 0; c < z.c; ++c) {
        out[c] += u1[c];
        out[z.c + c] += static_cast<double>(u2[c]) * rstd[c / z.cg];  // u2 sums g * (x - mean)
      }
    }
  }
}

// Sample n's sums from its chunks' partial sums, in a fixed order, and its dx coefficients.
template <typename T>
void bwd_cl_finish(const BwdArgs& a, int64_t n) {
  const Sizes& z = a.z;
  const double inv_m = 1.0 / static_cast<double>(z.m());
  for (int64_t c = 0; c < z.c; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t p = 0; p < a.chunks; ++p) {
      const double* part = a.partial + (n * a.chunks + p) * 2 * z.c;
      s1 += part[c];
      s2 += part[z.c + c];
    }
    a.sum_g[n * z.c + c] = s1;
    a.sum_gx[n * z.c + c] = s2;
  }
  for (int64_t g = 0; g < z.groups; ++g) {
    double ga = 0, gb = 0;
    for (int64_t j = 0; j < z.cg; ++j) {
      const int64_t c = g * z.cg + j;
      ga += a.weight[c] * a.sum_g[n * z.c + c];
      gb += a.weight[c] * a.sum_gx[n * z.c + c];
    }
    const double rstd = a.rstd[n * z.groups + g];
    const float cbv = static_cast<float>(-rstd * rstd * gb * inv_m);
    const float cdv = static_cast<float>(-rstd * ga * inv_m);
    for (int64_t j = 0; j < z.cg; ++j) {
      a.cb[n * z.c + g * z.cg + j] = cbv;
      a.cd[n * z.c + g * z.cg + j] = cdv;
    }
  }
}

// ---- the compiled variants of every item, range and step function -------------------------------

// The same source compiled three times: baseline x86-64, AVX2 (8 floats per instruction) and
// AVX-512 (16; about 15% faster on the SiLU's exp than AVX2 on Zen 4). The last two use F16C
// (kAvx2); the AVX-512 one also takes the intrinsics rows (kAvx512).
// PARAMS and CALL: the functions' parameter list and the call's arguments, in parentheses.
#define LDMFAST_GN_VARIANTS_OF(NAME, PARAMS, CALL, ...)                                              \
  template <__VA_ARGS__>                                                                           \
  void NAME##_base PARAMS { NAME<LDMFAST_GN_TPL, false> CALL; }                                    \
  template <__VA_ARGS__>                                                                           \
  __attribute__((target("avx2,fma,f16c"))) void NAME##_avx2 PARAMS { NAME<LDMFAST_GN_TPL, true> CALL; } \
  template <__VA_ARGS__>                                                                           \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512"))) \
  void NAME##_avx512 PARAMS { NAME<LDMFAST_GN_TPL, true, true> CALL; }

// Functions of one item, and of a range of items [first, last).
#define LDMFAST_GN_VARIANTS(NAME, ARGS, ...) \
  LDMFAST_GN_VARIANTS_OF(NAME, (const ARGS& a, int64_t item), (a, item), __VA_ARGS__)
#define LDMFAST_GN_RANGE_VARIANTS(NAME, ARGS, ...) \
  LDMFAST_GN_VARIANTS_OF(NAME, (const ARGS& a, int64_t first, int64_t last), (a, first, last), __VA_ARGS__)

#define LDMFAST_GN_TPL T, kSilu
LDMFAST_GN_RANGE_VARIANTS(bwd_contig_range, BwdArgs, typename T, bool kSilu)
LDMFAST_GN_RANGE_VARIANTS(fwd_contig_range, FwdArgs, typename T, bool kSilu)
LDMFAST_GN_VARIANTS(fwd_contig_item, FwdArgs, typename T, bool kSilu)
LDMFAST_GN_VARIANTS(bwd_contig_item, BwdArgs, typename T, bool kSilu)
#undef LDMFAST_GN_TPL
#define LDMFAST_GN_TPL T, kSilu, kFirst, kSecond
#define LDMFAST_GN_STEP_VARIANTS(NAME, ARGS)                                                                  \
  LDMFAST_GN_VARIANTS_OF(NAME, (const ARGS& a, int64_t p, int64_t sn, int64_t dn), (a, p, sn, dn), typename T, \
                         bool kSilu, bool kFirst, bool kSecond)
LDMFAST_GN_STEP_VARIANTS(fwd_cl_step, FwdArgs)
LDMFAST_GN_STEP_VARIANTS(bwd_cl_step, BwdArgs)
#undef LDMFAST_GN_STEP_VARIANTS
#undef LDMFAST_GN_TPL

template <typename Fn>
Fn pick(Fn base, Fn avx2, Fn avx512) {
  const int level = isa_level();
  return level == 2 ? avx512 : level == 1 ? avx2 : base;
}

template <typename Args>
using ItemFn = void (*)(const Args&, int64_t);
template <typename Args>
using RangeFn = void (*)(const Args&, int64_t, int64_t);

// Threads for `items` work items: at least one, at most one per item.
int threads_for(int64_t items, int num_threads) {
  return static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), std::max<int64_t>(items, 1)));
}

// Items split into one contiguous range per thread (items of equal cost: whole groups).
template <typename Args>
void parallel_ranges(RangeFn<Args> fn, const Args& a, int64_t items, int num_threads) {
  const int threads = threads_for(items, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) fn(a, items * t / threads, items * (t + 1) / threads);
}

// Items in one contiguous range per thread, as parallel_ranges: handed out one at a time
// (schedule(dynamic, 1)), neighbouring small groups went to different threads, which then wrote the
// same cache lines of mean and rstd and fetched every item from the shared counter. Two threads,
// SiLU forward, float32: (4, 256, 1x1) 2.0x, (16, 128, 2x2) 2.7x, (4, 224, 7x5) 1.6x, (4, 1792, 6x7)
// 1.13x; (8, 64, 4x4) equal.
template <typename Args>
void parallel_items(ItemFn<Args> fn, const Args& a, int64_t items, int num_threads) {
  const int threads = threads_for(items, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < items; ++item) fn(a, item);
}

// Chunks of rows of the channels-last kernels: one per thread (a step's threads meet at its end),
// each of at least ~8k elements; or one per sample (pipeline_samples then splits the samples among
// the threads) where the samples split evenly among the threads, or where they are too small to
// give every thread a chunk and outnumber the chunks. Split by sample, each thread works through its
// own samples without waiting for the others: two threads, 4 samples of (224, 48x56) to
// (1792, 12x14), forward 1.03-1.10x, backward 1.02-1.13x against chunks of rows; 2 samples about
// equal (0.96-1.02x).
void cl_chunks(const Sizes& z, int num_threads, int64_t* chunks, int64_t* rows_per_chunk) {
  const int64_t threads = std::max(num_threads, 1);
  const int64_t min_rows = std::max<int64_t>(1, 8192 / std::max<int64_t>(z.c, 1));
  int64_t k = std::max<int64_t>(1, std::min<int64_t>(threads, z.s / min_rows));
  if (z.n % threads == 0 || (k < threads && z.n > k)) k = 1;
  *rows_per_chunk = (z.s + k - 1) / k;
  *chunks = (z.s + *rows_per_chunk - 1) / *rows_per_chunk;
}

// The variants of a step function (fwd_cl_step, bwd_cl_step) for this CPU.
#define LDMFAST_GN_PICK_STEP(NAME, T, kSilu, kFirst, kSecond) \
  pick(NAME##_base<T, kSilu, kFirst, kSecond>, NAME##_avx2<T, kSilu, kFirst, kSecond>, NAME##_avx512<T, kSilu, kFirst, kSecond>)

template <typename Args>
using StepFn = void (*)(const Args&, int64_t, int64_t, int64_t);

// The channels-last kernels' two passes in n + 1 steps over the chunks of rows: sample 0's first
// pass; then sample k's first pass in the same loop as sample k - 1's second; then the last
// sample's second pass. Before a sample's second pass, one thread finishes its sums (finish(k)).
// Samples of one chunk (see cl_chunks) are split among the threads instead, each running that
// pipeline over its own range of samples, without barriers (finish(k) writes sample k's only).
template <typename Args, typename Finish>
void pipeline_samples(const Args& a, StepFn<Args> first, StepFn<Args> both, StepFn<Args> second, Finish&& finish,
                      int num_threads) {
  const int64_t n = a.z.n;
  if (a.chunks == 1 && n > 1 && num_threads > 1) {
    const int threads = threads_for(n, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
      const int64_t f = n * t / threads, l = n * (t + 1) / threads;
      first(a, 0, f, -1);
      finish(f);
      for (int64_t k = f + 1; k < l; ++k) {
        both(a, 0, k, k - 1);
        finish(k);
      }
      second(a, 0, -1, l - 1);
    }
    return;
  }
  const int threads = threads_for(a.chunks, num_threads);
#pragma omp parallel num_threads(threads)
  for (int64_t k = 0; k <= n; ++k) {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < a.chunks; ++p) {
      if (k == 0) {
        first(a, p, 0, -1);
      } else if (k == n) {
        second(a, p, -1, k - 1);
      } else {
        both(a, p, k, k - 1);
      }
    }
    if (k < n) {
#pragma omp single
      finish(k);
    }
  }
}

template <typename T, bool kSilu>
void forward_cl(FwdArgs& a, int num_threads) {
  const Sizes& z = a.z;
  cl_chunks(z, num_threads, &a.chunks, &a.rows_per_chunk);
  std::vector<double> partial(static_cast<size_t>(z.n * a.chunks * 2 * z.c));
  FloatBuffer scale(static_cast<size_t>(z.n * z.c)), shift(static_cast<size_t>(z.n * z.c));
  std::vector<char> fold(static_cast<size_t>(z.n), 1);
  a.partial = partial.data();
  a.scale = scale.data();
  a.shift = shift.data();
  a.fold = fold.data();
  pipeline_samples<FwdArgs>(a, LDMFAST_GN_PICK_STEP(fwd_cl_step, T, kSilu, true, false),
                            LDMFAST_GN_PICK_STEP(fwd_cl_step, T, kSilu, true, true),
                            LDMFAST_GN_PICK_STEP(fwd_cl_step, T, kSilu, false, true),
                            [&](int64_t n) { fwd_cl_finish<T>(a, n); }, num_threads);
}

// Whether the contiguous forward pairs groups (fwd_contig_range) rather than running one group at a
// time (fwd_contig_item, whose statistics pass runs over the whole group, not row by row). Short rows
// that end in a partial vector (12x14 maps: 168) pair where fwd_row_avx512 runs them (the AVX-512
// SiLU forward, data read as float or bfloat16 on AVX512-BF16) and are at least kMinPairedRow long;
// GCC's loop, whose rows end in an overlapping vector and a serial sum, ran them 0.36 -> 0.41 ns per
// element slower paired at (4, 1792, 12x14). One Xeon core, float32 (bfloat16), SiLU, paired through
// fwd_row_avx512 against one group at a time: rows of 168 1.20x (1.03x), 300 and 500 1.15x (1.07x),
// 80 and 88 1.1x (1.02x); rows of 56 and 72 equal or slower (bfloat16 0.97x), 24 and 42 0.8-0.95x.
constexpr int64_t kMinPairedRow = 80;

template <typename T, bool kSilu>
bool pairs_forward_groups(const Sizes& z) {
  if (!kPairsGroups<T>) return false;
  if (z.s % kLanes == 0 || z.s > kBlock) return true;
  return kSilu && isa_level() == 2 && z.s >= kMinPairedRow;
}

template <typename T, bool kSilu>
void forward_typed(FwdArgs& a, bool channels_last, int num_threads) {
  const Sizes& z = a.z;
  if (!channels_last && pairs_forward_groups<T, kSilu>(z)) {
    parallel_ranges<FwdArgs>(pick<RangeFn<FwdArgs>>(fwd_contig_range_base<T, kSilu>, fwd_contig_range_avx2<T, kSilu>,
                                                    fwd_contig_range_avx512<T, kSilu>), a, z.n * z.groups, num_threads);
    return;
  }
  if (!channels_last) {
    parallel_items<FwdArgs>(pick<ItemFn<FwdArgs>>(fwd_contig_item_base<T, kSilu>, fwd_contig_item_avx2<T, kSilu>, fwd_contig_item_avx512<T, kSilu>), a,
                            z.n * z.groups, num_threads);
    return;
  }
  forward_cl<T, kSilu>(a, num_threads);
}

template <typename T, bool kSilu>
void backward_typed(BwdArgs& a, float* dweight, float* dbias, bool channels_last, int num_threads) {
  const Sizes& z = a.z;
  std::vector<double> sum_g(static_cast<size_t>(z.n * z.c)), sum_gx(static_cast<size_t>(z.n * z.c));
  a.sum_g = sum_g.data();
  a.sum_gx = sum_gx.data();
  if (!channels_last && kSilu && 2 * z.m() <= kScratchMax) {
    parallel_ranges<BwdArgs>(pick<RangeFn<BwdArgs>>(bwd_contig_range_base<T, kSilu>, bwd_contig_range_avx2<T, kSilu>,
                                                    bwd_contig_range_avx512<T, kSilu>), a, z.n * z.groups, num_threads);
  } else if (!channels_last) {
    parallel_items<BwdArgs>(pick<ItemFn<BwdArgs>>(bwd_contig_item_base<T, kSilu>, bwd_contig_item_avx2<T, kSilu>, bwd_contig_item_avx512<T, kSilu>), a,
                            z.n * z.groups, num_threads);
  } else {
    cl_chunks(z, num_threads, &a.chunks, &a.rows_per_chunk);
    const size_t nc = static_cast<size_t>(z.n * z.c);
    std::vector<double> partial(static_cast<size_t>(z.n * a.chunks * 2 * z.c));
    FloatBuffer scale(nc), cb(nc), cd(nc), mu(nc);
    a.partial = partial.data();
    a.scale = scale.data();
    a.cb = cb.data();
    a.cd = cd.data();
    a.mu = mu.data();
    for (int64_t n = 0; n < z.n; ++n) {
      for (int64_t c = 0; c < z.c; ++c) {
        const int64_t ng = n * z.groups + c / z.cg;
        a.scale[n * z.c + c] = a.rstd[ng] * a.weight[c];
        a.mu[n * z.c + c] = a.mean[ng];
      }
    }
    pipeline_samples<BwdArgs>(a, LDMFAST_GN_PICK_STEP(bwd_cl_step, T, kSilu, true, false),
                              LDMFAST_GN_PICK_STEP(bwd_cl_step, T, kSilu, true, true),
                              LDMFAST_GN_PICK_STEP(bwd_cl_step, T, kSilu, false, true),
                              [&](int64_t n) { bwd_cl_finish<T>(a, n); }, num_threads);
  }
  for (int64_t c = 0; c < z.c; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < z.n; ++n) {
      s1 += a.sum_g[n * z.c + c];
      s2 += a.sum_gx[n * z.c + c];
    }
    dbias[c] = static_cast<float>(s1);
    dweight[c] = static_cast<float>(s2);
  }
}

template <typename T>
void forward_dtype(FwdArgs& a, bool silu, bool cl, int threads) {
  silu ? forward_typed<T, true>(a, cl, threads) : forward_typed<T, false>(a, cl, threads);
}

template <typename T>
void backward_dtype(BwdArgs& a, float* dw, float* db, bool silu, bool cl, int threads) {
  silu ? backward_typed<T, true>(a, dw, db, cl, threads) : backward_typed<T, false>(a, dw, db, cl, threads);
}

}  // namespace

void group_norm_forward(DType dtype, const void* x, const float* weight, const float* bias, void* y, float* mean,
                        float* rstd, int64_t n, int64_t c, int64_t s, int64_t groups, float eps, bool silu,
                        bool channels_last, int num_threads) {
  if (n * c * s == 0) return;
  FwdArgs a{};
  a.z = Sizes{n, c, s, groups, c / groups};
  a.x = x;
  a.weight = weight;
  a.bias = bias;
  a.y = y;
  a.mean = mean;
  a.rstd = rstd;
  a.eps = eps;
  switch (dtype) {
    case DType::Float32: return forward_dtype<float>(a, silu, channels_last, num_threads);
    case DType::Float16: return forward_dtype<half_t>(a, silu, channels_last, num_threads);
    case DType::BFloat16:
      return has_avx512_bf16() ? forward_dtype<bfloat16_hw_t>(a, silu, channels_last, num_threads)
                               : forward_dtype<bfloat16_t>(a, silu, channels_last, num_threads);
  }
}

void group_norm_backward(DType dtype, const void* dy, const void* x, const float* weight, const float* bias,
                         const float* mean, const float* rstd, void* dx, float* dweight, float* dbias, int64_t n,
                         int64_t c, int64_t s, int64_t groups, bool silu, bool channels_last, int num_threads) {
  if (n * c * s == 0) return;
  BwdArgs a{};
  a.z = Sizes{n, c, s, groups, c / groups};
  a.dy = dy;
  a.x = x;
  a.weight = weight;
  a.bias = bias;
  a.mean = mean;
  a.rstd = rstd;
  a.dx = dx;
  switch (dtype) {
    case DType::Float32: return backward_dtype<float>(a, dweight, dbias, silu, channels_last, num_threads);
    case DType::Float16: return backward_dtype<half_t>(a, dweight, dbias, silu, channels_last, num_threads);
    case DType::BFloat16:
      return has_avx512_bf16() ? backward_dtype<bfloat16_hw_t>(a, dweight, dbias, silu, channels_last, num_threads)
                               : backward_dtype<bfloat16_t>(a, dweight, dbias, silu, channels_last, num_threads);
  }
}

}  // namespace ldmfast::cpu
