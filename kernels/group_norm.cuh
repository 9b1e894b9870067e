// Host-side entry points of the fused GroupNorm (+ SiLU) CUDA kernels (launched on the caller's
// stream). x, y, dy, dx: dense N x C x S arrays, contiguous (N, C, S) or channels-last (N, S, C);
// weight, bias: C values of any of the three dtypes, or null (1 and 0); mean, rstd: N x G floats;
// dweight, dbias: C floats. `workspace` holds group_norm_workspace_floats(...) floats (8-byte
// aligned; 16-byte aligned lets the channels-last pass read its coefficients as float4), allocated by
// the caller; 16-bit or absent affine parameters are converted into its tail.
#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>
#include "dtype.h"

namespace ldmfast::cuda {

// Launch settings for all later calls (0: the default of that field); false for invalid values.
// For tuning sweeps: not to be changed while another thread launches these kernels.
bool group_norm_set_tuning(int fused_threads, int64_t target_blocks, int64_t min_per_block, int64_t min_rows,
                           int64_t min_per_warp, bool fused, int64_t target_blocks_cl, int64_t fused_min_groups,
                           bool fused_16bit, int map_items_16bit, bool fit_waves, bool fused_backward,
                           int64_t l2_chunk_bytes);

// The affine parameters as the caller holds them.
struct Affine {
  const void* weight;  // C values or null
  const void* bias;    // C values or null
  DType weight_dtype, bias_dtype;
};

size_t group_norm_workspace_floats(DType dtype, int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last,
                                   bool backward);

cudaError_t group_norm_forward(DType dtype, const void* x, const Affine& affine, void* y, float* mean, float* rstd,
                               float* workspace, int64_t n, int64_t c, int64_t s, int64_t groups, float eps,
                               bool silu, bool channels_last, cudaStream_t stream);

cudaError_t group_norm_backward(DType dtype, const void* dy, const void* x, const Affine& affine, const float* mean,
                                const float* rstd, void* dx, float* dweight, float* dbias, float* workspace, int64_t n,
                                int64_t c, int64_t s, int64_t groups, bool silu, bool channels_last,
                                cudaStream_t stream);

}  // namespace ldmfast::cuda
