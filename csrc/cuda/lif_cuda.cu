// lif_cuda.h's torch-free entry points: each picks the launchers of its storage type
// (LifCudaLaunch, compiled in lif_cuda_<type>.cu from lif_cuda_kernels.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lif_cuda.h"
#include "lif_cuda_launch.h"

namespace htakl {
namespace {

template <typename Body>
cudaError_t with_storage(Storage storage, Body&& body) {
  switch (storage) {
    case Storage::kFloat16: return body(__half{});
    case Storage::kBFloat16: return body(__nv_bfloat16{});
    case Storage::kFloat32: return body(float{});
    case Storage::kFloat64: return body(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t lif_backward_checkpoint_rows(Storage storage, const LifBackwardArgs& args) {
  int64_t rows = 0;
  with_storage(storage, [&](auto zero) {
    rows = LifCudaLaunch<decltype(zero)>::backward_checkpoint_rows(args);
    return cudaSuccess;
  });
  return rows;
}

cudaError_t lif_forward_cuda(Storage storage, const LifForwardArgs& args,
                             const LifParams<double>& params, cudaStream_t stream) {
  if (args.neurons == 0) return cudaSuccess;
  return with_storage(storage, [&](auto zero) {
    return LifCudaLaunch<decltype(zero)>::forward(args, params, stream);
  });
}

cudaError_t lif_backward_cuda(Storage storage, const LifBackwardArgs& args,
                              const LifParams<double>& params, cudaStream_t stream) {
  if (args.neurons == 0) return cudaSuccess;
  return with_storage(storage, [&](auto zero) {
    return LifCudaLaunch<decltype(zero)>::backward(args, params, stream);
  });
}

}  // namespace htakl
