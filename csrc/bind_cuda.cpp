// ldmfast._cuda: pybind11 bindings of the CUDA kernels. Tensors cross as integer addresses and the
// stream as its handle; the CUDA runtime is linked statically, so no libtorch and no libcudart
// of a particular version is needed at import time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>

#include <array>
#include <string>

#include "attention.cuh"
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
  mod.def("build_info", &build_info, "Compiled architectures and CUDA runtime/driver versions");
}
