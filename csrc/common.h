// What every kernel file shares, CPU and CUDA: the host/device function macro, the storage types
// a call's tensors may have, the accumulation type of each and the conversions between the two.
//
// Torch-free on purpose: the CUDA translation units include it without torch headers. The CPU
// kernels' 16-bit types (c10::Half, c10::BFloat16) convert through their own conversion operators
// (the generic to_acc / from_acc below); CUDA's __half and __nv_bfloat16 have overloads here.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define HTAKL_HD __host__ __device__ __forceinline__
#else
#define HTAKL_HD inline
#endif

namespace htakl {

// The dtype the tensors of one call are stored in, as the torch-free launchers take it.
enum class Storage : int32_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The type a kernel computes and accumulates in: double for double storage, float otherwise
// (float, float16, bfloat16), in every backend.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Storage -> accumulation: exact (every storage value is representable in its acc_t).
template <typename T>
HTAKL_HD acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}

// Accumulation -> storage: rounded to nearest even. Call as from_acc<T>(x).
template <typename T>
HTAKL_HD T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}

#if defined(__CUDACC__)
// CUDA's 16-bit types: explicit conversions (the build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, as torch's does, so the casts above would not compile).
HTAKL_HD float to_acc(__half x) { return __half2float(x); }
HTAKL_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
HTAKL_HD __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
HTAKL_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

}  // namespace htakl
