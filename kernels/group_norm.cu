// Fused GroupNorm (+ SiLU), forward and backward, contiguous (N, C, S) and channels-last (N, S, C).
// The algorithm mirrors the CPU kernels (csrc/cpu/group_norm.cpp); formulas in
// ldmfast/ops/group_norm.py.
//
// Forward, contiguous, group fits in shared memory: one block per (sample, group) reads the group
// once with 16-byte vectors into shared memory, computes the exact two-pass mean and variance
// there, and writes the activated output: one read and one write of global memory.
// Otherwise (large groups, channels-last): partial shifted sums per block (per (sample, group,
// part) for contiguous, per (sample, row chunk, channel) for channels-last), a combine kernel per
// (sample, group) in double that also writes each channel's scale and shift, and an elementwise
// pass (channel_map_kernel) that reads them.
// Backward: per-(sample, part, channel) partial sums of g and g * xhat (a warp each when
// contiguous, a block per (sample, row chunk) when channels-last), a combine kernel per
// (sample, group) that also writes each channel's dx coefficients, a per-channel reduction over
// samples for dweight and dbias (fixed order: deterministic), and the elementwise dx pass; or,
// contiguous with x and dy of a group in shared memory and Tuning::fused_backward on, one block
// per (sample, group) for all but the reduction over samples (bwd_fused_kernel).
// Every pass over x or dy has each thread load kItems vectors before it uses them.
#include <algorithm>
#include <initializer_list>

#include "cuda_common.cuh"
#include "group_norm.cuh"

namespace ldmfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kFusedThreads = 512;      // the fused forward's block, at most (launch bounds)
constexpr int kWarps = kThreads / 32;    // warps per block of the contiguous backward's partial sums
// Vectors a thread loads before it uses any (every pass over x or dy): with one load at a time per
// thread, the profiled kernels read at a quarter to a half of the device's bandwidth.
constexpr int kItems = 4;

// Launch settings; the defaults, or what group_norm_set_tuning set (bench/sweep_group_norm_cuda.py
// times alternatives in one process; 0 in a field restores its default).
struct Tuning {
  int fused_threads = kFusedThreads;  // threads of the fused forward (a multiple of 32, at most 512)
  int64_t target_blocks = 1024;   // partial-sum blocks (warps / 8 in the contiguous backward) to aim for
  int64_t min_per_block = 4096;   // elements per partial-sum block, at least
  int64_t min_rows = 32;          // channels-last rows per partial-sum block, at least
  int64_t min_per_warp = 1024;    // elements per partial-sum warp (contiguous backward), at least
  bool fused = true;              // the fused forward where the group fits in shared memory
  // Channels-last partial-sum blocks to aim for: 512 measured 2-13 % faster than 1024 on an H100
  // (bench/sweep_group_norm_cuda.py), the contiguous partial sums no faster.
  int64_t target_blocks_cl = 512;
  // The fused forward wherever the group fits in shared memory: since its loads went four in
  // flight it beat the three-pass path on an H100 for every 16-bit shape it took (1.27-1.87x
  // forward) and tied or won for float32 (sweep, 2026-11-26, second run). These two remain for
  // sweeps: at least this many groups in all, and 16-bit input at all.
  int64_t fused_min_groups = 1;
  bool fused_16bit = true;
  // Vectors per thread of the elementwise passes on 16-bit input (2 or 4). Four took 128-153
  // registers in the backward (one or two blocks per SM), two take 80-108: on an H100 two were
  // never slower and 5 % faster in geometric mean, up to 23 % (sweep, 2026-11-26, third run).
  int map_items_16bit = 2;
  // Channels-last partial sums in whole waves of resident blocks (fit_waves below).
  bool fit_waves = true;
  // The fused backward (bwd_fused_kernel) wherever x and dy of a group fit in shared memory. Off
  // until a GPU has run it: written on a machine without one (2026-11-27), compiled for sm_90 there;
  // `pytest -m cuda` tests it with this on, and bench/sweep_group_norm_cuda.py times it against
  // the partial-sums path ({"fused_backward": True}).
  bool fused_backward = false;
  // Bytes of input (x; x and dy in the backward) per launch of the partial-sums path, in whole
  // samples (at least one); 0: all samples in one launch. See chunk_plan. Off until a GPU has run
  // it, as fused_backward.
  int64_t l2_chunk_bytes = 0;
};

Tuning& tuning() {
  static Tuning t;
  return t;
}

// ---- plan (shared by the workspace query and the launches) ---------------------------------------

struct Plan {
  int64_t n, c, s, groups, cg, m;
  bool cl;
  int vec;        // elements per 16-byte vector
  int64_t parts;  // partial-sum blocks per (sample, group) [contiguous forward], per (sample, channel)
                  // [contiguous backward] or per sample [channels-last]
  int64_t len;    // elements (contiguous) or rows (channels-last) per partial-sum block
  int64_t k;      // partial-sum entries per (sample, part): G (contiguous forward) or C
  int align;      // elements a contiguous part is rounded to: a 16-byte vector of the dtype
  int64_t chunk;  // samples per launch of the partial-sums path (chunk_plan)
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int elem_size(DType d) { return d == DType::Float32 ? 4 : 2; }

// The partial sums' split of each sample (parts, len, k) for p.n samples.
void set_parts(Plan& p, bool backward) {
  const int64_t n = p.n, c = p.c, s = p.s, groups = p.groups;
  if (p.cl) {
    p.parts = std::clamp<int64_t>(ceil_div(tuning().target_blocks_cl, n), 1,
                                  std::max<int64_t>(1, s / tuning().min_rows));
    p.len = ceil_div(s, p.parts);
    p.parts = ceil_div(s, p.len);
    p.k = c;
  } else if (backward) {
    // One warp per (sample, channel, part): a channel's run is often short (168 elements at the
    // UNet's 12x14 level), too short to keep a block of 256 threads busy.
    p.parts = std::clamp<int64_t>(ceil_div(tuning().target_blocks * kWarps, n * c), 1,
                                  std::max<int64_t>(1, s / tuning().min_per_warp));
    p.len = ceil_div(ceil_div(s, p.parts), p.align) * p.align;
    p.parts = ceil_div(s, p.len);
    p.k = c;
  } else {
    p.parts = std::clamp<int64_t>(ceil_div(tuning().target_blocks, n * groups), 1,
                                  std::max<int64_t>(1, p.m / tuning().min_per_block));
    p.len = ceil_div(ceil_div(p.m, p.parts), p.align) * p.align;
    p.parts = ceil_div(p.m, p.len);
    p.k = groups;
  }
}

Plan make_plan(DType dtype, int64_t n, int64_t c, int64_t s, int64_t groups, bool cl, bool backward) {
  const int vec = 16 / elem_size(dtype);
  Plan p{n, c, s, groups, c / groups, (c / groups) * s, cl, vec, 1, 1, 1, vec, n};
  set_parts(p, backward);
  const int64_t budget = tuning().l2_chunk_bytes;
  const int64_t sample_bytes = c * s * elem_size(dtype) * (backward ? 2 : 1);
  if (budget > 0) p.chunk = std::clamp<int64_t>(budget / std::max<int64_t>(sample_bytes, 1), 1, n);
  return p;
}

// The plan of the partial-sums path's launch for samples [n0, n0 + p.chunk) (fewer at the end).
// It reads its inputs twice, for the partial sums and in the elementwise pass; launched per chunk
// of samples whose inputs fit in the L2 cache (Tuning::l2_chunk_bytes), the second read can come
// from there: device memory passes 3 -> 2 in the forward, 5 -> 3 in the backward, for a launch
// sequence per chunk. A chunk's parts are planned for its own sample count.
Plan chunk_plan(const Plan& p, int64_t n0, bool backward) {
  if (p.chunk >= p.n) return p;
  Plan q = p;
  q.n = std::min(p.chunk, p.n - n0);
  set_parts(q, backward);
  return q;
}

// Floats of each of part_a and part_b: enough for every chunk's plan (a whole one and the last).
int64_t part_floats(const Plan& p, bool backward) {
  int64_t most = 0;
  for (int64_t n0 : {int64_t{0}, (ceil_div(p.n, p.chunk) - 1) * p.chunk}) {
    const Plan q = chunk_plan(p, n0, backward);
    most = std::max(most, q.n * q.parts * q.k);
  }
  return most;
}

// Workspace layout (in floats): the doubles first (8-byte aligned), then the coefficient table
// (16-byte aligned: 4NC floats after a base that torch's allocator aligns to 512 bytes; rows of
// channels-last coefficients are read as float4), then the partial sums, the affine tail last.
struct Workspace {
  double* sum_g;   // [n][c] (backward)
  double* sum_gx;  // [n][c] (backward)
  float* part_a;   // [n][parts][k]
  float* part_b;   // [n][parts][k]
  float* table;    // [fields][n][c]: the elementwise pass's coefficients (see channel_map_kernel)
};

// Fields of the coefficient table: scale, shift (forward); and mean, coef_b, coef_d (backward).
int64_t table_fields(bool backward) { return backward ? 5 : 2; }

size_t workspace_floats(const Plan& p, bool backward) {
  size_t f = 2 * static_cast<size_t>(part_floats(p, backward)) +
             static_cast<size_t>(table_fields(backward) * p.n * p.c);
  if (backward) f += 4 * static_cast<size_t>(p.n * p.c);  // the doubles sum_g, sum_gx
  return f + 2 * static_cast<size_t>(p.c);  // + the affine parameters in float32 (affine_f32)
}

// Where affine_f32 puts the converted weight and bias: the workspace's last 2C floats.
float* affine_tail(float* base, const Plan& p, bool backward) {
  return base + workspace_floats(p, backward) - 2 * p.c;
}

Workspace carve(float* base, const Plan& p, bool backward) {
  Workspace w{};
  if (backward) {
    w.sum_g = reinterpret_cast<double*>(base);
    w.sum_gx = w.sum_g + p.n * p.c;
    base += 4 * p.n * p.c;
  }
  w.table = base;
  w.part_a = w.table + table_fields(backward) * p.n * p.c;
  w.part_b = w.part_a + part_floats(p, backward);
  return w;
}

// ---- device helpers ------------------------------------------------------------------------------

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <bool kSilu>
__device__ __forceinline__ float act(float z) {
  if constexpr (kSilu) return z / (1.0f + expf(-z));
  return z;
}

template <bool kSilu>
__device__ __forceinline__ float act_grad(float z) {
  if constexpr (kSilu) {
    const float sg = 1.0f / (1.0f + expf(-z));
    return sg * (1.0f + z * (1.0f - sg));
  }
  return 1.0f;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` holds 32 values; the function synchronizes before returning so it can be reused.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  v = scratch[0];
  __syncthreads();
  return v;
}

// Sums of a and b over the warp, in double; every lane gets them.
__device__ __forceinline__ void warp_sum2(double& a, double& b) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
}

// Element i of a run through T pointers, with V elements per vector load.
template <typename T, int V>
struct Loader {
  static __device__ __forceinline__ void load(const T* p, int64_t vi, float* out) {
    if constexpr (V == 1) {
      out[0] = to_float(p[vi]);
    } else {
      const Vec16<T> v = reinterpret_cast<const Vec16<T>*>(p)[vi];
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = to_float(v.v[k]);
    }
  }
  static __device__ __forceinline__ void store(T* p, int64_t vi, const float* in) {
    if constexpr (V == 1) {
      p[vi] = from_float<T>(in[0]);
    } else {
      Vec16<T> v;
#pragma unroll
      for (int k = 0; k < V; ++k) v.v[k] = from_float<T>(in[k]);
      reinterpret_cast<Vec16<T>*>(p)[vi] = v;
    }
  }
};

// Vector vi of p, or fill(k) for element k where it lies past the end of the run (chosen so that
// a partial sum adds nothing).
template <typename T, int V, class Fill>
__device__ __forceinline__ void load_or_fill(const T* p, int64_t vi, bool in, Fill fill, float (&out)[V]) {
  if (in) {
    Loader<T, V>::load(p, vi, out);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = fill(k);
  }
}

// Vector vi of x and of dy, or zeros past the end of the run (defined values; the backward's
// partial sums stop at the end and never add them).
template <typename T, int V>
__device__ __forceinline__ void load_pair_or_zero(const T* x, const T* dy, int64_t vi, bool in, float (&xb)[V],
                                                  float (&db)[V]) {
  if (in) {
    Loader<T, V>::load(x, vi, xb);
    Loader<T, V>::load(dy, vi, db);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) xb[k] = db[k] = 0.0f;
  }
}

// V elements moved as one load or store (16 bytes when V > 1), not converted.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ---- forward: fused, the group in shared memory (contiguous) ---------------------------------------

template <typename T, bool kSilu, int V>
__global__ void __launch_bounds__(kFusedThreads) fwd_fused_kernel(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias, T* __restrict__ y,
    float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t m, int64_t s, int64_t cg, int64_t groups,
    float eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double scratch[32];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int64_t ng = blockIdx.x;
  const int64_t g = ng % groups;
  const T* xg = x + ng * m;
  T* yg = y + ng * m;
  const int64_t nv = m / V;
  float buf[V];
  float acc = 0.0f;
  for (int64_t i0 = threadIdx.x; i0 < nv; i0 += kItems * blockDim.x) {
    Pack<T, V> raw[kItems];  // kItems loads in flight, then copied to shared memory and summed
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const int64_t i = i0 + u * blockDim.x;
      if (i < nv) raw[u] = reinterpret_cast<const Pack<T, V>*>(xg)[i];
    }
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const int64_t i = i0 + u * blockDim.x;
      if (i < nv) {
        reinterpret_cast<Pack<T, V>*>(xs)[i] = raw[u];
#pragma unroll
        for (int k = 0; k < V; ++k) acc += to_float(raw[u].v[k]);
      }
    }
  }
  const double mean_d = block_sum<double>(acc, scratch) / static_cast<double>(m);
  const float mean = static_cast<float>(mean_d);
  float acc2 = 0.0f;
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    Loader<T, V>::load(xs, i, buf);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = buf[k] - mean;
      acc2 += d * d;
    }
  }
  const double var = block_sum<double>(acc2, scratch) / static_cast<double>(m);
  const float rstd = static_cast<float>(rsqrt(var + static_cast<double>(eps)));
  if (threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    Loader<T, V>::load(xs, i, buf);
    // The vector's channel, and the next one's where it crosses into it (S % V need not be 0 here;
    // the group fits in shared memory, so its offsets fit in 32 bits): one division per vector.
    const int e = static_cast<int>(i * V), run = static_cast<int>(s);
    int ch = e / run, within = e - ch * run;
    float sc = rstd * weight[g * cg + ch];
    float sh = bias[g * cg + ch] - mean * sc;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (within == run) {
        ++ch;
        within = 0;
        sc = rstd * weight[g * cg + ch];
        sh = bias[g * cg + ch] - mean * sc;
      }
      buf[k] = act<kSilu>(buf[k] * sc + sh);
      ++within;
    }
    Loader<T, V>::store(yg, i, buf);
  }
}

// ---- forward: partial sums -----------------------------------------------------------------------

// Contiguous: block (sample, group, part) sums x - K over its part of the group's run.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) fwd_partial_contig_kernel(const T* __restrict__ x, float* part_a,
                                                                      float* part_b, Plan p) {
  __shared__ double scratch[32];
  const int64_t ng = blockIdx.x / p.parts, q = blockIdx.x % p.parts;
  const int64_t n = ng / p.groups, g = ng % p.groups;
  const T* xg = x + ng * p.m;
  const float k0 = to_float(xg[0]);
  const int64_t begin = q * p.len, end = min64(p.m, begin + p.len);  // multiples of V (but end = m)
  float a1 = 0.0f, a2 = 0.0f;
  const auto fill = [k0](int) { return k0; };  // x - K = 0
  for (int64_t vi0 = begin / V + threadIdx.x; vi0 < end / V; vi0 += kItems * blockDim.x) {
    float buf[kItems][V];
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const int64_t vi = vi0 + u * blockDim.x;
      load_or_fill<T, V>(xg, vi, vi < end / V, fill, buf[u]);
    }
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = buf[u][k] - k0;
        a1 += d;
        a2 += d * d;
      }
    }
  }
  const double s1 = block_sum<double>(a1, scratch);
  const double s2 = block_sum<double>(a2, scratch);
  if (threadIdx.x == 0) {
    const int64_t idx = (n * p.parts + q) * p.groups + g;
    part_a[idx] = static_cast<float>(s1);
    part_b[idx] = static_cast<float>(s2);
  }
}

// Channels-last: block (sample, row chunk); thread (tx, ty) sums vector column tx over rows ty,
// ty + TY, ...; the TY partial sums of a column are then added in shared memory.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) fwd_partial_cl_kernel(const T* __restrict__ x, float* part_a,
                                                                  float* part_b, Plan p) {
  __shared__ float red[2][kThreads * V];
  const int64_t n = blockIdx.x / p.parts, q = blockIdx.x % p.parts;
  const int64_t r0 = q * p.len, r1 = min64(p.s, r0 + p.len);
  const T* xn = x + n * p.s * p.c;
  const int64_t cols = p.c / V;
  const int tx_count = static_cast<int>(min64(cols, kThreads));
  const int ty_count = kThreads / tx_count;
  const int tx = threadIdx.x % tx_count, ty = threadIdx.x / tx_count;
  float k0[V], a1[V], a2[V];
  for (int64_t col0 = 0; col0 < cols; col0 += tx_count) {
    const int64_t col = col0 + tx;
    const bool active = col < cols && ty < ty_count;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a1[k] = 0.0f;
      a2[k] = 0.0f;
      k0[k] = active ? to_float(xn[((col * V + k) / p.cg) * p.cg]) : 0.0f;
    }
    if (active) {
      for (int64_t r = r0 + ty; r < r1; r += kItems * ty_count) {
        float buf[kItems][V];
#pragma unroll
        for (int u = 0; u < kItems; ++u) {
          const int64_t row = r + u * ty_count;
          load_or_fill<T, V>(xn + row * p.c, col, row < r1, [&k0](int k) { return k0[k]; }, buf[u]);
        }
#pragma unroll
        for (int u = 0; u < kItems; ++u) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const float d = buf[u][k] - k0[k];
            a1[k] += d;
            a2[k] += d * d;
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      red[0][threadIdx.x * V + k] = a1[k];
      red[1][threadIdx.x * V + k] = a2[k];
    }
    __syncthreads();
    if (ty == 0 && col < cols) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float s1 = 0.0f, s2 = 0.0f;
        for (int t = 0; t < ty_count; ++t) {
          s1 += red[0][(t * tx_count + tx) * V + k];
          s2 += red[1][(t * tx_count + tx) * V + k];
        }
        const int64_t idx = (n * p.parts + q) * p.c + col * V + k;
        part_a[idx] = s1;
        part_b[idx] = s2;
      }
    }
    __syncthreads();
  }
}

// Channel c's scale and shift (x * scale + shift normalizes it) at entry i of the table's first two
// fields (nc entries each): both combine kernels write them.
__device__ __forceinline__ void write_scale_shift(float* table, int64_t nc, int64_t i, int64_t c,
                                                  const float* __restrict__ weight, const float* __restrict__ bias,
                                                  float mean, float rstd) {
  const float sc = rstd * weight[c];
  table[i] = sc;
  table[nc + i] = bias[c] - mean * sc;
}

// (sample, group): adds the partial sums of the group (over parts, and channels for
// channels-last) in double, writes mean and rstd, and the group's channels' scale and shift into
// the coefficient table.
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_combine_kernel(const T* __restrict__ x, const float* part_a,
                                                               const float* part_b, const float* __restrict__ weight,
                                                               const float* __restrict__ bias, float* mean_out,
                                                               float* rstd_out, float* table, Plan p, float eps) {
  __shared__ double scratch[32];
  const int64_t ng = blockIdx.x, n = ng / p.groups, g = ng % p.groups;
  const int64_t per_part = p.cl ? p.cg : 1;  // entries of this group per (sample, part)
  double s1 = 0.0, s2 = 0.0;
  for (int64_t t = threadIdx.x; t < p.parts * per_part; t += blockDim.x) {
    const int64_t q = t / per_part, j = t % per_part;
    const int64_t idx = (n * p.parts + q) * p.k + g * per_part + j;
    s1 += part_a[idx];
    s2 += part_b[idx];
  }
  s1 = block_sum<double>(s1, scratch);  // (every thread gets the totals)
  s2 = block_sum<double>(s2, scratch);
  const int64_t first = p.cl ? n * p.s * p.c + g * p.cg : ng * p.m;
  const double k0 = to_float(x[first]);
  const double md = s1 / static_cast<double>(p.m);
  const double var = fmax(s2 / static_cast<double>(p.m) - md * md, 0.0);
  const float mean = static_cast<float>(k0 + md);
  const float rstd = static_cast<float>(rsqrt(var + static_cast<double>(eps)));
  if (threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  const int64_t nc = p.n * p.c;
  for (int64_t j = threadIdx.x; j < p.cg; j += blockDim.x) {
    const int64_t c = g * p.cg + j;
    write_scale_shift(table, nc, n * p.c + c, c, weight, bias, mean, rstd);
  }
}

// ---- elementwise passes ----------------------------------------------------------------------------
//
// y = act(x * scale + shift) and dx = scale * dy * act'(z) + coef_b * (x - mean) + coef_d take their
// per-(sample, channel) coefficients from a table the combine kernels write ([field][n * C + c]),
// so no thread divides an element index by C, S or C/G: the profile showed the earlier kernels,
// which located every vector's channel and group with 64-bit divisions, issuing more instructions
// than a 16-byte bf16 vector's share of the bandwidth allows (a third of a copy's rate).
// The tensor is seen as rows of vectors: contiguous, a row is one (sample, channel)'s S elements
// (a coefficient per row); channels-last, one (sample, position)'s C channels (V coefficients per
// vector column, per sample). A block is ty x tx threads over rows x vector columns; a thread
// loads kItems vectors (kItems rows, or kItems columns of one row when rows are long) before it
// uses any, so that many 16-byte loads are in flight per SM, and channels-last threads repeat
// that over up to 8 rounds of rows (MapPlan::reps) on one read of their coefficients.

struct MapPlan {
  int64_t samples;      // channels-last: N, one sample's rows per block; contiguous: 1
  int64_t rows;         // rows per sample: S (channels-last) or N * C (contiguous)
  int64_t cols;         // vectors per row
  int64_t c;            // channels (the coefficient table's row length, channels-last)
  int64_t nc;           // N * C: the distance between two fields of the table
  int tx, ty;           // threads per block along columns and rows (the block: tx * ty <= kThreads)
  bool along_cols;      // a thread's kItems vectors lie along its row (else down its column)
  int items;            // vectors per thread per round: kItems, or tuning().map_items_16bit
  int reps;             // channels-last: rounds of `items` rows per thread (its coefficients reused)
  bool coef_vec4;       // channels-last: coefficients read as float4 (aligned, V a multiple of 4)
  int64_t row_tiles;    // blocks per sample along rows
  int64_t col_tiles;    // blocks along columns
};

MapPlan make_map_plan(const Plan& p) {
  MapPlan m{};
  m.samples = p.cl ? p.n : 1;
  m.rows = p.cl ? p.s : p.n * p.c;
  m.cols = p.cl ? p.c / p.vec : p.s / p.vec;
  m.c = p.c;
  m.nc = p.n * p.c;
  m.items = p.vec == 8 ? tuning().map_items_16bit : kItems;
  // Columns split evenly over blocks of at most kThreads (320 columns: two of 160, not 256 + 64).
  m.tx = static_cast<int>(ceil_div(m.cols, ceil_div(m.cols, kThreads)));
  m.ty = kThreads / m.tx;
  // Channels-last keeps one column per thread (its V coefficients loaded once); contiguous rows
  // longer than a block run along the row (one coefficient per thread).
  m.along_cols = !p.cl && m.cols > kThreads;
  const int64_t tile_cols = m.along_cols ? static_cast<int64_t>(m.tx) * m.items : m.tx;
  m.col_tiles = ceil_div(m.cols, tile_cols);
  const int64_t rows_per_rep = m.along_cols ? m.ty : static_cast<int64_t>(m.ty) * m.items;
  // Channels-last: up to 8 rounds per thread while the grid keeps at least 1024 blocks (a thread
  // reads V * fields coefficients per vector column, as many bytes as 4 rows of data move).
  m.reps = 1;
  if (p.cl) {
    for (int r = 8; r > 1; r /= 2) {
      if (m.samples * ceil_div(m.rows, rows_per_rep * r) * m.col_tiles >= 1024) {
        m.reps = r;
        break;
      }
    }
  }
  m.row_tiles = ceil_div(m.rows, rows_per_rep * m.reps);
  m.coef_vec4 = p.cl && p.vec % 4 == 0;
  return m;
}

// y = act(x * scale + shift); table fields: scale, shift.
template <typename T, bool kSilu, int V>
struct NormalizeOp {
  static constexpr int kFields = 2;
  const T* x;
  T* y;
  struct In {
    float x[V];
  };
  __device__ __forceinline__ void load(int64_t vi, In& in) const { Loader<T, V>::load(x, vi, in.x); }
  __device__ __forceinline__ void finish(int64_t vi, In& in, const float (&cf)[kFields][V]) const {
#pragma unroll
    for (int k = 0; k < V; ++k) in.x[k] = act<kSilu>(in.x[k] * cf[0][k] + cf[1][k]);
    Loader<T, V>::store(y, vi, in.x);
  }
};

// dx; table fields: scale, shift, mean, coef_b, coef_d.
template <typename T, bool kSilu, int V>
struct DxOp {
  static constexpr int kFields = 5;
  const T* dy;
  const T* x;
  T* dx;
  struct In {
    float x[V], dy[V];
  };
  __device__ __forceinline__ void load(int64_t vi, In& in) const {
    Loader<T, V>::load(x, vi, in.x);
    Loader<T, V>::load(dy, vi, in.dy);
  }
  __device__ __forceinline__ void finish(int64_t vi, In& in, const float (&cf)[kFields][V]) const {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gv = in.dy[k] * act_grad<kSilu>(in.x[k] * cf[0][k] + cf[1][k]);
      // (x - mean) before scaling: coef_b * x - coef_b * mean cancels when |mean| >> std.
      in.x[k] = cf[0][k] * gv + cf[3][k] * (in.x[k] - cf[2][k]) + cf[4][k];
    }
    Loader<T, V>::store(dx, vi, in.x);
  }
};

template <bool kCl, int V, int kMapItems, class Op>
__global__ void __launch_bounds__(kThreads) channel_map_kernel(Op op, const float* __restrict__ table, MapPlan m) {
  constexpr int F = Op::kFields;
  const int tx = threadIdx.x % m.tx, ty = threadIdx.x / m.tx;
  if (ty >= m.ty) return;  // (none: blocks are tx * ty threads; no block-wide synchronization below)
  const int64_t col_tile = blockIdx.x % m.col_tiles, rest = blockIdx.x / m.col_tiles;
  const int64_t sample = rest / m.row_tiles, row_tile = rest % m.row_tiles;
  const int64_t rows_per_rep = m.along_cols ? m.ty : m.ty * kMapItems;
  const int64_t row0 = row_tile * rows_per_rep * m.reps + ty;
  const int64_t col0 = col_tile * (m.along_cols ? m.tx * kMapItems : m.tx) + tx;
  float cf[kMapItems][F][V];
  if constexpr (kCl) {  // one column per thread: its channels' coefficients, once
    if (col0 < m.cols) {
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const float* t = table + f * m.nc + sample * m.c + col0 * V;
        if constexpr (V % 4 == 0) {
          if (m.coef_vec4) {
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {
              const float4 v4 = reinterpret_cast<const float4*>(t)[q];
              cf[0][f][4 * q] = v4.x;
              cf[0][f][4 * q + 1] = v4.y;
              cf[0][f][4 * q + 2] = v4.z;
              cf[0][f][4 * q + 3] = v4.w;
            }
            continue;
          }
        }
#pragma unroll
        for (int k = 0; k < V; ++k) cf[0][f][k] = t[k];
      }
    }
  }
  for (int rep = 0; rep < m.reps; ++rep) {
    typename Op::In in[kMapItems];
    int64_t vi[kMapItems];
    bool live[kMapItems];
#pragma unroll
    for (int u = 0; u < kMapItems; ++u) {
      const int64_t row = row0 + rep * rows_per_rep + (m.along_cols ? 0 : u * m.ty);
      const int64_t col = col0 + (m.along_cols ? u * m.tx : 0);
      live[u] = row < m.rows && col < m.cols;
      vi[u] = (sample * m.rows + row) * m.cols + col;
      if (live[u]) {
        op.load(vi[u], in[u]);
        if constexpr (!kCl) {  // a coefficient per row (sample * m.rows + row = n * C + c)
#pragma unroll
          for (int f = 0; f < F; ++f) {
            const float v = table[f * m.nc + row];
#pragma unroll
            for (int k = 0; k < V; ++k) cf[u][f][k] = v;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMapItems; ++u) {
      if (live[u]) op.finish(vi[u], in[u], cf[kCl ? 0 : u]);
    }
  }
}

// ---- backward: partial sums per (sample, part, channel) --------------------------------------------

// Contiguous: warp (sample, channel, part) over its part of the channel's run of S elements.
template <typename T, bool kSilu, int V, int kRunItems>
__global__ void __launch_bounds__(kThreads) bwd_partial_contig_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ weight,
    const float* __restrict__ bias, const float* __restrict__ mean, const float* __restrict__ rstd, float* part_a,
    float* part_b, Plan p) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5);
  if (row >= p.n * p.c * p.parts) return;  // whole warps: no block-wide synchronization follows
  const int lane = threadIdx.x & 31;
  const int64_t nc = row / p.parts, q = row % p.parts;
  const int64_t n = nc / p.c, c = nc % p.c;
  const int64_t ng = n * p.groups + c / p.cg;
  const float mu = mean[ng], rs = rstd[ng];
  const float sc = rs * weight[c];
  const float sh = bias[c] - mu * sc;
  const T* xc = x + nc * p.s;
  const T* dyc = dy + nc * p.s;
  const int64_t begin = q * p.len, end = min64(p.s, begin + p.len);
  float a1 = 0.0f, a2 = 0.0f;
  for (int64_t vi0 = begin / V + lane; vi0 < end / V; vi0 += kRunItems * 32) {
    float xb[kRunItems][V], db[kRunItems][V];
#pragma unroll
    for (int u = 0; u < kRunItems; ++u) {
      const int64_t vi = vi0 + u * 32;
      load_pair_or_zero<T, V>(xc, dyc, vi, vi < end / V, xb[u], db[u]);
    }
#pragma unroll
    for (int u = 0; u < kRunItems; ++u) {
      // Past the end, skip the SiLU derivative (exp and divide) rather than add its zeros: a run
      // of 21 vectors (S = 168 at 12 x 14) left 3 of 4 items empty, and computing them made this
      // pass 3x slower on an H100.
      if (vi0 + u * 32 >= end / V) break;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float gv = db[u][k] * act_grad<kSilu>(xb[u][k] * sc + sh);
        a1 += gv;
        a2 += gv * ((xb[u][k] - mu) * rs);
      }
    }
  }
  double s1 = a1, s2 = a2;
  warp_sum2(s1, s2);
  if (lane == 0) {
    const int64_t idx = (n * p.parts + q) * p.c + c;
    part_a[idx] = static_cast<float>(s1);
    part_b[idx] = static_cast<float>(s2);
  }
}

// Channels-last: as fwd_partial_cl_kernel, with the backward's summands.
template <typename T, bool kSilu, int V>
__global__ void __launch_bounds__(kThreads) bwd_partial_cl_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ weight,
    const float* __restrict__ bias, const float* __restrict__ mean, const float* __restrict__ rstd, float* part_a,
    float* part_b, Plan p) {
  __shared__ float red[2][kThreads * V];
  const int64_t n = blockIdx.x / p.parts, q = blockIdx.x % p.parts;
  const int64_t r0 = q * p.len, r1 = min64(p.s, r0 + p.len);
  const T* xn = x + n * p.s * p.c;
  const T* dyn = dy + n * p.s * p.c;
  const int64_t cols = p.c / V;
  const int tx_count = static_cast<int>(min64(cols, kThreads));
  const int ty_count = kThreads / tx_count;
  const int tx = threadIdx.x % tx_count, ty = threadIdx.x / tx_count;
  float a1[V], a2[V], sc[V], sh[V], mu[V], rs[V];
  for (int64_t col0 = 0; col0 < cols; col0 += tx_count) {
    const int64_t col = col0 + tx;
    const bool active = col < cols && ty < ty_count;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a1[k] = 0.0f;
      a2[k] = 0.0f;
      const int64_t c = active ? col * V + k : 0;
      const int64_t ng = n * p.groups + c / p.cg;
      mu[k] = mean[ng];
      rs[k] = rstd[ng];
      sc[k] = rs[k] * weight[c];
      sh[k] = bias[c] - mu[k] * sc[k];
    }
    // Two rows in flight, not kItems, for 16-byte bf16/fp16 vectors: the 8 channels' coefficients
    // and sums already take 48 registers, and four rows of x and dy left one block per SM (156
    // registers) for a pass whose SiLU derivative needs warps to hide its arithmetic.
    constexpr int kRowsInFlight = V == 8 ? 2 : kItems;
    if (active) {
      for (int64_t r = r0 + ty; r < r1; r += kRowsInFlight * ty_count) {
        float xb[kRowsInFlight][V], db[kRowsInFlight][V];
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) {
          const int64_t row = r + u * ty_count;
          load_pair_or_zero<T, V>(xn + row * p.c, dyn + row * p.c, col, row < r1, xb[u], db[u]);
        }
#pragma unroll
        for (int u = 0; u < kRowsInFlight; ++u) {
          if (r + u * ty_count >= r1) break;  // (no SiLU derivative of the tail's empty rows)
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const float gv = db[u][k] * act_grad<kSilu>(xb[u][k] * sc[k] + sh[k]);
            a1[k] += gv;
            a2[k] += gv * ((xb[u][k] - mu[k]) * rs[k]);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      red[0][threadIdx.x * V + k] = a1[k];
      red[1][threadIdx.x * V + k] = a2[k];
    }
    __syncthreads();
    if (ty == 0 && col < cols) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float s1 = 0.0f, s2 = 0.0f;
        for (int t = 0; t < ty_count; ++t) {
          s1 += red[0][(t * tx_count + tx) * V + k];
          s2 += red[1][(t * tx_count + tx) * V + k];
        }
        const int64_t idx = (n * p.parts + q) * p.c + col * V + k;
        part_a[idx] = s1;
        part_b[idx] = s2;
      }
    }
    __syncthreads();
  }
}

// A channel's sums of g and g * xhat: into the workspace (dweight and dbias sum them over samples),
// and times its weight into the group's totals ga, gb.
__device__ __forceinline__ void add_channel_sums(const Workspace& ws, int64_t nc_index, float weight, double s1,
                                                 double s2, double& ga, double& gb) {
  ws.sum_g[nc_index] = s1;
  ws.sum_gx[nc_index] = s2;
  ga += weight * s1;
  gb += weight * s2;
}

// dx = scale * g + coef_b * (x - mean) + coef_d, from the group's totals (after block_sum).
struct DxCoefs {
  float b, d;
};

__device__ __forceinline__ DxCoefs dx_coefs(double rstd, double ga, double gb, int64_t m) {
  const double inv_m = 1.0 / static_cast<double>(m);
  return {static_cast<float>(-rstd * rstd * gb * inv_m), static_cast<float>(-rstd * ga * inv_m)};
}

// (sample, group): per-channel totals over parts (double), then the dx coefficients of the group.
__global__ void __launch_bounds__(kThreads) bwd_combine_kernel(const float* part_a, const float* part_b,
                                                               const float* __restrict__ weight,
                                                               const float* __restrict__ bias,
                                                               const float* __restrict__ mean,
                                                               const float* __restrict__ rstd, Workspace ws,
                                                               Plan p) {
  __shared__ double scratch[32];
  const int64_t ng = blockIdx.x, n = ng / p.groups, g = ng % p.groups;
  double ga = 0.0, gb = 0.0;
  for (int64_t j = threadIdx.x; j < p.cg; j += blockDim.x) {
    const int64_t c = g * p.cg + j;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t q = 0; q < p.parts; ++q) {
      s1 += part_a[(n * p.parts + q) * p.c + c];
      s2 += part_b[(n * p.parts + q) * p.c + c];
    }
    add_channel_sums(ws, n * p.c + c, weight[c], s1, s2, ga, gb);
  }
  ga = block_sum<double>(ga, scratch);  // (every thread gets the totals)
  gb = block_sum<double>(gb, scratch);
  const DxCoefs coef = dx_coefs(rstd[ng], ga, gb, p.m);
  const float mu = mean[ng], rsf = rstd[ng];
  // The group's channels' rows of the coefficient table: scale, shift, mean, coef_b, coef_d.
  const int64_t nc = p.n * p.c;
  for (int64_t j = threadIdx.x; j < p.cg; j += blockDim.x) {
    const int64_t i = n * p.c + g * p.cg + j, c = g * p.cg + j;
    write_scale_shift(ws.table, nc, i, c, weight, bias, mu, rsf);
    ws.table[2 * nc + i] = mu;
    ws.table[3 * nc + i] = coef.b;
    ws.table[4 * nc + i] = coef.d;
  }
}

// Vector v of the group in shared memory: x into xb, and g = dy * act'(x * sc + sh) into gb.
template <typename T, bool kSilu, int V>
__device__ __forceinline__ void x_and_g(const T* xs, const T* ds, int v, float sc, float sh, float (&xb)[V],
                                        float (&gb)[V]) {
  Loader<T, V>::load(xs, v, xb);
  Loader<T, V>::load(ds, v, gb);
#pragma unroll
  for (int k = 0; k < V; ++k) gb[k] *= act_grad<kSilu>(xb[k] * sc + sh);
}

// ---- backward: fused, the group's x and dy in shared memory (contiguous) ---------------------------
//
// One block per (sample, group) reads the group's x and dy once into shared memory, sums each
// channel's g = dy * act'(z) and g * xhat there (a warp per channel), combines them into the
// group's dx coefficients as bwd_combine_kernel does, and writes dx: one read of x and dy and one
// write of dx, where the partial-sums path reads both twice (5 passes of the tensor -> 3). The
// per-(sample, channel) sums go to the workspace for bwd_weight_grads_kernel, as there. V divides
// S here (backward_typed's vectors, or V = 1), so a vector lies in one channel.
template <typename T, bool kSilu, int V>
__global__ void __launch_bounds__(kFusedThreads) bwd_fused_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ weight,
    const float* __restrict__ bias, const float* __restrict__ mean, const float* __restrict__ rstd,
    T* __restrict__ dx, Workspace ws, Plan p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double scratch[32];
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* ds = xs + p.m;  // (16-byte aligned: S * sizeof(T) is a multiple of 16 when V > 1)
  const int64_t ng = blockIdx.x, n = ng / p.groups, g = ng % p.groups;
  const T* xg = x + ng * p.m;
  const T* dyg = dy + ng * p.m;
  T* dxg = dx + ng * p.m;
  // The group fits in shared memory: its vector offsets fit in 32 bits.
  const int nv = static_cast<int>(p.m / V), sv = static_cast<int>(p.s / V);
  const int threads = static_cast<int>(blockDim.x);
  // kItems vectors in flight per thread, as in the fused forward: half of x, half of dy (all of
  // each spilled registers with 16-bit data)
  constexpr int kPairs = kItems / 2;
  for (int i0 = threadIdx.x; i0 < nv; i0 += kPairs * threads) {
    Pack<T, V> rx[kPairs], rd[kPairs];
#pragma unroll
    for (int u = 0; u < kPairs; ++u) {
      const int i = i0 + u * threads;
      if (i < nv) {
        rx[u] = reinterpret_cast<const Pack<T, V>*>(xg)[i];
        rd[u] = reinterpret_cast<const Pack<T, V>*>(dyg)[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kPairs; ++u) {
      const int i = i0 + u * threads;
      if (i < nv) {
        reinterpret_cast<Pack<T, V>*>(xs)[i] = rx[u];
        reinterpret_cast<Pack<T, V>*>(ds)[i] = rd[u];
      }
    }
  }
  __syncthreads();
  const float mu = mean[ng], rs = rstd[ng];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = threads >> 5;
  double ga = 0.0, gb = 0.0;  // lane 0's channels' weight * sums
  for (int j = warp; j < p.cg; j += warps) {
    const int64_t c = g * p.cg + j;
    const float sc = rs * weight[c];
    const float sh = bias[c] - mu * sc;
    float a1 = 0.0f, a2 = 0.0f;
    for (int v = j * sv + lane; v < (j + 1) * sv; v += 32) {
      float xv[V], gv[V];
      x_and_g<T, kSilu, V>(xs, ds, v, sc, sh, xv, gv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        a1 += gv[k];
        a2 += gv[k] * ((xv[k] - mu) * rs);
      }
    }
    double s1 = a1, s2 = a2;
    warp_sum2(s1, s2);
    if (lane == 0) add_channel_sums(ws, n * p.c + c, weight[c], s1, s2, ga, gb);
  }
  ga = block_sum<double>(ga, scratch);  // (every thread gets the totals)
  gb = block_sum<double>(gb, scratch);
  const DxCoefs coef = dx_coefs(rs, ga, gb, p.m);
  for (int i = threadIdx.x; i < nv; i += threads) {
    const int64_t c = g * p.cg + i / sv;
    const float sc = rs * weight[c];
    const float sh = bias[c] - mu * sc;
    float xv[V], gv[V];
    x_and_g<T, kSilu, V>(xs, ds, i, sc, sh, xv, gv);
#pragma unroll
    for (int k = 0; k < V; ++k) xv[k] = sc * gv[k] + coef.b * (xv[k] - mu) + coef.d;  // as DxOp
    Loader<T, V>::store(dxg, i, xv);
  }
}

__global__ void __launch_bounds__(kThreads) bwd_weight_grads_kernel(Workspace ws, float* dweight, float* dbias,
                                                                    Plan p) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= p.c) return;
  // Samples in order (deterministic), kUnroll loads issued before their sums: one thread per
  // channel had walked the samples one dependent load at a time (10 us for 48 x 1792 on an H200).
  constexpr int kUnroll = 8;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t n0 = 0; n0 < p.n; n0 += kUnroll) {
    double g[kUnroll], gx[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool in = n0 + u < p.n;
      g[u] = in ? ws.sum_g[(n0 + u) * p.c + c] : 0.0;
      gx[u] = in ? ws.sum_gx[(n0 + u) * p.c + c] : 0.0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      s1 += g[u];
      s2 += gx[u];
    }
  }
  dbias[c] = static_cast<float>(s1);
  dweight[c] = static_cast<float>(s2);
}

// The affine parameters in float32: weight (1 where absent) and bias (0 where absent), from any
// of the three dtypes, in one launch instead of the caller's two conversions per call.
template <typename W, typename B>
__global__ void __launch_bounds__(kThreads) affine_f32_kernel(const W* w, const B* b, float* w32, float* b32,
                                                              int64_t c) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= c) return;
  w32[i] = w != nullptr ? to_float(w[i]) : 1.0f;
  b32[i] = b != nullptr ? to_float(b[i]) : 0.0f;
}

// ---- launchers -------------------------------------------------------------------------------------

unsigned blocks_for(int64_t work, int threads) { return static_cast<unsigned>(ceil_div(work, threads)); }

constexpr int kMaxDevices = 64;

int current_device() {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < kMaxDevices ? device : -1;
}

// Per device, asked once (a driver query on every launch cost host time at small sizes).
int max_dynamic_smem() {
  static int cached[kMaxDevices] = {};
  const int device = current_device();
  if (device >= 0 && cached[device] > 0) return cached[device];
  int bytes = 0;
  if (device < 0 || cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return 48 * 1024;
  }
  cached[device] = bytes - 1024;  // room for the kernels' static shared memory
  return cached[device];
}

// Lets `kernel` use all of the device's dynamic shared memory, once per device: `done` is the
// caller's per-kernel record (a static of the launcher's instantiation; several kernels share a
// function-pointer type, so it cannot live here).
template <typename Kernel>
cudaError_t allow_max_dynamic_smem(Kernel kernel, bool (&done)[kMaxDevices]) {
  const int device = current_device();
  if (device >= 0 && done[device]) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic_smem());
  if (err == cudaSuccess && device >= 0) done[device] = true;
  return err;
}

// One block per (sample, group) of a fused kernel (fwd_fused_kernel, bwd_fused_kernel) with `smem`
// bytes of dynamic shared memory, which may be more than the 48 KiB a launch gets by default.
template <typename Kernel, typename... Args>
cudaError_t launch_per_group(Kernel kernel, bool (&allowed)[kMaxDevices], const Plan& p, size_t smem,
                             cudaStream_t stream, Args... args) {
  const cudaError_t err = allow_max_dynamic_smem(kernel, allowed);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(p.n * p.groups), tuning().fused_threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// Blocks of `kernel` (kThreads threads, no dynamic shared memory) resident at once on the current
// device (SMs x blocks per SM), asked once per device; 0 where unknown. `cached` is the caller's
// per-kernel record, as in allow_max_dynamic_smem.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int (&cached)[kMaxDevices]) {
  const int device = current_device();
  if (device < 0) return 0;
  if (cached[device] == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) == cudaSuccess) {
      cached[device] = std::max(1, sms * per_sm);
    } else {
      cudaGetLastError();  // (a failed query must not fail the launch that follows)
      cached[device] = -1;
    }
  }
  return std::max(0, cached[device]);
}

// The channels-last partial sums in whole waves: where the planned n * parts blocks are more than
// one wave of resident blocks but not a whole number of them, fewer parts, so that the last wave
// does not run a few blocks per SM at a fraction of the bandwidth (on an H100 the 16-bit forward's
// 528 blocks on 396 slots; the sweep had 256 blocks faster for it and slower for float32, which
// fits 660). Only fewer: the workspace holds the planned parts.
Plan fit_waves(Plan p, int64_t slots) {
  if (!tuning().fit_waves || slots <= 0 || p.n * p.parts <= slots) return p;
  const int64_t parts = std::max<int64_t>(1, (p.n * p.parts / slots) * slots / p.n);
  p.len = ceil_div(p.s, parts);
  p.parts = ceil_div(p.s, p.len);
  return p;
}

// Whether 16-byte vectors can be used: sizes let no vector straddle a channel (contiguous) or a
// sample (channels-last), and every pointer is 16-byte aligned.
bool can_vectorize(const Plan& p, std::initializer_list<const void*> ptrs) {
  if (p.cl ? p.c % p.vec != 0 : p.s % p.vec != 0) return false;
  for (const void* ptr : ptrs)
    if (!aligned16(ptr)) return false;
  return true;
}

// Whether the forward takes the fused kernel: contiguous, and the group fits in shared memory (and
// the sweep's settings allow it).
bool fused_forward(const Plan& p, size_t elem_bytes) {
  return !p.cl && tuning().fused && (elem_bytes == 4 || tuning().fused_16bit) &&
         p.n * p.groups >= tuning().fused_min_groups &&
         static_cast<size_t>(p.m) * elem_bytes <= static_cast<size_t>(max_dynamic_smem());
}

// Whether the backward takes the fused kernel: contiguous, x and dy of a group fit in shared
// memory, and the setting is on.
bool fused_backward(const Plan& p, size_t elem_bytes) {
  return !p.cl && tuning().fused_backward &&
         2 * static_cast<size_t>(p.m) * elem_bytes <= static_cast<size_t>(max_dynamic_smem());
}

template <int V, int kMapItems, class Op>
void launch_channel_map_items(const Op& op, const float* table, const MapPlan& m, bool cl, unsigned blocks,
                              int threads, cudaStream_t stream) {
  if (cl) {
    channel_map_kernel<true, V, kMapItems, Op><<<blocks, threads, 0, stream>>>(op, table, m);
  } else {
    channel_map_kernel<false, V, kMapItems, Op><<<blocks, threads, 0, stream>>>(op, table, m);
  }
}

template <int V, class Op>
void launch_channel_map(const Op& op, const float* table, const Plan& p, cudaStream_t stream) {
  MapPlan m = make_map_plan(p);
  m.coef_vec4 = m.coef_vec4 && aligned16(table);  // (torch's allocations are; a caller's may not be)
  const auto blocks = static_cast<unsigned>(m.samples * m.row_tiles * m.col_tiles);
  const int threads = m.tx * m.ty;
  if constexpr (V == 8) {
    if (m.items == 2) return launch_channel_map_items<V, 2>(op, table, m, p.cl, blocks, threads, stream);
  }
  launch_channel_map_items<V, kItems>(op, table, m, p.cl, blocks, threads, stream);
}

template <typename T, bool kSilu, int V>
cudaError_t forward_launch(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                           float* workspace, const Plan& planned, float eps, cudaStream_t stream) {
  static int slots[kMaxDevices] = {};
  if (fused_forward(planned, sizeof(T))) {
    static bool allowed[kMaxDevices] = {};
    const Plan& p = planned;
    return launch_per_group(fwd_fused_kernel<T, kSilu, V>, allowed, p, static_cast<size_t>(p.m) * sizeof(T), stream,
                            x, w, b, y, mean, rstd, p.m, p.s, p.cg, p.groups, eps);
  }
  const Workspace ws = carve(workspace, planned, false);
  for (int64_t n0 = 0; n0 < planned.n; n0 += planned.chunk) {  // (one chunk unless l2_chunk_bytes)
    Plan p = chunk_plan(planned, n0, false);
    if (p.cl) p = fit_waves(p, resident_blocks(fwd_partial_cl_kernel<T, V>, slots));
    const int64_t off = n0 * p.c * p.s;
    if (p.cl) {
      fwd_partial_cl_kernel<T, V><<<static_cast<unsigned>(p.n * p.parts), kThreads, 0, stream>>>(
          x + off, ws.part_a, ws.part_b, p);
    } else {
      fwd_partial_contig_kernel<T, V><<<static_cast<unsigned>(p.n * p.groups * p.parts), kThreads, 0, stream>>>(
          x + off, ws.part_a, ws.part_b, p);
    }
    fwd_combine_kernel<T><<<static_cast<unsigned>(p.n * p.groups), kThreads, 0, stream>>>(
        x + off, ws.part_a, ws.part_b, w, b, mean + n0 * p.groups, rstd + n0 * p.groups, ws.table, p, eps);
    launch_channel_map<V>(NormalizeOp<T, kSilu, V>{x + off, y + off}, ws.table, p, stream);
  }
  return cudaGetLastError();
}

template <typename T, bool kSilu, int V>
cudaError_t backward_launch(const T* dy, const T* x, const float* w, const float* b, const float* mean,
                            const float* rstd, T* dx, float* dweight, float* dbias, float* workspace,
                            const Plan& planned, cudaStream_t stream) {
  static int slots[kMaxDevices] = {};
  const Workspace ws = carve(workspace, planned, true);
  if (fused_backward(planned, sizeof(T))) {
    static bool allowed[kMaxDevices] = {};
    const Plan& p = planned;
    const cudaError_t err = launch_per_group(bwd_fused_kernel<T, kSilu, V>, allowed, p, 2 * p.m * sizeof(T), stream,
                                             dy, x, w, b, mean, rstd, dx, ws, p);
    if (err != cudaSuccess) return err;
    bwd_weight_grads_kernel<<<blocks_for(p.c, kThreads), kThreads, 0, stream>>>(ws, dweight, dbias, p);
    return cudaGetLastError();
  }
  for (int64_t n0 = 0; n0 < planned.n; n0 += planned.chunk) {  // (one chunk unless l2_chunk_bytes)
    Plan p = chunk_plan(planned, n0, true);
    if (p.cl) p = fit_waves(p, resident_blocks(bwd_partial_cl_kernel<T, kSilu, V>, slots));
    const int64_t off = n0 * p.c * p.s;
    const float* mean_c = mean + n0 * p.groups;
    const float* rstd_c = rstd + n0 * p.groups;
    if (p.cl) {
      bwd_partial_cl_kernel<T, kSilu, V><<<static_cast<unsigned>(p.n * p.parts), kThreads, 0, stream>>>(
          dy + off, x + off, w, b, mean_c, rstd_c, ws.part_a, ws.part_b, p);
    } else {
      // Parts of at most 32 vectors give each lane one: a kernel with one item needs 40 registers
      // rather than 104 (16-bit), i.e. more warps per SM for a pass that is mostly latency.
      const auto kernel = p.len / V <= 32 ? bwd_partial_contig_kernel<T, kSilu, V, 1>
                                          : bwd_partial_contig_kernel<T, kSilu, V, kItems>;
      kernel<<<blocks_for(p.n * p.c * p.parts, kWarps), kThreads, 0, stream>>>(
          dy + off, x + off, w, b, mean_c, rstd_c, ws.part_a, ws.part_b, p);
    }
    Workspace wc = ws;  // the chunk's rows of the per-(sample, channel) sums
    wc.sum_g += n0 * p.c;
    wc.sum_gx += n0 * p.c;
    bwd_combine_kernel<<<static_cast<unsigned>(p.n * p.groups), kThreads, 0, stream>>>(ws.part_a, ws.part_b, w, b,
                                                                                       mean_c, rstd_c, wc, p);
    launch_channel_map<V>(DxOp<T, kSilu, V>{dy + off, x + off, dx + off}, ws.table, p, stream);
  }
  bwd_weight_grads_kernel<<<blocks_for(planned.c, kThreads), kThreads, 0, stream>>>(ws, dweight, dbias, planned);
  return cudaGetLastError();
}

template <typename T, bool kSilu>
cudaError_t forward_typed(const void* x, const float* w, const float* b, void* y, float* mean, float* rstd,
                          float* workspace, Plan p, float eps, cudaStream_t stream) {
  const auto* xt = static_cast<const T*>(x);
  auto* yt = static_cast<T*>(y);
  // The fused kernel's vectors stay inside the group's run when m % V == 0 (not S % V).
  const bool fused_vec = fused_forward(p, sizeof(T)) && p.m % Vec16<T>::kSize == 0 && aligned16(x) && aligned16(y);
  const bool vec = can_vectorize(p, {x, y}) || fused_vec;
  if (vec) {
    p.vec = Vec16<T>::kSize;
    return forward_launch<T, kSilu, Vec16<T>::kSize>(xt, w, b, yt, mean, rstd, workspace, p, eps, stream);
  }
  p.vec = 1;
  return forward_launch<T, kSilu, 1>(xt, w, b, yt, mean, rstd, workspace, p, eps, stream);
}

template <typename W, typename B>
void launch_affine_f32(const void* w, const void* b, float* w32, float* b32, int64_t c, cudaStream_t stream) {
  affine_f32_kernel<W, B><<<blocks_for(c, kThreads), kThreads, 0, stream>>>(
      static_cast<const W*>(w), static_cast<const B*>(b), w32, b32, c);
}

template <typename W>
cudaError_t affine_f32_bias(const void* w, const void* b, DType b_dtype, float* w32, float* b32, int64_t c,
                            cudaStream_t stream) {
  switch (b_dtype) {
    case DType::Float32: launch_affine_f32<W, float>(w, b, w32, b32, c, stream); break;
    case DType::Float16: launch_affine_f32<W, __half>(w, b, w32, b32, c, stream); break;
    case DType::BFloat16: launch_affine_f32<W, __nv_bfloat16>(w, b, w32, b32, c, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// The affine parameters as float32 arrays for the kernels: the caller's own when both are float32,
// else converted into `tail` (2C floats of the workspace).
cudaError_t affine_f32(const Affine& a, int64_t c, float* tail, const float** w, const float** b,
                       cudaStream_t stream) {
  if (a.weight != nullptr && a.bias != nullptr && a.weight_dtype == DType::Float32 &&
      a.bias_dtype == DType::Float32) {
    *w = static_cast<const float*>(a.weight);
    *b = static_cast<const float*>(a.bias);
    return cudaSuccess;
  }
  *w = tail;
  *b = tail + c;
  switch (a.weight_dtype) {
    case DType::Float32: return affine_f32_bias<float>(a.weight, a.bias, a.bias_dtype, tail, tail + c, c, stream);
    case DType::Float16: return affine_f32_bias<__half>(a.weight, a.bias, a.bias_dtype, tail, tail + c, c, stream);
    case DType::BFloat16:
      return affine_f32_bias<__nv_bfloat16>(a.weight, a.bias, a.bias_dtype, tail, tail + c, c, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, bool kSilu>
cudaError_t backward_typed(const void* dy, const void* x, const float* w, const float* b, const float* mean,
                           const float* rstd, void* dx, float* dweight, float* dbias, float* workspace, Plan p,
                           cudaStream_t stream) {
  const auto* dyt = static_cast<const T*>(dy);
  const auto* xt = static_cast<const T*>(x);
  auto* dxt = static_cast<T*>(dx);
  if (can_vectorize(p, {dy, x, dx})) {
    return backward_launch<T, kSilu, Vec16<T>::kSize>(dyt, xt, w, b, mean, rstd, dxt, dweight, dbias, workspace, p,
                                                      stream);
  }
  p.vec = 1;
  return backward_launch<T, kSilu, 1>(dyt, xt, w, b, mean, rstd, dxt, dweight, dbias, workspace, p, stream);
}

}  // namespace

bool group_norm_set_tuning(int fused_threads, int64_t target_blocks, int64_t min_per_block, int64_t min_rows,
                           int64_t min_per_warp, bool fused, int64_t target_blocks_cl, int64_t fused_min_groups,
                           bool fused_16bit, int map_items_16bit, bool fit_waves, bool fused_backward,
                           int64_t l2_chunk_bytes) {
  if (l2_chunk_bytes < 0 || fused_threads < 0 || fused_threads > kFusedThreads || fused_threads % 32 != 0 || target_blocks < 0 ||
      min_per_block < 0 || min_rows < 0 || min_per_warp < 0 || target_blocks_cl < 0 || fused_min_groups < 0 ||
      (map_items_16bit != 0 && map_items_16bit != 2 && map_items_16bit != kItems)) {
    return false;
  }
  const Tuning defaults;
  Tuning& t = tuning();
  t.fused_threads = fused_threads ? fused_threads : defaults.fused_threads;
  t.target_blocks = target_blocks ? target_blocks : defaults.target_blocks;
  t.min_per_block = min_per_block ? min_per_block : defaults.min_per_block;
  t.min_rows = min_rows ? min_rows : defaults.min_rows;
  t.min_per_warp = min_per_warp ? min_per_warp : defaults.min_per_warp;
  t.fused = fused;
  t.target_blocks_cl = target_blocks_cl ? target_blocks_cl : defaults.target_blocks_cl;
  t.fused_min_groups = fused_min_groups ? fused_min_groups : defaults.fused_min_groups;
  t.fused_16bit = fused_16bit;
  t.map_items_16bit = map_items_16bit ? map_items_16bit : defaults.map_items_16bit;
  t.fit_waves = fit_waves;
  t.fused_backward = fused_backward;
  t.l2_chunk_bytes = l2_chunk_bytes ? l2_chunk_bytes : defaults.l2_chunk_bytes;
  return true;
}

size_t group_norm_workspace_floats(DType dtype, int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last,
                                   bool backward) {
  if (n * c * s == 0) return 0;
  return workspace_floats(make_plan(dtype, n, c, s, groups, channels_last, backward), backward);
}

cudaError_t group_norm_forward(DType dtype, const void* x, const Affine& affine, void* y, float* mean, float* rstd,
                               float* workspace, int64_t n, int64_t c, int64_t s, int64_t groups, float eps,
                               bool silu, bool channels_last, cudaStream_t stream) {
  if (n * c * s == 0) return cudaSuccess;
  const Plan p = make_plan(dtype, n, c, s, groups, channels_last, false);
  const float *weight = nullptr, *bias = nullptr;
  const cudaError_t err = affine_f32(affine, c, affine_tail(workspace, p, false), &weight, &bias, stream);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::Float32:
      return silu ? forward_typed<float, true>(x, weight, bias, y, mean, rstd, workspace, p, eps, stream)
                  : forward_typed<float, false>(x, weight, bias, y, mean, rstd, workspace, p, eps, stream);
    case DType::Float16:
      return silu ? forward_typed<__half, true>(x, weight, bias, y, mean, rstd, workspace, p, eps, stream)
                  : forward_typed<__half, false>(x, weight, bias, y, mean, rstd, workspace, p, eps, stream);
    case DType::BFloat16:
      return silu ? forward_typed<__nv_bfloat16, true>(x, weight, bias, y, mean, rstd, workspace, p, eps, stream)
                  : forward_typed<__nv_bfloat16, false>(x, weight, bias, y, mean, rstd, workspace, p, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t group_norm_backward(DType dtype, const void* dy, const void* x, const Affine& affine, const float* mean,
                                const float* rstd, void* dx, float* dweight, float* dbias, float* workspace, int64_t n,
                                int64_t c, int64_t s, int64_t groups, bool silu, bool channels_last,
                                cudaStream_t stream) {
  if (n * c * s == 0) return cudaSuccess;
  const Plan p = make_plan(dtype, n, c, s, groups, channels_last, true);
  const float *weight = nullptr, *bias = nullptr;
  const cudaError_t err = affine_f32(affine, c, affine_tail(workspace, p, true), &weight, &bias, stream);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::Float32:
      return silu ? backward_typed<float, true>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, p, stream)
                  : backward_typed<float, false>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, p, stream);
    case DType::Float16:
      return silu ? backward_typed<__half, true>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, p, stream)
                  : backward_typed<__half, false>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, p, stream);
    case DType::BFloat16:
      return silu ? backward_typed<__nv_bfloat16, true>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, p,
                                                        stream)
                  : backward_typed<__nv_bfloat16, false>(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, p,
                                                         stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ldmfast::cuda
