// One kernel launch, written for any C++ compiler: the launch kernel<<<blocks, threads,
// shared_bytes, stream>>>(args...) makes, through cudaLaunchKernel. nvcc builds the same launch
// either way; a host compiler reads this one too, which lets tests/cuda/host run the launchers
// and their kernels on a CPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <tuple>
#include <utility>

namespace htakl {

// The arguments are converted to the kernel's parameter types first, as a call would convert
// them; cudaLaunchKernel copies them from there before it returns.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads,
                          size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  std::tuple<Params...> values(std::forward<Args>(args)...);
  return std::apply(
      [&](auto&... value) {
        void* pointers[] = {static_cast<void*>(&value)...};
        return cudaLaunchKernel(kernel, dim3(blocks), dim3(threads), pointers, shared_bytes,
                                stream);
      },
      values);
}

}  // namespace htakl
