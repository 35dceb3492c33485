// The bfloat16 LIF kernels and their launchers (lif_cuda_kernels.cuh), but the long-segment backward,
// which lif_cuda_bfloat16_long.cu compiles (the extern declaration keeps it from being compiled here).
#include "lif_cuda_kernels.cuh"

extern template struct htakl::LifCudaBackward<__nv_bfloat16, htakl::LifBackwardKernel::kLongSegment>;
template struct htakl::LifCudaLaunch<__nv_bfloat16>;
template struct htakl::LifCudaBackward<__nv_bfloat16, htakl::LifBackwardKernel::kOneNeuron>;
template struct htakl::LifCudaBackward<__nv_bfloat16, htakl::LifBackwardKernel::kShortSegment>;
