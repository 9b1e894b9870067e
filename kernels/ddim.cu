// Fused DDIM update: one read of x_t, the model output and the noise, one write of x_prev (and of
// x0_hat when asked), 16-byte vector accesses when sizes and addresses allow.
#include "cuda_common.cuh"
#include "ops.cuh"

namespace ldmfast::cuda {
namespace {

struct DdimArgs {
  const float* coef;
  int64_t m;          // elements per sample
  float clip_value;
  bool clip;
};

__device__ __forceinline__ float ddim_x0(const float* c, float x, float o, const DdimArgs& a) {
  float x0 = c[C_X0_X] * x + c[C_X0_OUT] * o;
  if (a.clip) x0 = fminf(fmaxf(x0, -a.clip_value), a.clip_value);
  return x0;
}

template <typename T, bool kNoise, bool kWriteX0>
__global__ void ddim_vec_kernel(const T* __restrict__ x, const T* __restrict__ o, const T* __restrict__ nz,
                                T* __restrict__ y, T* __restrict__ x0_out, int64_t n_vec, DdimArgs a) {
  using V = Vec16<T>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_vec) return;
  // m is a multiple of the vector size, so a vector never straddles two samples.
  const float* c = a.coef + ((i * V::kSize) / a.m) * DDIM_COEF_STRIDE;
  const V xv = reinterpret_cast<const V*>(x)[i];
  const V ov = reinterpret_cast<const V*>(o)[i];
  V nv;
  if constexpr (kNoise) nv = reinterpret_cast<const V*>(nz)[i];
  V yv, x0v;
#pragma unroll
  for (int k = 0; k < V::kSize; ++k) {
    const float xf = to_float(xv.v[k]), of = to_float(ov.v[k]);
    const float x0 = ddim_x0(c, xf, of, a);
    float prev = c[C_PREV_X0] * x0 + c[C_PREV_EPS] * (c[C_EPS_X] * xf + c[C_EPS_OUT] * of);
    if constexpr (kNoise) prev += c[C_PREV_NOISE] * to_float(nv.v[k]);
    yv.v[k] = from_float<T>(prev);
    if constexpr (kWriteX0) x0v.v[k] = from_float<T>(x0);
  }
  reinterpret_cast<V*>(y)[i] = yv;
  if constexpr (kWriteX0) reinterpret_cast<V*>(x0_out)[i] = x0v;
}

template <typename T, bool kNoise, bool kWriteX0>
__global__ void ddim_scalar_kernel(const T* __restrict__ x, const T* __restrict__ o, const T* __restrict__ nz,
                                   T* __restrict__ y, T* __restrict__ x0_out, int64_t total, DdimArgs a) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const float* c = a.coef + (i / a.m) * DDIM_COEF_STRIDE;
  const float xf = to_float(x[i]), of = to_float(o[i]);
  const float x0 = ddim_x0(c, xf, of, a);
  float prev = c[C_PREV_X0] * x0 + c[C_PREV_EPS] * (c[C_EPS_X] * xf + c[C_EPS_OUT] * of);
  if constexpr (kNoise) prev += c[C_PREV_NOISE] * to_float(nz[i]);
  y[i] = from_float<T>(prev);
  if constexpr (kWriteX0) x0_out[i] = from_float<T>(x0);
}

template <typename T, bool kNoise, bool kWriteX0>
void launch(const void* x, const void* o, const void* nz, void* y, void* x0, int64_t total, const DdimArgs& a,
            cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kVec = Vec16<T>::kSize;
  const bool vec = a.m % kVec == 0 && aligned16(x) && aligned16(o) && aligned16(y) &&
                   (!kNoise || aligned16(nz)) && (!kWriteX0 || aligned16(x0));
  const auto* xt = static_cast<const T*>(x);
  const auto* ot = static_cast<const T*>(o);
  const auto* nt = static_cast<const T*>(nz);
  auto* yt = static_cast<T*>(y);
  auto* x0t = static_cast<T*>(x0);
  if (vec) {
    const int64_t n_vec = total / kVec;
    const auto blocks = static_cast<unsigned>((n_vec + kThreads - 1) / kThreads);
    ddim_vec_kernel<T, kNoise, kWriteX0><<<blocks, kThreads, 0, stream>>>(xt, ot, nt, yt, x0t, n_vec, a);
  } else {
    const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
    ddim_scalar_kernel<T, kNoise, kWriteX0><<<blocks, kThreads, 0, stream>>>(xt, ot, nt, yt, x0t, total, a);
  }
}

template <typename T>
void launch_flags(const void* x, const void* o, const void* nz, void* y, void* x0, int64_t total,
                  const DdimArgs& a, cudaStream_t stream) {
  if (nz && x0) launch<T, true, true>(x, o, nz, y, x0, total, a, stream);
  else if (nz) launch<T, true, false>(x, o, nz, y, x0, total, a, stream);
  else if (x0) launch<T, false, true>(x, o, nz, y, x0, total, a, stream);
  else launch<T, false, false>(x, o, nz, y, x0, total, a, stream);
}

}  // namespace

cudaError_t ddim_step(DType dtype, const void* x_t, const void* out, const void* noise, const float* coef,
                      void* x_prev, void* x0_out, int64_t n, int64_t m, bool clip, float clip_value,
                      cudaStream_t stream) {
  const int64_t total = n * m;
  if (total == 0) return cudaSuccess;
  const DdimArgs a{coef, m, clip_value, clip};
  switch (dtype) {
    case DType::Float32: launch_flags<float>(x_t, out, noise, x_prev, x0_out, total, a, stream); break;
    case DType::Float16: launch_flags<__half>(x_t, out, noise, x_prev, x0_out, total, a, stream); break;
    case DType::BFloat16: launch_flags<__nv_bfloat16>(x_t, out, noise, x_prev, x0_out, total, a, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace ldmfast::cuda
