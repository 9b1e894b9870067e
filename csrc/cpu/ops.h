// CPU kernels of ldmfast._C. Pointers are raw addresses of dense arrays; the Python side packs
// strided inputs and checks shapes, dtypes and devices before calling.
#pragma once
#include <cstdint>
#include "dtype.h"

namespace ldmfast::cpu {

// DDIM update over N samples of M elements each (see DdimCoef in dtype.h). noise and x0_out may be
// null. coef holds N rows of DDIM_COEF_STRIDE floats.
void ddim_step(DType dtype, const void* x_t, const void* out, const void* noise, const float* coef,
               void* x_prev, void* x0_out, int64_t n, int64_t m, bool clip, float clip_value,
               int num_threads);

}  // namespace ldmfast::cpu
