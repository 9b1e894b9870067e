// Sizes of an attention call, shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

namespace ldmfast {

struct AttentionShape {
  int64_t batch, heads, lq, lk, dim;
  float scale;
};

}  // namespace ldmfast
