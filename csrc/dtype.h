// Element types shared by the CPU and CUDA modules and the Python side (ldmfast/ops/_native.py).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace ldmfast {

// Must match ldmfast.ops._native.DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline DType dtype_from_code(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("ldmfast: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

// Per-sample coefficients of the DDIM update, written by ldmfast/ops/ddim.py (_ddim_coefficients):
//   x0  = C_X0_X * x_t + C_X0_OUT * out      (then optionally clamped)
//   eps = C_EPS_X * x_t + C_EPS_OUT * out
//   x_prev = C_PREV_X0 * x0 + C_PREV_EPS * eps + C_PREV_NOISE * noise
// Padded to 8 floats so that each sample's row is 32-byte aligned.
enum DdimCoef : int {
  C_X0_X = 0, C_X0_OUT, C_EPS_X, C_EPS_OUT, C_PREV_X0, C_PREV_EPS, C_PREV_NOISE, DDIM_COEF_STRIDE = 8
};

}  // namespace ldmfast
