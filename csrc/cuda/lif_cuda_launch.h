// The CUDA LIF launchers of one storage type: defined for every type in lif_cuda_kernels.cuh,
// instantiated once per type by lif_cuda_<type>.cu, called by lif_cuda.cu's dispatch on Storage.
// Same arguments and results as lif_cuda.h's functions of that type. The backward with the long
// segment, a fully unrolled kernel that takes ptxas as long as the rest of the type together,
// compiles in a file of its own, lif_cuda_<type>_long.cu, so that no file takes much over 20 s.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lif_cuda.h"

namespace htakl {

// The backward kernels of a type (lif_cuda_kernels.cuh's with_backward_kernel picks one).
enum class LifBackwardKernel {
  kOneNeuron,     // one neuron per thread: rows not 16-byte aligned
  kShortSegment,  // 16-byte groups of neurons, H of the short segment in registers
  kLongSegment,   // the same with the long segment
};

template <typename scalar_t, LifBackwardKernel kKernel>
struct LifCudaBackward {
  static cudaError_t launch(const LifBackwardArgs& args, const LifParams<double>& params,
                            cudaStream_t stream);
};

template <typename scalar_t>
struct LifCudaLaunch {
  static cudaError_t forward(const LifForwardArgs& args, const LifParams<double>& params,
                             cudaStream_t stream);
  static int64_t backward_checkpoint_rows(const LifBackwardArgs& args);
  static cudaError_t backward(const LifBackwardArgs& args, const LifParams<double>& params,
                              cudaStream_t stream);
};

}  // namespace htakl
