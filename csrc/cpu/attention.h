// Flash-style attention on the CPU: online softmax over key tiles, fp32 accumulation, memory linear
// in the sequence lengths. q: (B, H, Lq, D), k, v: (B, H, Lk, D), out like q; lse: dense (B, H, Lq).
#pragma once
#include <cstdint>

#include "attention_shape.h"
#include "dtype.h"
#include "tensor_ref.h"

namespace ldmfast::cpu {

// The entry points pick, once, the variant built for the best instruction set the CPU has.

void attention_forward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                       const TensorRef4& out, float* lse, const AttentionShape& shape, int num_threads);

// Gradients for q, k and v given dout and the forward's out and lse.
void attention_backward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                        const TensorRef4& out, const TensorRef4& dout, const float* lse, const TensorRef4& dq,
                        const TensorRef4& dk, const TensorRef4& dv, const AttentionShape& shape, int num_threads);

// The variants: attention.cpp compiled for the baseline ISA, and for AVX2+FMA and AVX-512 on x86-64.
#define LDMFAST_ATTENTION_VARIANT(isa)                                                                 \
  namespace isa {                                                                                      \
  void attention_forward(DType, const TensorRef4&, const TensorRef4&, const TensorRef4&, const TensorRef4&, \
                         float*, const AttentionShape&, int);                                           \
  void attention_backward(DType, const TensorRef4&, const TensorRef4&, const TensorRef4&, const TensorRef4&, \
                          const TensorRef4&, const float*, const TensorRef4&, const TensorRef4&,        \
                          const TensorRef4&, const AttentionShape&, int);                               \
  }
LDMFAST_ATTENTION_VARIANT(baseline)
#if defined(__x86_64__)
LDMFAST_ATTENTION_VARIANT(avx2)
LDMFAST_ATTENTION_VARIANT(avx512)
#endif
#undef LDMFAST_ATTENTION_VARIANT

}  // namespace ldmfast::cpu
