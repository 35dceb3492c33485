// The CUDA LIF launchers of one storage type: defined for every type in lif_cuda_kernels.cuh,
// instantiated once per type by lif_cuda_<type>.cu, called by lif_cuda.cu's dispatch on Storage.
// Same arguments and results as lif_cuda.h's functions of that type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lif_cuda.h"

namespace htakl {

template <typename scalar_t>
struct LifCudaLaunch {
  static cudaError_t forward(const LifForwardArgs& args, const LifParams<double>& params,
                             cudaStream_t stream);
  static int64_t backward_checkpoint_rows(const LifBackwardArgs& args);
  static cudaError_t backward(const LifBackwardArgs& args, const LifParams<double>& params,
                              cudaStream_t stream);
};

}  // namespace htakl
