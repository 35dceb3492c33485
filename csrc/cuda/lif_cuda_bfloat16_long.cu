// The bfloat16 LIF backward with the long segment (lif_cuda_kernels.cuh, lif_cuda_launch.h): a file of
// its own for the compile time of its fully unrolled segment.
#include "lif_cuda_kernels.cuh"

template struct htakl::LifCudaBackward<__nv_bfloat16, htakl::LifBackwardKernel::kLongSegment>;
