// Flash-style attention on the CPU: online softmax over key tiles, fp32 accumulation, memory linear
// in the sequence lengths. q: (B, H, Lq, D), k, v: (B, H, Lk, D), out like q; lse: dense (B, H, Lq).
#pragma once
#include <cstdint>

#include "attention_shape.h"
#include "dtype.h"
#include "tensor_ref.h"

namespace ldmfast::cpu {

void attention_forward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                       const TensorRef4& out, float* lse, const AttentionShape& shape, int num_threads);

// Gradients for q, k and v given dout and the forward's out and lse.
void attention_backward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                        const TensorRef4& out, const TensorRef4& dout, const float* lse, const TensorRef4& dq,
                        const TensorRef4& dk, const TensorRef4& dv, const AttentionShape& shape, int num_threads);

}  // namespace ldmfast::cpu
