// CUDA implementation of the op htakl::hta_kl_fused (contract: htakl_kernels/hta_kl.py; schema:
// htakl_kernels/_ops.py). Checks the arguments, allocates the outputs and calls the torch-free
// launcher (hta_kl_cuda.h) on the current stream. Compiled only when the extension is built with
// CUDA (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cuda/hta_kl_cuda.h"

namespace {

htakl::HtaKlCudaDtype launcher_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return htakl::HtaKlCudaDtype::kFloat32;
    case at::kDouble: return htakl::HtaKlCudaDtype::kFloat64;
    case at::kHalf: return htakl::HtaKlCudaDtype::kFloat16;
    case at::kBFloat16: return htakl::HtaKlCudaDtype::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "hta_kl_fused (CUDA): student and teacher must be float16, bfloat16, float32 "
                     "or float64, got ", dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hta_kl_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double delta,
    bool logit_mean, bool detach_weights, bool grad_student, bool grad_teacher, double row_scale) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(),
              "hta_kl_fused (CUDA): student and teacher must be CUDA tensors, got student on ",
              student.device(), " and teacher on ", teacher.device());
  TORCH_CHECK(student.device() == teacher.device(),
              "hta_kl_fused (CUDA): student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "hta_kl_fused (CUDA): student and teacher must have the same dtype, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(teacher.dim() == 2, "hta_kl_fused (CUDA): teacher must be [R, C], got shape ",
              teacher.sizes());
  TORCH_CHECK(student.dim() == 3 && student.size(1) == teacher.size(0) &&
                  student.size(2) == teacher.size(1),
              "hta_kl_fused (CUDA): student must be [T, R, C] with teacher [R, C] = ",
              teacher.sizes(), ", got ", student.sizes());
  TORCH_CHECK(student.size(0) >= 1, "hta_kl_fused (CUDA): student's T must be >= 1");
  TORCH_CHECK(teacher.size(1) >= 1, "hta_kl_fused (CUDA): teacher must have C >= 1 classes");
  TORCH_CHECK(teacher.size(1) <= htakl::kHtaKlCudaMaxClasses,
              "hta_kl_fused (CUDA): teacher has C = ", teacher.size(1),
              " classes; the kernel counts a row's classes in 32 bits and takes at most ",
              htakl::kHtaKlCudaMaxClasses);
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(),
              "hta_kl_fused (CUDA): student and teacher must be contiguous");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "hta_kl_fused (CUDA): temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(delta > 0 && delta <= 1, "hta_kl_fused (CUDA): delta must be in (0, 1], got ",
              delta);
  TORCH_CHECK(row_scale > 0 && std::isfinite(row_scale),
              "hta_kl_fused (CUDA): row_scale must be a finite number > 0, got ", row_scale);
  const htakl::HtaKlCudaDtype dtype = launcher_dtype(teacher.scalar_type());

  const c10::cuda::CUDAGuard device_guard(teacher.device());
  const at::ScalarType loss_dtype =
      teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss_rows = at::empty({teacher.size(0)}, teacher.options().dtype(loss_dtype));
  at::Tensor d_student = at::empty(grad_student ? student.sizes() : at::IntArrayRef{0},
                                   student.options());
  at::Tensor d_teacher = at::empty(grad_teacher ? teacher.sizes() : at::IntArrayRef{0},
                                   teacher.options());

  htakl::HtaKlCudaProblem problem;
  problem.student = student.data_ptr();
  problem.teacher = teacher.data_ptr();
  problem.loss_rows = loss_rows.data_ptr();
  problem.grad_student = grad_student ? d_student.data_ptr() : nullptr;
  problem.grad_teacher = grad_teacher ? d_teacher.data_ptr() : nullptr;
  problem.steps = student.size(0);
  problem.rows = teacher.size(0);
  problem.classes = teacher.size(1);
  problem.options = {temperature, delta, logit_mean, detach_weights, row_scale};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(teacher.device().index()).stream();
  const cudaError_t error = htakl::hta_kl_fused_cuda(dtype, problem, stream);
  if (error == cudaErrorInvalidValue) {
    cudaError_t query_error = cudaSuccess;
    const int64_t max_steps = htakl::hta_kl_cuda_max_steps(dtype, &query_error);
    TORCH_CHECK(query_error != cudaSuccess || problem.steps <= max_steps,
                "hta_kl_fused (CUDA): student's time dimension T = ", problem.steps,
                " exceeds the kernel's limit of ", max_steps,
                " steps on this device (per-step values are kept in shared memory)");
  }
  TORCH_CHECK(error == cudaSuccess, "hta_kl_fused (CUDA): kernel launch failed: ",
              cudaGetErrorString(error));
  return {loss_rows, d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(htakl, CUDA, m) { m.impl("hta_kl_fused", &hta_kl_fused_cuda); }
