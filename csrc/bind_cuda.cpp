// ldmfast._cuda: pybind11 bindings of the CUDA kernels. Tensors cross as integer addresses and the
// stream as its handle; the CUDA runtime is linked statically, so no libtorch and no libcudart
// of a particular version is needed at import time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>

#include <array>
#include <string>

#include "attention.cuh"
#include "group_norm.cuh"
#include "ops.cuh"

namespace py = pybind11;
using namespace ldmfast;

namespace {

template <typename T = void>
T* as_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("ldmfast._cuda.") + what + ": " + cudaGetErrorString(err));
}

void ddim_step(int device, uintptr_t stream, int dtype, uintptr_t x_t, uintptr_t out, uintptr_t noise,
               uintptr_t coef, uintptr_t x_prev, uintptr_t x0_out, int64_t n, int64_t m, bool clip,
               float clip_value) {
  check(cudaSetDevice(device), "ddim_step");
  check(cuda::ddim_step(dtype_from_code(dtype), as_ptr(x_t), as_ptr(out), as_ptr(noise), as_ptr<const float>(coef),
                        as_ptr(x_prev), as_ptr(x0_out), n, m, clip, clip_value, as_ptr<CUstream_st>(stream)),
        "ddim_step");
}

using Ref = std::array<int64_t, 5>;  // (address, 4 strides)

void attention_forward(int device, uintptr_t stream, int dtype, const Ref& q, const Ref& k, const Ref& v,
                       const Ref& out, uintptr_t lse, int64_t b, int64_t h, int64_t lq, int64_t lk, int64_t d,
                       float scale) {
  check(cudaSetDevice(device), "attention_forward");
  check(cuda::attention_forward(dtype_from_code(dtype), TensorRef4::from(q), TensorRef4::from(k), TensorRef4::from(v),
                                TensorRef4::from(out), as_ptr<float>(lse), {b, h, lq, lk, d, scale},
                                as_ptr<CUstream_st>(stream)),
        "attention_forward");
}

size_t group_norm_workspace(int dtype, int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last,
                            bool backward) {
  return cuda::group_norm_workspace_floats(dtype_from_code(dtype), n, c, s, groups, channels_last, backward);
}

// weight or bias 0: absent (1 and 0); their dtype codes may differ from x's.
cuda::Affine affine(uintptr_t weight, int weight_dtype, uintptr_t bias, int bias_dtype) {
  return {as_ptr<const void>(weight), as_ptr<const void>(bias), dtype_from_code(weight_dtype),
          dtype_from_code(bias_dtype)};
}

void group_norm_forward(int device, uintptr_t stream, int dtype, uintptr_t x, uintptr_t weight, int weight_dtype,
                        uintptr_t bias, int bias_dtype, uintptr_t y, uintptr_t mean, uintptr_t rstd,
                        uintptr_t workspace, int64_t n, int64_t c, int64_t s, int64_t groups, float eps, bool silu,
                        bool channels_last) {
  check(cudaSetDevice(device), "group_norm_forward");
  check(cuda::group_norm_forward(dtype_from_code(dtype), as_ptr(x), affine(weight, weight_dtype, bias, bias_dtype),
                                 as_ptr(y), as_ptr<float>(mean), as_ptr<float>(rstd),
                                 as_ptr<float>(workspace), n, c, s, groups, eps, silu, channels_last,
                                 as_ptr<CUstream_st>(stream)),
        "group_norm_forward");
}

void group_norm_backward(int device, uintptr_t stream, int dtype, uintptr_t dy, uintptr_t x, uintptr_t weight,
                         int weight_dtype, uintptr_t bias, int bias_dtype, uintptr_t mean, uintptr_t rstd,
                         uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, int64_t n, int64_t c,
                         int64_t s, int64_t groups, bool silu, bool channels_last) {
  check(cudaSetDevice(device), "group_norm_backward");
  check(cuda::group_norm_backward(dtype_from_code(dtype), as_ptr(dy), as_ptr(x),
                                  affine(weight, weight_dtype, bias, bias_dtype), as_ptr<const float>(mean),
                                  as_ptr<const float>(rstd),
                                  as_ptr(dx), as_ptr<float>(dweight), as_ptr<float>(dbias), as_ptr<float>(workspace),
                                  n, c, s, groups, silu, channels_last, as_ptr<CUstream_st>(stream)),
        "group_norm_backward");
}

void group_norm_set_tuning(int fused_threads, int64_t target_blocks, int64_t min_per_block, int64_t min_rows,
                           int64_t min_per_warp, bool fused, int64_t target_blocks_cl, int64_t fused_min_groups,
                           bool fused_16bit, int map_items_16bit, bool fit_waves, bool fused_backward,
                           int64_t l2_chunk_bytes) {
  if (!cuda::group_norm_set_tuning(fused_threads, target_blocks, min_per_block, min_rows, min_per_warp, fused,
                                   target_blocks_cl, fused_min_groups, fused_16bit, map_items_16bit, fit_waves,
                                   fused_backward, l2_chunk_bytes)) {
    throw py::value_error("group_norm_set_tuning: fused_threads must be a multiple of 32 in [0, 512], "
                          "map_items_16bit 0, 2 or 4, and the other sizes >= 0");
  }
}

py::dict build_info() {
  py::dict info;
  info["architectures"] = std::string(LDMFAST_CUDA_ARCHS);
  info["cuda_runtime"] = CUDART_VERSION;
  int driver = 0;
  info["cuda_driver"] = cudaDriverGetVersion(&driver) == cudaSuccess ? driver : -1;
  return info;
}

}  // namespace

PYBIND11_MODULE(_cuda, mod) {
  mod.doc() = "ldmfast CUDA kernels (raw pointers and stream handles, no libtorch)";
  mod.def("ddim_step", &ddim_step, py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("x_t"),
          py::arg("out"), py::arg("noise"), py::arg("coef"), py::arg("x_prev"), py::arg("x0_out"), py::arg("n"),
          py::arg("m"), py::arg("clip"), py::arg("clip_value"), py::call_guard<py::gil_scoped_release>(),
          "Fused DDIM update over n samples of m elements on the given stream (null pointer = absent).");
  mod.def("attention_forward", &attention_forward, py::call_guard<py::gil_scoped_release>(),
          "Flash-style attention forward on CUDA cores; tensors as (address, 4 strides); writes out and lse.");
  mod.def("group_norm_workspace", &group_norm_workspace,
          "Floats of device workspace that group_norm_forward/backward need for these sizes.");
  mod.def("group_norm_forward", &group_norm_forward, py::call_guard<py::gil_scoped_release>(),
          "GroupNorm (+ SiLU) forward on the given stream; writes y, mean, rstd. weight/bias: address "
          "(0: absent) and dtype code each.");
  mod.def("group_norm_backward", &group_norm_backward, py::call_guard<py::gil_scoped_release>(),
          "GroupNorm (+ SiLU) backward on the given stream; writes dx, dweight, dbias (float32).");
  mod.def("group_norm_set_tuning", &group_norm_set_tuning, py::arg("fused_threads") = 0,
          py::arg("target_blocks") = 0, py::arg("min_per_block") = 0, py::arg("min_rows") = 0,
          py::arg("min_per_warp") = 0, py::arg("fused") = true, py::arg("target_blocks_cl") = 0,
          py::arg("fused_min_groups") = 0, py::arg("fused_16bit") = true,
          py::arg("map_items_16bit") = 0, py::arg("fit_waves") = true, py::arg("fused_backward") = false,
          py::arg("l2_chunk_bytes") = 0,
          "GroupNorm launch settings for later calls (0: default); for bench/sweep_group_norm_cuda.py.");
  mod.def("build_info", &build_info, "Compiled architectures and CUDA runtime/driver versions");
}
