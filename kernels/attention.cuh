// Host entry of the CUDA attention forward (see kernels/attention.cu).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "attention_shape.h"
#include "dtype.h"
#include "tensor_ref.h"

namespace ldmfast::cuda {

// out = softmax(scale q k^T) v and lse (dense (B, H, Lq) fp32), on `stream`.
cudaError_t attention_forward(DType dtype, const TensorRef4& q, const TensorRef4& k, const TensorRef4& v,
                              const TensorRef4& out, float* lse, const AttentionShape& dims, cudaStream_t stream);

}  // namespace ldmfast::cuda
