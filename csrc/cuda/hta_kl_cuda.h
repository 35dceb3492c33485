// Torch-free launcher API of the CUDA HTA-KL kernel (csrc/cuda/hta_kl_cuda.cu; the kernel:
// hta_kl_cuda_kernels.cuh).
//
// Same contract as the op htakl::hta_kl_fused (docstring of htakl_kernels/_ops/hta_kl.py): student
// [steps, rows, classes] and teacher [rows, classes], both contiguous (row r of step t starts at
// element (t * rows + r) * classes), one loss per row and, on request, the gradients of each row's
// own loss (upstream gradient 1, SPEC 2). The binding (hta_kl_cuda_binding.cpp) allocates the
// outputs and passes the current stream; this header needs only the CUDA runtime.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../hta_kl_math.h"

namespace htakl {

// The radix select counts a row's classes in 32-bit integers (shared-memory atomics).
constexpr int64_t kHtaKlCudaMaxClasses = (int64_t(1) << 31) - 1;

struct HtaKlCudaProblem {
  const void* student;  // [steps, rows, classes]
  const void* teacher;  // [rows, classes]
  void* loss_rows;      // [rows], in the storage type's acc_t (common.h)
  void* grad_student;   // [steps, rows, classes], or nullptr: not computed
  void* grad_teacher;   // [rows, classes], or nullptr: not computed
  int64_t steps;        // T >= 1 (2-D students come in as T = 1)
  int64_t rows;         // R >= 0
  int64_t classes;      // 1 <= C <= kHtaKlCudaMaxClasses
  HtaKlOptions options;
};

// Enqueues the fused forward (+ gradients) on `stream`. Returns cudaErrorInvalidValue for sizes
// outside the contract, or when `steps` is too large for the per-step values kept in shared memory
// (hta_kl_cuda_max_steps); otherwise the launch's error, if any.
// `dtype` is the storage type of student, teacher and the gradients.
cudaError_t hta_kl_fused_cuda(Storage dtype, const HtaKlCudaProblem& problem,
                              cudaStream_t stream);

// The largest T the kernel accepts for this dtype on the current device, whatever C (tens of
// thousands on sm_80 and later), or -1 with the CUDA error in *error when the device cannot be queried.
int64_t hta_kl_cuda_max_steps(Storage dtype, cudaError_t* error);

}  // namespace htakl
