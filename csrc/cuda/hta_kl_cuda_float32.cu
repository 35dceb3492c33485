// The float32 HTA-KL kernels and their launcher (hta_kl_cuda_kernels.cuh).
#include "hta_kl_cuda_kernels.cuh"

template struct htakl::HtaKlCudaLaunch<float>;
