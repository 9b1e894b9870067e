// A strided 4-D operand handed over from Python as (address, stride0..stride3), strides in elements.
#pragma once
#include <array>
#include <cstdint>

#if defined(__CUDACC__)
#define LDMFAST_HOST_DEVICE __host__ __device__
#else
#define LDMFAST_HOST_DEVICE
#endif

namespace ldmfast {

struct TensorRef4 {
  void* ptr;
  int64_t stride[4];

  static TensorRef4 from(const std::array<int64_t, 5>& r) {
    return TensorRef4{reinterpret_cast<void*>(static_cast<uintptr_t>(r[0])), {r[1], r[2], r[3], r[4]}};
  }
  LDMFAST_HOST_DEVICE int64_t offset(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3];
  }
};

}  // namespace ldmfast
