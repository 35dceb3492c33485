// hta_kl_cuda.h's torch-free entry points: each picks the launcher of its storage type
// (HtaKlCudaLaunch, compiled in hta_kl_cuda_<type>.cu from hta_kl_cuda_kernels.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "hta_kl_cuda.h"
#include "hta_kl_cuda_launch.h"

namespace htakl {

cudaError_t hta_kl_fused_cuda(Storage dtype, const HtaKlCudaProblem& problem,
                              cudaStream_t stream) {
  switch (dtype) {
    case Storage::kFloat32: return HtaKlCudaLaunch<float>::fused(problem, stream);
    case Storage::kFloat64: return HtaKlCudaLaunch<double>::fused(problem, stream);
    case Storage::kFloat16: return HtaKlCudaLaunch<__half>::fused(problem, stream);
    case Storage::kBFloat16: return HtaKlCudaLaunch<__nv_bfloat16>::fused(problem, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t hta_kl_cuda_max_steps(Storage dtype, cudaError_t* error) {
  switch (dtype) {
    case Storage::kFloat32: return HtaKlCudaLaunch<float>::max_steps(error);
    case Storage::kFloat64: return HtaKlCudaLaunch<double>::max_steps(error);
    case Storage::kFloat16: return HtaKlCudaLaunch<__half>::max_steps(error);
    case Storage::kBFloat16: return HtaKlCudaLaunch<__nv_bfloat16>::max_steps(error);
  }
  *error = cudaErrorInvalidValue;
  return -1;
}

}  // namespace htakl
