// Run-time choice between the attention variants (attention.cpp built per instruction set).
#include "cpu/attention.h"
#include "cpu/isa.h"

namespace ldmfast::cpu {

void attention_forward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                       const TensorRef4& out, float* lse, const AttentionShape& shape, int num_threads) {
#if defined(__x86_64__)
  if (isa_level() >= 2) return avx512::attention_forward(dtype, q, k, v, out, lse, shape, num_threads);
  if (isa_level() >= 1) return avx2::attention_forward(dtype, q, k, v, out, lse, shape, num_threads);
#endif
  baseline::attention_forward(dtype, q, k, v, out, lse, shape, num_threads);
}

void attention_backward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                        const TensorRef4& out, const TensorRef4& dout, const float* lse, const TensorRef4& dq,
                        const TensorRef4& dk, const TensorRef4& dv, const AttentionShape& shape, int num_threads) {
#if defined(__x86_64__)
  if (isa_level() >= 2)
    return avx512::attention_backward(dtype, q, k, v, out, dout, lse, dq, dk, dv, shape, num_threads);
  if (isa_level() >= 1) return avx2::attention_backward(dtype, q, k, v, out, dout, lse, dq, dk, dv, shape, num_threads);
#endif
  baseline::attention_backward(dtype, q, k, v, out, dout, lse, dq, dk, dv, shape, num_threads);
}

}  // namespace ldmfast::cpu
