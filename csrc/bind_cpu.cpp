// ldmfast._C: pybind11 bindings of the CPU kernels. Tensors cross as integer addresses; the GIL is
// released while a kernel runs so that data loading threads keep going.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cpu/attention.h"
#include "cpu/group_norm.h"
#include "cpu/half.h"
#include "cpu/ops.h"

namespace py = pybind11;
using namespace ldmfast;

namespace {

template <typename T = void>
T* as_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void ddim_step(int dtype, uintptr_t x_t, uintptr_t out, uintptr_t noise, uintptr_t coef, uintptr_t x_prev,
               uintptr_t x0_out, int64_t n, int64_t m, bool clip, float clip_value, int num_threads) {
  cpu::ddim_step(dtype_from_code(dtype), as_ptr(x_t), as_ptr(out), as_ptr(noise), as_ptr<const float>(coef),
                 as_ptr(x_prev), as_ptr(x0_out), n, m, clip, clip_value, num_threads);
}

using Ref = std::array<int64_t, 5>;  // (address, 4 strides)

void attention_forward(int dtype, const Ref& q, const Ref& k, const Ref& v, const Ref& out, uintptr_t lse,
                       int64_t b, int64_t h, int64_t lq, int64_t lk, int64_t d, float scale, int num_threads) {
  cpu::attention_forward(dtype_from_code(dtype), TensorRef4::from(q), TensorRef4::from(k), TensorRef4::from(v),
                         TensorRef4::from(out), as_ptr<float>(lse), {b, h, lq, lk, d, scale}, num_threads);
}

void attention_backward(int dtype, const Ref& q, const Ref& k, const Ref& v, const Ref& out, const Ref& dout,
                        uintptr_t lse, const Ref& dq, const Ref& dk, const Ref& dv, int64_t b, int64_t h,
                        int64_t lq, int64_t lk, int64_t d, float scale, int num_threads) {
  cpu::attention_backward(dtype_from_code(dtype), TensorRef4::from(q), TensorRef4::from(k), TensorRef4::from(v),
                          TensorRef4::from(out), TensorRef4::from(dout), as_ptr<const float>(lse),
                          TensorRef4::from(dq), TensorRef4::from(dk), TensorRef4::from(dv), {b, h, lq, lk, d, scale},
                          num_threads);
}

// A GroupNorm affine parameter as the kernels take it (float32): the tensor at `address` (0 for
// none: `absent` everywhere) in the dtype of `code`, converted here rather than in Python (two
// conversions there cost ~2 us each of host time per call with 16-bit parameters, as under autocast).
template <typename T>
void widen(uintptr_t address, int64_t c, float* out) {
  for (int64_t i = 0; i < c; ++i) out[i] = to_float(as_ptr<const T>(address)[i]);
}

const float* affine_f32(uintptr_t address, int code, int64_t c, float absent, std::vector<float>& buf) {
  if (address == 0) {
    buf.assign(static_cast<size_t>(c), absent);
    return buf.data();
  }
  switch (dtype_from_code(code)) {
    case DType::Float32: return as_ptr<const float>(address);
    case DType::Float16: buf.resize(static_cast<size_t>(c)); widen<half_t>(address, c, buf.data()); break;
    case DType::BFloat16: buf.resize(static_cast<size_t>(c)); widen<bfloat16_t>(address, c, buf.data()); break;
  }
  return buf.data();
}

void group_norm_forward(int dtype, uintptr_t x, uintptr_t weight, int weight_code, uintptr_t bias, int bias_code,
                        uintptr_t y, uintptr_t mean, uintptr_t rstd, int64_t n, int64_t c, int64_t s, int64_t groups,
                        float eps, bool silu, bool channels_last, int num_threads) {
  std::vector<float> wbuf, bbuf;
  cpu::group_norm_forward(dtype_from_code(dtype), as_ptr(x), affine_f32(weight, weight_code, c, 1.0f, wbuf),
                          affine_f32(bias, bias_code, c, 0.0f, bbuf), as_ptr(y), as_ptr<float>(mean),
                          as_ptr<float>(rstd), n, c, s, groups, eps, silu, channels_last, num_threads);
}

void group_norm_backward(int dtype, uintptr_t dy, uintptr_t x, uintptr_t weight, int weight_code, uintptr_t bias,
                         int bias_code, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight,
                         uintptr_t dbias, int64_t n, int64_t c, int64_t s, int64_t groups, bool silu,
                         bool channels_last, int num_threads) {
  std::vector<float> wbuf, bbuf;
  cpu::group_norm_backward(dtype_from_code(dtype), as_ptr(dy), as_ptr(x), affine_f32(weight, weight_code, c, 1.0f, wbuf),
                           affine_f32(bias, bias_code, c, 0.0f, bbuf), as_ptr<const float>(mean),
                           as_ptr<const float>(rstd), as_ptr(dx), as_ptr<float>(dweight), as_ptr<float>(dbias), n, c,
                           s, groups, silu, channels_last, num_threads);
}

void adamw8bit_step(uintptr_t p, uintptr_t g, uintptr_t m_codes, uintptr_t m_scale, uintptr_t r_codes,
                    uintptr_t r_scale, uintptr_t signed_code, uintptr_t unsigned_code, int64_t n, float lr, float beta1,
                    float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float bc1, float bc2,
                    float decay_factor, uint32_t key_m, uint32_t key_v, uintptr_t signed_index,
                    uintptr_t unsigned_index, int num_threads) {
  const cpu::AdamW8bitHyper h{lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bc1, bc2, decay_factor,
                              key_m, key_v, as_ptr<const uint8_t>(signed_index),
                              as_ptr<const uint8_t>(unsigned_index)};
  cpu::adamw8bit_step(as_ptr<float>(p), as_ptr<const float>(g), as_ptr<uint8_t>(m_codes), as_ptr<float>(m_scale),
                      as_ptr<uint8_t>(r_codes), as_ptr<float>(r_scale), as_ptr<const float>(signed_code),
                      as_ptr<const float>(unsigned_code), n, h, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ldmfast CPU kernels (raw pointers, no libtorch)";
  mod.def("ddim_step", &ddim_step, py::arg("dtype"), py::arg("x_t"), py::arg("out"), py::arg("noise"),
          py::arg("coef"), py::arg("x_prev"), py::arg("x0_out"), py::arg("n"), py::arg("m"), py::arg("clip"),
          py::arg("clip_value"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "Fused DDIM update over n samples of m elements (null pointer = absent).");
  mod.def("attention_forward", &attention_forward, py::call_guard<py::gil_scoped_release>(),
          "Flash-style attention forward; tensors as (address, 4 strides); writes out and lse (B, H, Lq).");
  mod.def("attention_backward", &attention_backward, py::call_guard<py::gil_scoped_release>(),
          "Flash-style attention backward: dq, dk, dv from dout, out and lse.");
  mod.def("group_norm_forward", &group_norm_forward, py::call_guard<py::gil_scoped_release>(),
          "GroupNorm (+ SiLU) forward over (n, c, s) elements, contiguous or channels-last; weight and bias as "
          "(address or 0, dtype code); writes y, mean, rstd.");
  mod.def("adamw8bit_step", &adamw8bit_step, py::call_guard<py::gil_scoped_release>(),
          "One 8-bit AdamW step over a flat float32 parameter, in place (ldmfast/train/adamw8bit.py).");
  mod.def("group_norm_backward", &group_norm_backward, py::call_guard<py::gil_scoped_release>(),
          "GroupNorm (+ SiLU) backward; writes dx, dweight, dbias (float32).");
}
