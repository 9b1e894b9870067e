// Flash-style attention forward on CUDA cores: one warp per query row, key/value tiles staged in
// shared memory as fp32 and shared by the block's warps, online softmax in fp32, lse kept for the
// backward (which is the Triton kernel). It needs no tensor cores, so it runs every head dim up to
// 512 on any architecture; `auto` prefers the Triton forward, which uses tensor cores.
#include <cfloat>

#include "attention.cuh"
#include "cuda_common.cuh"

namespace ldmfast::cuda {
namespace {

constexpr int kWarps = 4;                    // query rows per block
constexpr int kSharedBytes = 48 * 1024;      // the default dynamic shared memory limit

template <typename T, int kPerLane>
__global__ void attention_forward_kernel(TensorRef4 q, TensorRef4 k, TensorRef4 v, TensorRef4 out, float* lse,
                                         AttentionShape s, int tile_keys, int64_t row_blocks) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / row_blocks;
  const int64_t b = bh / s.heads, h = bh % s.heads;
  const int64_t row = (blockIdx.x % row_blocks) * kWarps + warp;
  const bool active = row < s.lq;
  const int dim = static_cast<int>(s.dim);
  float* k_tile = smem;                                   // [tile_keys][dim]
  float* v_tile = k_tile + tile_keys * dim;               // [tile_keys][dim]
  float* scores = v_tile + tile_keys * dim + warp * tile_keys;  // this warp's [tile_keys]

  float qv[kPerLane], acc[kPerLane];
  const T* q_ptr = static_cast<const T*>(q.ptr);
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int d = lane + 32 * t;
    qv[t] = (active && d < dim) ? to_float(q_ptr[q.offset(b, h, row, d)]) * s.scale : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -FLT_MAX, l = 0.0f;
  const T* k_ptr = static_cast<const T*>(k.ptr);
  const T* v_ptr = static_cast<const T*>(v.ptr);
  for (int64_t key0 = 0; key0 < s.lk; key0 += tile_keys) {
    const int keys = static_cast<int>(min(static_cast<int64_t>(tile_keys), s.lk - key0));
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < keys * dim; idx += blockDim.x) {
      const int j = idx / dim, d = idx % dim;
      k_tile[idx] = to_float(k_ptr[k.offset(b, h, key0 + j, d)]);
      v_tile[idx] = to_float(v_ptr[v.offset(b, h, key0 + j, d)]);
    }
    __syncthreads();
    if (!active) continue;
    float tile_max = -FLT_MAX;
    for (int j = 0; j < keys; ++j) {
      float part = 0.0f;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < dim) part += qv[t] * k_tile[j * dim + d];
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
      if (lane == 0) scores[j] = part;
      tile_max = fmaxf(tile_max, part);
    }
    __syncwarp();
    const float m_new = fmaxf(m, tile_max);
    const float alpha = expf(m - m_new);
    l *= alpha;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) acc[t] *= alpha;
    for (int j = 0; j < keys; ++j) {
      const float p = expf(scores[j] - m_new);
      l += p;
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < dim) acc[t] += p * v_tile[j * dim + d];
      }
    }
    m = m_new;
    __syncwarp();  // scores are rewritten by the next tile
  }
  if (!active) return;
  T* o_ptr = static_cast<T*>(out.ptr);
  const float inv_l = 1.0f / l;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < dim) o_ptr[out.offset(b, h, row, d)] = from_float<T>(acc[t] * inv_l);
  }
  if (lane == 0) lse[bh * s.lq + row] = m + logf(l);
}

template <typename T, int kPerLane>
cudaError_t launch(const TensorRef4& q, const TensorRef4& k, const TensorRef4& v, const TensorRef4& out, float* lse,
                   const AttentionShape& s, cudaStream_t stream) {
  const int dim = static_cast<int>(s.dim);
  // Two fp32 tiles of dim per key plus one score per key and warp, within the shared memory limit.
  const int per_key = (2 * dim + kWarps) * static_cast<int>(sizeof(float));
  const int tile_keys = max(1, min(64, kSharedBytes / per_key));
  const int64_t row_blocks = (s.lq + kWarps - 1) / kWarps;
  const int64_t blocks = row_blocks * s.batch * s.heads;
  const size_t shared = static_cast<size_t>(tile_keys) * per_key;
  attention_forward_kernel<T, kPerLane><<<static_cast<unsigned>(blocks), kWarps * 32, shared, stream>>>(
      q, k, v, out, lse, s, tile_keys, row_blocks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const TensorRef4& q, const TensorRef4& k, const TensorRef4& v, const TensorRef4& out,
                       float* lse, const AttentionShape& s, cudaStream_t stream) {
  if (s.dim <= 32) return launch<T, 1>(q, k, v, out, lse, s, stream);
  if (s.dim <= 64) return launch<T, 2>(q, k, v, out, lse, s, stream);
  if (s.dim <= 128) return launch<T, 4>(q, k, v, out, lse, s, stream);
  if (s.dim <= 256) return launch<T, 8>(q, k, v, out, lse, s, stream);
  if (s.dim <= 512) return launch<T, 16>(q, k, v, out, lse, s, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_forward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                              const TensorRef4& out, float* lse, const AttentionShape& dims, cudaStream_t stream) {
  if (dims.batch * dims.heads * dims.lq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_dim<float>(q, k, v, out, lse, dims, stream);
    case DType::Float16: return launch_dim<__half>(q, k, v, out, lse, dims, stream);
    case DType::BFloat16: return launch_dim<__nv_bfloat16>(q, k, v, out, lse, dims, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ldmfast::cuda
