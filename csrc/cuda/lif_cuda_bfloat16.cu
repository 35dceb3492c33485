// The bfloat16 LIF kernels and their launchers (lif_cuda_kernels.cuh).
#include "lif_cuda_kernels.cuh"

template struct htakl::LifCudaLaunch<__nv_bfloat16>;
