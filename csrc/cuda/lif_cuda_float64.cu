// The float64 LIF kernels and their launchers (lif_cuda_kernels.cuh), but the long-segment backward,
// which lif_cuda_float64_long.cu compiles (the extern declaration keeps it from being compiled here).
#include "lif_cuda_kernels.cuh"

extern template struct htakl::LifCudaBackward<double, htakl::LifBackwardKernel::kLongSegment>;
template struct htakl::LifCudaLaunch<double>;
template struct htakl::LifCudaBackward<double, htakl::LifBackwardKernel::kOneNeuron>;
template struct htakl::LifCudaBackward<double, htakl::LifBackwardKernel::kShortSegment>;
