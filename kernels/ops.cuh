// Host-side entry points of the CUDA kernels (launched on the caller's stream).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "dtype.h"

namespace ldmfast::cuda {

// DDIM update over n samples of m elements (see DdimCoef in dtype.h); noise and x0_out may be null.
cudaError_t ddim_step(DType dtype, const void* x_t, const void* out, const void* noise, const float* coef,
                      void* x_prev, void* x0_out, int64_t n, int64_t m, bool clip, float clip_value,
                      cudaStream_t stream);

}  // namespace ldmfast::cuda
