// Flash-style attention on the CPU. Tiles are converted to fp32 buffers (rows padded to whole
// micro-kernel columns; k, and v in the backward, also kept transposed; keys and values once per
// head); the tile products run in register-blocked micro-kernels written with GCC vector types.
// This file is compiled three times (see CMakeLists.txt): for the baseline ISA, AVX2+FMA and
// AVX-512, and attention_dispatch.cpp picks one at run time; LDMFAST_ISA names the variant's
// namespace and LDMFAST_ISA_LEVEL sizes the micro-kernel.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include <omp.h>

#include "cpu/half.h"
#include "cpu/line_aligned.h"
#include "cpu/vec_math.h"

#ifndef LDMFAST_ISA
#define LDMFAST_ISA baseline
#endif
#ifndef LDMFAST_ISA_LEVEL
#define LDMFAST_ISA_LEVEL 0
#endif

namespace ldmfast::cpu::LDMFAST_ISA {
namespace {

// Micro-kernel: kRows x (2 vectors) of accumulators (16 registers on AVX2: 12 accumulators). On
// AVX-512, 8 rows (16 of the 32 registers): 12 rows (24 accumulators, BLIS's sgemm shape) were
// 1.1-1.2x faster at head dim 512 while the score products read q from [r][512] rows, but once
// they read panels (pack_panels) 8 rows were 1.0-1.25x faster at every benchmark shape on a Xeon,
// and 1.2-1.4x in the backward at L=256 (the weighted sums' kRows weight rows cost registers for
// their addresses).
#if LDMFAST_ISA_LEVEL >= 2
constexpr int kLanes = 16;       // floats per vector
constexpr int kRows = 8;         // micro-kernel rows
#elif LDMFAST_ISA_LEVEL == 1
constexpr int kLanes = 8;
constexpr int kRows = 6;
#else
constexpr int kLanes = 8;        // two SSE registers per vector: fewer rows fit
constexpr int kRows = 4;
#endif
constexpr int kCols = 2 * kLanes;             // micro-kernel columns: two vectors
// Query rows per tile (a multiple of kRows). On AVX-512, 128 rows: each key tile, read from L3 once
// per query tile, serves more rows than 64 did (1.05-1.1x at head dim 512 and at L=672 on a Xeon;
// 128, 64 and 192 rows timed within noise of each other once q was in panels).
constexpr int64_t kBlockM = (LDMFAST_ISA_LEVEL >= 2 ? 16 : 8) * kRows;
// Keys per tile. 128 against 64 (one thread of a Zen 4 core): 1.08-1.12x faster forward at head
// dims 32 and 64 and 1.06x faster backward at 512, the same forward at 512.
constexpr int64_t kBlockN = 128;
static_assert(kBlockN % (2 * kLanes) == 0, "key tiles hold whole micro-kernel columns");

// Rows of the query-tile buffers of a call with lq queries: whole tiles, or where one tile takes all
// queries, lq rounded up to micro-kernel rows (buffers for a whole tile, zeroed per call, made a
// call with 16 queries 1.2-1.4x slower once tiles had grown from 64 rows).
int64_t tile_rows(int64_t lq) { return std::min(kBlockM, (lq + kRows - 1) / kRows * kRows); }

// The query tiles of a head whose tiles are split among `threads` threads (the one-head paths):
// a multiple of `threads` tiles of whole micro-kernel rows, as even as kRows allows, so that every
// thread gets the same rows (2688 rows in 21 tiles of 128 gave one thread 11 tiles and the other 10,
// 5 % of both passes' time at the VQGAN block on two cores).
struct QueryTiles {
  QueryTiles(int64_t lq, int threads)
      : lq(lq), units((lq + kRows - 1) / kRows),
        count(((units * kRows + kBlockM - 1) / kBlockM + threads - 1) / threads * threads) {}
  int64_t row0(int64_t t) const { return std::min(lq, t * units / count * kRows); }
  int64_t rows(int64_t t) const { return row0(t + 1) - row0(t); }  // <= kBlockM; 0 where lq is tiny
  int64_t lq, units, count;
};

// Floats of a score tile for tile_rows rows: kRows * kBlockN of slack, as the transposed-weight
// sums read up to kRows - 1 keys past the last (stale, finite, never stored).
int64_t score_tile(int64_t rows) { return (rows + kRows) * kBlockN; }

// fp32 buffers aligned to cache lines (line_aligned.h): the micro-kernels' vector loads and stores
// then never straddle two lines.
using Buffer = FloatBuffer;

typedef float vec8 __attribute__((vector_size(4 * kLanes)));

inline vec8 load8(const float* p) { vec8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, vec8 v) { __builtin_memcpy(p, &v, sizeof v); }

int64_t padded(int64_t dim) { return (dim + kCols - 1) / kCols * kCols; }

// rows x dim block of a (B, H, L, D) operand at (b, h, row0) into dst[r * padded(dim) + d] (fp32);
// the padding columns are never written, so they keep the zeros the buffer started with.
template <typename T>
void load_rows(const TensorRef4& t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dim, float* dst) {
  const T* base = static_cast<const T*>(t.ptr) + b * t.stride[0] + h * t.stride[1];
  const int64_t ld = padded(dim);
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + (row0 + r) * t.stride[2];
    float* out = dst + r * ld;
    if (t.stride[3] == 1) {
      for (int64_t d = 0; d < dim; ++d) out[d] = to_float(src[d]);
    } else {
      for (int64_t d = 0; d < dim; ++d) out[d] = to_float(src[d * t.stride[3]]);
    }
  }
}

// The strip layout of accumulate's m operand, for a block of `rows` rows in a buffer of `height`
// rows: dst[(d / kCols) * height * kCols + r * kCols + d % kCols]. The micro-kernel then reads the
// kCols values of one row as one contiguous run and the next row's right after (in [r][ld] rows
// they sat padded(dim) floats apart: at head dim 512, a new 2 KB-strided pair of lines per step).
template <typename T>
void load_rows_packed(const TensorRef4& t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dim,
                      float* dst, int64_t height) {
  const T* base = static_cast<const T*>(t.ptr) + b * t.stride[0] + h * t.stride[1];
  for (int64_t d0 = 0; d0 < dim; d0 += kCols) {
    const int64_t dn = std::min<int64_t>(kCols, dim - d0);
    float* strip = dst + d0 * height;
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = base + (row0 + r) * t.stride[2] + d0 * t.stride[3];
      float* out = strip + r * kCols;
      for (int64_t j = 0; j < dn; ++j) out[j] = to_float(src[j * t.stride[3]]);
    }
  }
}

// The same layout from fp32 rows [r][padded(dim)] (a query tile also used row by row).
void pack_strips(const float* src, int64_t rows, int64_t dim, float* dst, int64_t height) {
  const int64_t ld = padded(dim);
  for (int64_t d0 = 0; d0 < ld; d0 += kCols) {
    float* strip = dst + d0 * height;
    for (int64_t r = 0; r < rows; ++r) {
      store8(strip + r * kCols, load8(src + r * ld + d0));
      store8(strip + r * kCols + kLanes, load8(src + r * ld + d0 + kLanes));
    }
  }
}

// The same rows in panels of kRows rows, the layout of rows_times_transposed's a operand:
// dst[(r / kRows) * kRows * dim + d * kRows + r % kRows]. The micro-kernel's broadcasts then read the
// kRows values of one d as one contiguous run; from [r][padded(dim)] rows they came from kRows lines
// 2 KB apart at head dim 512, which map to two L1 sets (1.06x faster forward there on a Xeon).
// Rows past `rows` in the last panel keep what the buffer held (finite; their scores are not read).
void pack_panels(const float* src, int64_t rows, int64_t dim, float* dst) {
  const int64_t ld = padded(dim);
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t rn = std::min<int64_t>(kRows, rows - r0);
    float* panel = dst + r0 * dim;
    for (int64_t r = 0; r < rn; ++r) {
      for (int64_t d = 0; d < dim; ++d) panel[d * kRows + r] = src[(r0 + r) * ld + d];
    }
  }
}

// The same block transposed, in strips of kCols rows (the micro-kernel's columns):
// dst[(r / kCols) * dim * kCols + d * kCols + r % kCols]. The micro-kernel then reads the kCols
// values of one d as one contiguous run (a plain [d][kBlockN] transpose made it stride through a
// 512-byte row per d: at head dim 512 the loads waited on L2), and this loop writes whole runs
// (a scatter of single floats 512 bytes apart cost 8 ms per head of 2688 x 512).
template <typename T>
void load_rows_transposed(const TensorRef4& t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dim,
                          float* dst) {
  const T* base = static_cast<const T*>(t.ptr) + b * t.stride[0] + h * t.stride[1];
  for (int64_t r0 = 0; r0 < rows; r0 += kCols) {
    const int64_t rn = std::min<int64_t>(kCols, rows - r0);
    const T* src = base + (row0 + r0) * t.stride[2];
    float* strip = dst + r0 * dim;
    for (int64_t d = 0; d < dim; ++d) {
      float* out = strip + d * kCols;
      for (int64_t j = 0; j < rn; ++j) out[j] = to_float(src[j * t.stride[2] + d * t.stride[3]]);
    }
  }
}

// Start of the kCols values of column block j0 (a multiple of kCols) at depth d in such a strip.
inline const float* strip_at(const float* bt, int64_t j0, int64_t d, int64_t dim) {
  return bt + j0 * dim + d * kCols;
}

template <typename T>
void store_rows(const TensorRef4& t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t dim,
                const float* src, const float* row_scale, float scale) {
  T* base = static_cast<T*>(t.ptr) + b * t.stride[0] + h * t.stride[1];
  const int64_t ld = padded(dim);
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = base + (row0 + r) * t.stride[2];
    const float f = (row_scale ? row_scale[r] : 1.0f) * scale;
    for (int64_t d = 0; d < dim; ++d) dst[d * t.stride[3]] = from_float<T>(src[r * ld + d] * f);
  }
}

// Head dims per pass of rows_times_transposed: 128 x kCols floats of one key strip (16 KB on AVX-512)
// stay in L1 while every row block of the tile reads them; a whole strip at head dim 512 (64 KB)
// does not fit, and perf put most samples on the instruction after the strip's load. (Passes of 64
// and 256 dims timed the same as 128 on a Xeon.)
constexpr int64_t kDimChunk = 128;

// Prefetches into L2 part `part` of `parts` of the `bytes` at p: the strip a product reads next,
// spread over the micro-blocks of the current one. In the forward each key tile comes from L3
// once per query tile (a head's keys outgrow L2), and the first row block of each strip waited on
// it (with pack_panels, 1.10-1.12x faster forward at head dim 512 on a Xeon, the same at 32 and
// 64). The backward's key tiles stay in L2 across its query tiles where it matters.
inline void prefetch_part(const float* p, int64_t bytes, int64_t part, int64_t parts) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = part * bytes / parts / 64 * 64; off < (part + 1) * bytes / parts; off += 64) {
    __builtin_prefetch(c + off, 0, 2);
  }
}

// s[r * kBlockN + j] = sum_d a(r, d) * bt(d, j) for r < rows, j < keys, a in the panels of
// pack_panels, bt in the strips of load_rows_transposed. Whole kRows x kCols blocks are stored: rows
// past `rows` (within the tile: kBlockM is a multiple of kRows) and columns past `keys` (up to
// kBlockN) get values of stale buffer contents, finite and never read as scores.
// next_bt: where given, the key tile (same layout) a later call reads, fetched into L2 bit by bit.
void rows_times_transposed(const float* a, const float* bt, float* s, int64_t rows, int64_t keys, int64_t dim,
                           const float* next_bt = nullptr) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const bool prefetch = next_bt != nullptr;
  for (int64_t d0 = 0; d0 < dim; d0 += kDimChunk) {
    const int64_t d1 = std::min(dim, d0 + kDimChunk);
    for (int64_t j0 = 0; j0 < keys; j0 += kCols) {
      const float* next = j0 + kCols < keys ? strip_at(bt, j0 + kCols, d0, dim)
                          : d1 < dim        ? strip_at(bt, 0, d1, dim)
                                            : next_bt;  // the next key tile's first
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        if (prefetch) prefetch_part(next, kDimChunk * kCols * sizeof(float), r0 / kRows, blocks);
        vec8 acc[kRows][2];
        for (int r = 0; r < kRows; ++r) {
          const float* dst = s + (r0 + r) * kBlockN + j0;
          acc[r][0] = d0 == 0 ? vec8{} : load8(dst);
          acc[r][1] = d0 == 0 ? vec8{} : load8(dst + kLanes);
        }
        // Unrolled: 1.05-1.1x faster products on a Xeon (in-process A/B against the plain loop; 8
        // steps 1.02-1.03x faster than 4).
#pragma GCC unroll 8
        for (int64_t d = d0; d < d1; ++d) {
          const float* col = strip_at(bt, j0, d, dim);
          const vec8 lo = load8(col), hi = load8(col + kLanes);
          for (int r = 0; r < kRows; ++r) {
            const float ad = a[r0 * dim + d * kRows + r];
            acc[r][0] += ad * lo;
            acc[r][1] += ad * hi;
          }
        }
        for (int r = 0; r < kRows; ++r) {
          float* dst = s + (r0 + r) * kBlockN + j0;
          store8(dst, acc[r][0]);
          store8(dst + kLanes, acc[r][1]);
        }
      }
    }
  }
}

// acc[o * ld + d] += sum_i w[o * w_outer + i * w_inner] * m(i, d) for o < outer, i < inner, over
// all padded columns d, m in the strips of load_rows_packed (m_height rows). Padding columns of acc
// get whatever the padding of m holds and are never stored. The four weighted sums of attention:
// out += p v, dq += ds k (w row-major), dv += p^T do, dk += ds^T q (w transposed).
// next_m: where given, the tile (same layout) a later call reads as m, fetched into L2 bit by bit.
void accumulate(const float* w, int64_t w_outer, int64_t w_inner, const float* m, int64_t m_height, float* acc,
                int64_t outer, int64_t inner, int64_t dim, const float* next_m = nullptr) {
  const int64_t ld = padded(dim);
  // Column strips outer: one strip of m (inner x kCols floats, 16 KB for 128 keys) stays in L1 while
  // every row block reads it (rows outer streamed all of m from L2 once per row block: at head dim
  // 512 the loads stalled the multiply-adds).
  const int64_t blocks = (outer + kRows - 1) / kRows;
  for (int64_t d0 = 0; d0 < ld; d0 += kCols) {
    const float* strip = m + d0 * m_height;
    for (int64_t o0 = 0; o0 < outer; o0 += kRows) {
      if (next_m != nullptr) {  // the next strip, or after the last, the next tile's first
        const float* next = d0 + kCols < ld ? strip + kCols * m_height : next_m;
        prefetch_part(next, inner * kCols * sizeof(float), o0 / kRows, blocks);
      }
      const int64_t on = std::min<int64_t>(kRows, outer - o0);
      // This block's accumulator rows, read after the inner loop: fetched now, under its
      // multiply-adds. The one-head backward's dk and dv partials (all keys, 11 MB per thread at
      // the VQGAN block) come from L3 each time; 1.06x faster backward there on a Xeon.
      for (int64_t o = 0; o < on; ++o) {
        const float* dst = acc + (o0 + o) * ld + d0;
        __builtin_prefetch(dst, 1, 3);
        __builtin_prefetch(dst + kCols - 1, 1, 3);
      }
      vec8 c[kRows][2] = {};
#pragma GCC unroll 8  // (as rows_times_transposed's loop)
      for (int64_t i = 0; i < inner; ++i) {
        const vec8 lo = load8(strip + i * kCols), hi = load8(strip + i * kCols + kLanes);
        for (int o = 0; o < kRows; ++o) {
          // Weights past `outer` are stale but finite, and their rows are not stored.
          const float wv = w[(o0 + o) * w_outer + i * w_inner];
          c[o][0] += wv * lo;
          c[o][1] += wv * hi;
        }
      }
      if (on == kRows) {
        // (a whole block: unrolled, so the accumulators stay in registers)
        for (int o = 0; o < kRows; ++o) {
          float* dst = acc + (o0 + o) * ld + d0;
          store8(dst, load8(dst) + c[o][0]);
          store8(dst + kLanes, load8(dst + kLanes) + c[o][1]);
        }
      } else {
        for (int64_t o = 0; o < on; ++o) {
          float* dst = acc + (o0 + o) * ld + d0;
          store8(dst, load8(dst) + c[o][0]);
          store8(dst + kLanes, load8(dst + kLanes) + c[o][1]);
        }
      }
    }
  }
}

// At least n floats of this thread's buffer `pool`, kept from call to call: a fresh allocation per
// call (11 MB per thread for 2688 keys at head dim 512) paid its page faults and zeroing each time,
// 4-7 ms of a 12 ms call with one query tile. Stale contents are finite values of earlier calls;
// every product reads only the elements it writes for (padding and rows past the last key feed
// only outputs that are not stored).
float* thread_pool(Buffer& pool, int64_t n) {
  if (static_cast<int64_t>(pool.size()) < n) pool.resize(static_cast<size_t>(n));
  return pool.data();
}

thread_local Buffer tls_kt, tls_v, tls_k, tls_parts;

// After a call, this thread gives back buffers over 8 MB (a process that once ran a long sequence
// does not keep that memory, nor many threads a large head each); smaller ones stay for the next
// call (the VQGAN middle block's 2688 x 512 keys take 5.5 MB per buffer).
void trim_thread_pools() {
  constexpr size_t kKeepFloats = size_t{2} << 20;
  for (Buffer* pool : {&tls_kt, &tls_v, &tls_k, &tls_parts}) {
    if (pool->size() > kKeepFloats) Buffer().swap(*pool);
  }
}

// One key tile of HeadKeys for the backward: k and v transposed, k packed.
struct KeyTile {
  const float *kt, *vt, *kp;
};

// One head's keys and values in fp32, converted once per head rather than once per query tile
// (the conversion, a transposing scatter for k, cost as much as the products at small head dims):
// k transposed per key tile (strips, as load_rows_transposed writes them), v (or k) in the strips
// of load_rows_packed.
// Memory grows linearly with Lk, per thread, and stays with the thread (one HeadKeys per thread at
// a time: it uses the thread's buffers).
class HeadKeys {
 public:
  // In the constructing thread's buffers. A HeadKeys built before a parallel region can be filled
  // by the team together (load_tile) and shared: where there are fewer heads than threads, each
  // head is then converted once instead of once per thread.
  HeadKeys(int64_t lk, int64_t dim, bool with_k_rows)
      : lk_(lk), dim_(dim), ld_(padded(dim)), tiles_((lk + kBlockN - 1) / kBlockN),
        kt_(thread_pool(tls_kt, tiles_ * dim * kBlockN)), v_(thread_pool(tls_v, tiles_ * kBlockN * ld_)),
        k_(with_k_rows ? thread_pool(tls_k, tiles_ * kBlockN * ld_) : nullptr) {}

  int64_t tiles() const { return tiles_; }

  // Converts key tile `tile` of head (b, h).
  template <typename T>
  void load_tile(const TensorRef4& k, const TensorRef4& v, int64_t b, int64_t h, int64_t tile, bool v_transposed) {
    const int64_t key0 = tile * kBlockN, keys = std::min(kBlockN, lk_ - key0);
    load_rows_transposed<T>(k, b, h, key0, keys, dim_, kt_ + key0 * dim_);
    if (v_transposed) {
      load_rows_transposed<T>(v, b, h, key0, keys, dim_, v_ + key0 * ld_);
    } else {
      load_rows_packed<T>(v, b, h, key0, keys, dim_, v_ + key0 * ld_, kBlockN);
    }
    if (k_ != nullptr) load_rows_packed<T>(k, b, h, key0, keys, dim_, k_ + key0 * ld_, kBlockN);
  }

  // Converts head (b, h) unless it is the one held; `id` names it (b * heads + h).
  template <typename T>
  void load(const TensorRef4& k, const TensorRef4& v, int64_t b, int64_t h, int64_t id, bool v_transposed = false) {
    if (id == held_) return;
    for (int64_t tile = 0; tile < tiles_; ++tile) load_tile<T>(k, v, b, h, tile, v_transposed);
    held_ = id;
  }
  // The key tile read after the one at key0: the next, or after the last the first (a query tile's
  // pass over the keys is followed by the next query tile's).
  int64_t next_tile(int64_t key0) const { return key0 + kBlockN < lk_ ? key0 + kBlockN : 0; }
  const float* kt(int64_t key0) const { return kt_ + key0 * dim_; }
  const float* v(int64_t key0) const { return v_ + key0 * ld_; }  // v packed, or v^T, per tile
  const float* k(int64_t key0) const { return k_ + key0 * ld_; }  // k packed per tile
  KeyTile tile(int64_t key0) const { return {kt(key0), v(key0), k(key0)}; }

 private:
  int64_t lk_, dim_, ld_, tiles_, held_ = -1;
  float *kt_, *v_, *k_;
};

// A thread's buffers for the forward's query tiles. The softmax's running sums are kept per lane
// (kLanes partial sums per row, added up once after the last key tile): a per-tile sum of each row
// ended in a serial chain of kLanes scalar adds, which GCC emits for the simd reduction.
struct ForwardScratch {
  ForwardScratch(int64_t dim, int64_t rows)
      : ld(padded(dim)), qb(rows * ld), q_panels(rows * dim), acc(rows * ld), sc(score_tile(rows)), m(rows),
        alpha(rows), l(rows * kLanes) {}
  int64_t ld;
  Buffer qb, q_panels, acc, sc, m, alpha, l;
};

// Rows row0.. of head bh's output and log-sum-exp: online softmax over the key tiles of `head`,
// in log2 units (q is scaled by scale * log2(e) as it is loaded, so a score needs no multiply
// and its exponential is a 2^x, which needs no range reduction by ln2).
template <typename T>
void forward_query_tile(const TensorRef4& q, const TensorRef4& out, float* lse, const AttentionShape& s,
                        int64_t bh, int64_t row0, int64_t rows, const HeadKeys& head, ForwardScratch& w) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
  const int64_t dim = s.dim, ld = w.ld, b = bh / s.heads, h = bh % s.heads;
  if (rows <= 0) return;
  float* qb = w.qb.data();
  load_rows<T>(q, b, h, row0, rows, dim, qb);
  const float q_scale = s.scale * kLog2e;
#pragma omp simd
  for (int64_t i = 0; i < rows * ld; ++i) qb[i] *= q_scale;
  pack_panels(qb, rows, dim, w.q_panels.data());
  std::fill_n(w.acc.begin(), rows * ld, 0.0f);
  std::fill_n(w.m.begin(), rows, -std::numeric_limits<float>::infinity());
  std::fill_n(w.l.begin(), rows * kLanes, 0.0f);
  float* m = w.m.data();
  float* alpha = w.alpha.data();
  for (int64_t key0 = 0; key0 < s.lk; key0 += kBlockN) {
    const int64_t keys = std::min(kBlockN, s.lk - key0);
    const int64_t next0 = head.next_tile(key0);
    rows_times_transposed(w.q_panels.data(), head.kt(key0), w.sc.data(), rows, keys, dim, head.kt(next0));
    // New row maxima, then every row's rescale factor in one vector loop (a scalar 2^x per row
    // was a latency chain per row).
    for (int64_t r = 0; r < rows; ++r) {
      const float* srow = w.sc.data() + r * kBlockN;
      float tile_max = -std::numeric_limits<float>::infinity();
      // reduction(max) lets the compiler vectorize it (a plain float max loop stays scalar
      // without -ffast-math); GCC 12 vectorizes the conditional, not std::max of a bare load.
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < keys; ++j) tile_max = srow[j] > tile_max ? srow[j] : tile_max;
      alpha[r] = tile_max;
    }
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) {
      const float m_new = std::max(m[r], alpha[r]);
      alpha[r] = exp2_approx(m[r] - m_new);  // 2^-inf -> ~0 on the first tile
      m[r] = m_new;
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = w.sc.data() + r * kBlockN;
      float* lrow = w.l.data() + r * kLanes;
      const float a = alpha[r], mr = m[r];
#pragma omp simd
      for (int t = 0; t < kLanes; ++t) lrow[t] *= a;
      // Whole vectors: columns past `keys` (stale) count as 0 in the sums and are never read.
      for (int64_t j0 = 0; j0 < keys; j0 += kLanes) {
#pragma omp simd
        for (int t = 0; t < kLanes; ++t) {
          const float p = j0 + t < keys ? exp2_approx(srow[j0 + t] - mr) : 0.0f;
          srow[j0 + t] = p;
          lrow[t] += p;
        }
      }
      float* arow = w.acc.data() + r * ld;
#pragma omp simd
      for (int64_t d = 0; d < ld; ++d) arow[d] *= a;
    }
    accumulate(w.sc.data(), kBlockN, 1, head.v(key0), kBlockN, w.acc.data(), rows, keys, dim, head.v(next0));
  }
  float* inv_l = alpha;
  for (int64_t r = 0; r < rows; ++r) {
    float l = 0.0f;
    for (int t = 0; t < kLanes; ++t) l += w.l[r * kLanes + t];
    lse[bh * s.lq + row0 + r] = m[r] * kLn2 + std::log(l);
    inv_l[r] = 1.0f / l;
  }
  store_rows<T>(out, b, h, row0, rows, dim, w.acc.data(), inv_l, 1.0f);
}

template <typename T>
void forward_typed(const TensorRef4& q, const TensorRef4& k, const TensorRef4& v, const TensorRef4& out, float* lse,
                   const AttentionShape& s, int num_threads) {
  const int64_t bhs = s.batch * s.heads, q_blocks = (s.lq + kBlockM - 1) / kBlockM;
  const int64_t items = bhs * q_blocks;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
  if (bhs >= threads) {
    // Many heads: each thread converts the heads of its own query tiles (consecutive tiles share one).
#pragma omp parallel num_threads(threads)
    {
      ForwardScratch w(s.dim, tile_rows(s.lq));
      HeadKeys head(s.lk, s.dim, false);
#pragma omp for schedule(static)
      for (int64_t item = 0; item < items; ++item) {
        const int64_t bh = item / q_blocks;
        head.load<T>(k, v, bh / s.heads, bh % s.heads, bh);
        const int64_t row0 = (item % q_blocks) * kBlockM;
        forward_query_tile<T>(q, out, lse, s, bh, row0, std::min(kBlockM, s.lq - row0), head, w);
      }
      trim_thread_pools();  // (after the loop's barrier: no thread reads another's buffers anyway)
    }
    return;
  }
  // Fewer heads than threads (the VQGAN's one-head middle block): one head at a time, its keys
  // converted by the team together, its query tiles split among the threads.
  HeadKeys head(s.lk, s.dim, false);  // the calling thread's buffers, shared by the team
  const QueryTiles tiles(s.lq, threads);
#pragma omp parallel num_threads(threads)
  {
    ForwardScratch w(s.dim, tile_rows(s.lq));
    for (int64_t bh = 0; bh < bhs; ++bh) {
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < head.tiles(); ++tile) head.load_tile<T>(k, v, bh / s.heads, bh % s.heads, tile, false);
      // (barrier: the keys are complete)
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles.count; ++t) forward_query_tile<T>(q, out, lse, s, bh, tiles.row0(t), tiles.rows(t), head, w);
      // (barrier: nobody reads this head's keys once the next head's conversion starts)
    }
  }
  trim_thread_pools();
}

// One (query tile, key tile) pair of the backward: p = exp(scale q.k - lse), ds = p * (do.v - delta),
// then dv += p^T do, dk += ds^T q (key rows of dk_acc, dv_acc) and dq += ds k (query rows of dq_acc).
// qb, dob: the query tile's q and do in panels (pack_panels), qp, dop: the same in strips (height
// rows high); key: the key tile (k and v transposed, k packed). next: where given, the key tile of
// the next pair, fetched into L2 under this pair's products.
void tile_pair_backward(const float* qb, const float* dob, const float* qp, const float* dop, int64_t height,
                        const KeyTile& key, const float* lse, const float* delta, float* p, float* ds, float* dk_acc,
                        float* dv_acc, float* dq_acc, int64_t rows, int64_t keys, int64_t dim, float scale,
                        const KeyTile* next = nullptr) {
  rows_times_transposed(qb, key.kt, p, rows, keys, dim, next ? next->kt : nullptr);
  rows_times_transposed(dob, key.vt, ds, rows, keys, dim, next ? next->vt : nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    float* prow = p + r * kBlockN;
    float* dsrow = ds + r * kBlockN;
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) {
      prow[j] = exp_approx(std::min(prow[j] * scale - lse[r], 0.0f));
      dsrow[j] = prow[j] * (dsrow[j] - delta[r]);
    }
  }
  accumulate(p, 1, kBlockN, dop, height, dv_acc, keys, rows, dim);  // dv += p^T do
  accumulate(ds, 1, kBlockN, qp, height, dk_acc, keys, rows, dim);  // dk += ds^T q
  accumulate(ds, kBlockN, 1, key.kp, kBlockN, dq_acc, rows, keys, dim, next ? next->kp : nullptr);  // dq += ds k
}

template <typename T>
void backward_typed(const TensorRef4& q, const TensorRef4& k, const TensorRef4& v, const TensorRef4& out,
                    const TensorRef4& dout, const float* lse, const TensorRef4& dq, const TensorRef4& dk,
                    const TensorRef4& dv, const AttentionShape& s, int num_threads) {
  const int64_t dim = s.dim, bhs = s.batch * s.heads;
  const int64_t q_blocks = (s.lq + kBlockM - 1) / kBlockM, k_blocks = (s.lk + kBlockN - 1) / kBlockN;
  // delta = rowsum(dout * out): the softmax's backward correction, once per query row.
  Buffer delta(bhs * s.lq);
  const int threads = std::max(1, num_threads);
  // Fewer heads than threads: each thread's partial dk and dv over the whole key range.
  const int parts_threads = bhs < threads ? threads : 0;
  const int64_t part_len = k_blocks * kBlockN * padded(dim);  // floats of one partial (dk or dv)
  // The calling thread's buffers (see thread_pool): the partials, and the keys the team shares.
  float* dkdv_parts = parts_threads ? thread_pool(tls_parts, parts_threads * 2 * part_len) : nullptr;
  std::optional<HeadKeys> shared_head;
  if (parts_threads) shared_head.emplace(s.lk, dim, true);
  const QueryTiles tiles(s.lq, threads);
#pragma omp parallel num_threads(threads)
  {
    const int64_t ld = padded(dim);
    const int64_t tm = tile_rows(s.lq);  // rows of the query-tile buffers, and their strips' height
    Buffer ob(tm * ld), dob(tm * ld), qb(tm * ld), dop(tm * ld), qp(tm * ld), q_panels(tm * dim),
        do_panels(tm * dim);
    Buffer p(score_tile(tm)), ds(score_tile(tm));
    Buffer acc_a(std::max(tm, kBlockN) * ld), acc_b(kBlockN * ld);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < bhs * q_blocks; ++item) {
      const int64_t bh = item / q_blocks, row0 = (item % q_blocks) * kBlockM, rows = std::min(kBlockM, s.lq - row0);
      load_rows<T>(out, bh / s.heads, bh % s.heads, row0, rows, dim, ob.data());
      load_rows<T>(dout, bh / s.heads, bh % s.heads, row0, rows, dim, dob.data());
      for (int64_t r = 0; r < rows; ++r) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < dim; ++d) sum += ob[r * ld + d] * dob[r * ld + d];
        delta[bh * s.lq + row0 + r] = sum;
      }
    }
    if (parts_threads == 0) {
      // Whole heads per thread: dq accumulates over the key tiles in thread memory (Lq rows), so one
      // pass over (query tile, key tile) pairs makes dk, dv and dq from one p and ds: five tile
      // products per pair, where separate dk/dv and dq passes would take seven.
      const int64_t rows_alloc = q_blocks * tm;
      Buffer q_head(rows_alloc * ld), do_head(rows_alloc * ld), dq_head(rows_alloc * ld),
          q_packed(rows_alloc * ld), do_packed(rows_alloc * ld), q_panels(rows_alloc * dim),
          do_panels(rows_alloc * dim);
      HeadKeys head(s.lk, dim, true);
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < bhs; ++bh) {
        const int64_t b = bh / s.heads, h = bh % s.heads;
        head.load<T>(k, v, b, h, bh, /*v_transposed=*/true);
        load_rows<T>(q, b, h, 0, s.lq, dim, q_head.data());
        load_rows<T>(dout, b, h, 0, s.lq, dim, do_head.data());
        for (int64_t row0 = 0; row0 < s.lq; row0 += kBlockM) {  // packed per query tile
          const int64_t rows = std::min(kBlockM, s.lq - row0);
          pack_strips(q_head.data() + row0 * ld, rows, dim, q_packed.data() + row0 * ld, tm);
          pack_strips(do_head.data() + row0 * ld, rows, dim, do_packed.data() + row0 * ld, tm);
          pack_panels(q_head.data() + row0 * ld, rows, dim, q_panels.data() + row0 * dim);
          pack_panels(do_head.data() + row0 * ld, rows, dim, do_panels.data() + row0 * dim);
        }
        std::fill(dq_head.begin(), dq_head.end(), 0.0f);
        for (int64_t key0 = 0; key0 < s.lk; key0 += kBlockN) {
          const int64_t keys = std::min(kBlockN, s.lk - key0);
          std::fill(acc_a.begin(), acc_a.end(), 0.0f);  // dk
          std::fill(acc_b.begin(), acc_b.end(), 0.0f);  // dv
          for (int64_t row0 = 0; row0 < s.lq; row0 += kBlockM) {
            const int64_t rows = std::min(kBlockM, s.lq - row0);
            tile_pair_backward(q_panels.data() + row0 * dim, do_panels.data() + row0 * dim, q_packed.data() + row0 * ld,
                               do_packed.data() + row0 * ld, tm, head.tile(key0), lse + bh * s.lq + row0, delta.data() + bh * s.lq + row0, p.data(), ds.data(),
                               acc_a.data(), acc_b.data(), dq_head.data() + row0 * ld, rows, keys, dim, s.scale);
          }
          store_rows<T>(dk, b, h, key0, keys, dim, acc_a.data(), nullptr, s.scale);
          store_rows<T>(dv, b, h, key0, keys, dim, acc_b.data(), nullptr, 1.0f);
        }
        store_rows<T>(dq, b, h, 0, s.lq, dim, dq_head.data(), nullptr, s.scale);
      }
      trim_thread_pools();  // (this thread's head buffers)
    } else {
      // Fewer heads than threads (the VQGAN's one-head middle block): one head at a time, its query
      // tiles split among the threads. A thread's dq rows are its own; dk and dv go to its partial
      // sums over all keys (thread memory, Lk rows each), added up once the head is done. One pass:
      // five tile products per tile pair.
      float* dk_part = dkdv_parts + omp_get_thread_num() * 2 * part_len;
      float* dv_part = dk_part + part_len;
      HeadKeys& head = *shared_head;
      for (int64_t bh = 0; bh < bhs; ++bh) {
        const int64_t b = bh / s.heads, h = bh % s.heads;
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < head.tiles(); ++tile) head.load_tile<T>(k, v, b, h, tile, /*v_transposed=*/true);
        // (barrier: the keys are complete)
        std::fill(dk_part, dk_part + 2 * part_len, 0.0f);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles.count; ++t) {
          const int64_t row0 = tiles.row0(t), rows = tiles.rows(t);
          if (rows == 0) continue;
          load_rows<T>(q, b, h, row0, rows, dim, qb.data());
          load_rows<T>(dout, b, h, row0, rows, dim, dob.data());
          pack_strips(qb.data(), rows, dim, qp.data(), tm);
          pack_strips(dob.data(), rows, dim, dop.data(), tm);
          pack_panels(qb.data(), rows, dim, q_panels.data());
          pack_panels(dob.data(), rows, dim, do_panels.data());
          std::fill(acc_a.begin(), acc_a.end(), 0.0f);  // dq
          for (int64_t key0 = 0; key0 < s.lk; key0 += kBlockN) {
            const int64_t keys = std::min(kBlockN, s.lk - key0);
            // The keys come from L3 here, once per query tile (a head's keys outgrow L2): the next
            // tile's are fetched under this pair's products (1.07x faster backward at the VQGAN
            // block on a Xeon). The whole-head path above reuses each key tile from L2.
            const KeyTile next = head.tile(head.next_tile(key0));
            tile_pair_backward(q_panels.data(), do_panels.data(), qp.data(), dop.data(), tm, head.tile(key0),
                               lse + bh * s.lq + row0, delta.data() + bh * s.lq + row0, p.data(), ds.data(),
                               dk_part + key0 * ld, dv_part + key0 * ld, acc_a.data(), rows, keys, dim, s.scale, &next);
          }
          store_rows<T>(dq, b, h, row0, rows, dim, acc_a.data(), nullptr, s.scale);
        }
        // (the barrier above: every partial is complete) dk, dv = the sums of the threads' partials.
#pragma omp for schedule(static)
        for (int64_t key0 = 0; key0 < s.lk; key0 += kBlockN) {
          const int64_t keys = std::min(kBlockN, s.lk - key0);
          std::fill(acc_a.begin(), acc_a.end(), 0.0f);
          std::fill(acc_b.begin(), acc_b.end(), 0.0f);
          for (int t = 0; t < parts_threads; ++t) {
            const float* src = dkdv_parts + t * 2 * part_len + key0 * ld;
            const float* src_v = src + part_len;
#pragma omp simd
            for (int64_t i = 0; i < keys * ld; ++i) {
              acc_a[i] += src[i];
              acc_b[i] += src_v[i];
            }
          }
          store_rows<T>(dk, b, h, key0, keys, dim, acc_a.data(), nullptr, s.scale);
          store_rows<T>(dv, b, h, key0, keys, dim, acc_b.data(), nullptr, 1.0f);
        }
        // (the barrier above: no thread refills its partials, or the shared keys, while another
        // still reads them)
      }
    }
  }
  trim_thread_pools();  // the shared keys and the partials are this (calling) thread's
}

}  // namespace

void attention_forward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                       const TensorRef4& out, float* lse, const AttentionShape& shape, int num_threads) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(q, k, v, out, lse, shape, num_threads);
    case DType::Float16: return forward_typed<half_t>(q, k, v, out, lse, shape, num_threads);
    case DType::BFloat16: return forward_typed<bfloat16_t>(q, k, v, out, lse, shape, num_threads);
  }
}

void attention_backward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                        const TensorRef4& out, const TensorRef4& dout, const float* lse, const TensorRef4& dq,
                        const TensorRef4& dk, const TensorRef4& dv, const AttentionShape& shape, int num_threads) {
  switch (dtype) {
    case DType::Float32: return backward_typed<float>(q, k, v, out, dout, lse, dq, dk, dv, shape, num_threads);
    case DType::Float16: return backward_typed<half_t>(q, k, v, out, dout, lse, dq, dk, dv, shape, num_threads);
    case DType::BFloat16: return backward_typed<bfloat16_t>(q, k, v, out, dout, lse, dq, dk, dv, shape, num_threads);
  }
}

}  // namespace ldmfast::cpu::LDMFAST_ISA
