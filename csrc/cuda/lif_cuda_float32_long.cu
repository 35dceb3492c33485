// The float32 LIF backward with the long segment (lif_cuda_kernels.cuh, lif_cuda_launch.h): a file of
// its own for the compile time of its fully unrolled segment.
#include "lif_cuda_kernels.cuh"

template struct htakl::LifCudaBackward<float, htakl::LifBackwardKernel::kLongSegment>;
