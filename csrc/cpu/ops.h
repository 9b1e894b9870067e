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

// One step of AdamW with 8-bit moments (ldmfast/train/adamw8bit.py) over the flat float32
// parameter p (n values) and gradient g, in place: codes are (ceil(n / 256), 256) uint8, scales
// one float per block, signed_code / unsigned_code the 256-entry tables. The scalars as the
// Python definition computes them (1 - beta in double, then rounded), so both round alike.
struct AdamW8bitHyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float bc1, bc2;          // bias corrections 1 - beta^step
  float decay_factor;      // 1 - lr * weight_decay
  uint32_t key_m, key_v;   // the step's random streams (adamw8bit.stream_key)
  // adamw8bit._index_table of each code: for a float's top 18 bits, the code at or below them
  const uint8_t* signed_index;
  const uint8_t* unsigned_index;
};

void adamw8bit_step(float* p, const float* g, uint8_t* m_codes, float* m_scale, uint8_t* r_codes, float* r_scale,
                    const float* signed_code, const float* unsigned_code, int64_t n, const AdamW8bitHyper& h,
                    int num_threads);

}  // namespace ldmfast::cpu
