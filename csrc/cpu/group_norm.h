// CPU kernels of the fused GroupNorm (+ SiLU) op (ldmfast/ops/group_norm.py has the formulas).
// x, y, dy, dx: dense arrays of N x C x S elements, contiguous (N, C, S) or channels-last (N, S, C)
// storage; weight, bias: C floats; mean, rstd: N x G floats; dweight, dbias: C floats.
#pragma once
#include <cstdint>
#include "dtype.h"

namespace ldmfast::cpu {

void group_norm_forward(DType dtype, const void* x, const float* weight, const float* bias, void* y, float* mean,
                        float* rstd, int64_t n, int64_t c, int64_t s, int64_t groups, float eps, bool silu,
                        bool channels_last, int num_threads);

void group_norm_backward(DType dtype, const void* dy, const void* x, const float* weight, const float* bias,
                         const float* mean, const float* rstd, void* dx, float* dweight, float* dbias, int64_t n,
                         int64_t c, int64_t s, int64_t groups, bool silu, bool channels_last, int num_threads);

}  // namespace ldmfast::cpu
