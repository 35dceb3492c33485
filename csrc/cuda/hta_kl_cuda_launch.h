// The CUDA HTA-KL launchers of one storage type: defined for every type in
// hta_kl_cuda_kernels.cuh, instantiated once per type by hta_kl_cuda_<type>.cu, called by
// hta_kl_cuda.cu's dispatch on Storage. Same arguments and results as hta_kl_cuda.h's functions
// of that type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hta_kl_cuda.h"

namespace htakl {

template <typename scalar_t>
struct HtaKlCudaLaunch {
  static cudaError_t fused(const HtaKlCudaProblem& problem, cudaStream_t stream);
  static int64_t max_steps(cudaError_t* error);
};

}  // namespace htakl
