// Launchers of the CUDA multi-step LIF kernels (lif_cuda.cu; the kernels: lif_cuda_kernels.cuh).
// Torch-free: the binding (lif_cuda_binding.cpp) passes raw pointers, the storage type of every
// tensor of the call (common.h; the state is its acc_t) and the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../lif_math.h"

namespace htakl {

// All tensors are contiguous: x, spikes, v_seq [steps, neurons]; v_init, v_last [neurons].
struct LifForwardArgs {
  const void* x;
  const void* v_init;
  void* spikes;
  void* v_last;
  void* v_seq;  // nullptr: not wanted
  int64_t steps;
  int64_t neurons;
};

struct LifBackwardArgs {
  const void* grad_spikes;  // nullptr: zero gradient
  const void* grad_v_last;  // nullptr: zero gradient
  const void* grad_v_seq;   // nullptr: zero gradient
  const void* x;
  const void* v_init;
  void* grad_x;
  void* grad_v_init;
  // [lif_backward_checkpoint_rows(...), neurons] in the state type (float, or double for
  // float64): V at the start of each recomputed segment; nullptr when that is 0 rows.
  void* checkpoints;
  int64_t steps;
  int64_t neurons;
};

// Rows of the checkpoint buffer lif_backward_cuda needs for these arguments (their pointers and
// shape; `checkpoints` is not read): 0 while the sequence fits in the kernel's registers.
int64_t lif_backward_checkpoint_rows(Storage storage, const LifBackwardArgs& args);

// Both return the launch's error code (cudaSuccess when nothing had to run).
cudaError_t lif_forward_cuda(Storage storage, const LifForwardArgs& args,
                             const LifParams<double>& params, cudaStream_t stream);
cudaError_t lif_backward_cuda(Storage storage, const LifBackwardArgs& args,
                              const LifParams<double>& params, cudaStream_t stream);

}  // namespace htakl
