// The float32 LIF kernels and their launchers (lif_cuda_kernels.cuh), but the long-segment backward,
// which lif_cuda_float32_long.cu compiles (the extern declaration keeps it from being compiled here).
#include "lif_cuda_kernels.cuh"

extern template struct htakl::LifCudaBackward<float, htakl::LifBackwardKernel::kLongSegment>;
template struct htakl::LifCudaLaunch<float>;
template struct htakl::LifCudaBackward<float, htakl::LifBackwardKernel::kOneNeuron>;
template struct htakl::LifCudaBackward<float, htakl::LifBackwardKernel::kShortSegment>;
