// The float16 LIF kernels and their launchers (lif_cuda_kernels.cuh), but the long-segment backward,
// which lif_cuda_float16_long.cu compiles (the extern declaration keeps it from being compiled here).
#include "lif_cuda_kernels.cuh"

extern template struct htakl::LifCudaBackward<__half, htakl::LifBackwardKernel::kLongSegment>;
template struct htakl::LifCudaLaunch<__half>;
template struct htakl::LifCudaBackward<__half, htakl::LifBackwardKernel::kOneNeuron>;
template struct htakl::LifCudaBackward<__half, htakl::LifBackwardKernel::kShortSegment>;
