// CUDA implementation of the op htakl::hta_kl_fused (contract: htakl_kernels/_ops/hta_kl.py;
// schema: htakl_kernels/_library.py). Checks the arguments (hta_kl_op.h), allocates the outputs
// and calls the torch-free launcher (hta_kl_cuda.h) on the current stream. Compiled only when the
// extension is built with CUDA (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/hta_kl_cuda.h"
#include "check_text.h"
#include "hta_kl_op.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> hta_kl_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double delta,
    bool logit_mean, bool detach_weights, bool grad_student, bool grad_teacher, double row_scale) {
  const htakl::HtaKlLayout layout =
      htakl::check_hta_kl_tensors(student, teacher, c10::DeviceType::CUDA);
  const htakl::HtaKlOptions options =
      htakl::make_hta_kl_options(temperature, delta, logit_mean, detach_weights, row_scale);
  TORCH_CHECK(layout.classes <= htakl::kHtaKlCudaMaxClasses,
              "hta_kl_fused (CUDA): teacher has C = ", htakl::integer_text(layout.classes),
              " classes; the kernel counts a row's classes in 32 bits and takes at most ",
              htakl::integer_text(htakl::kHtaKlCudaMaxClasses));
  const c10::cuda::CUDAGuard device_guard(teacher.device());
  at::Tensor loss_rows =
      at::empty({layout.rows}, teacher.options().dtype(htakl::acc_dtype(teacher.scalar_type())));
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
  problem.steps = layout.steps;
  problem.rows = layout.rows;
  problem.classes = layout.classes;
  problem.options = options;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(teacher.device().index()).stream();
  const cudaError_t error = htakl::hta_kl_fused_cuda(layout.storage, problem, stream);
  if (error == cudaErrorInvalidValue) {
    cudaError_t query_error = cudaSuccess;
    const int64_t max_steps = htakl::hta_kl_cuda_max_steps(layout.storage, &query_error);
    TORCH_CHECK(query_error != cudaSuccess || problem.steps <= max_steps,
                "hta_kl_fused (CUDA): student's time dimension T = ",
                htakl::integer_text(problem.steps),
                " exceeds the kernel's limit of ", htakl::integer_text(max_steps),
                " steps on this device (per-step values are kept in shared memory)");
  }
  TORCH_CHECK(error == cudaSuccess, "hta_kl_fused (CUDA): kernel launch failed: ",
              cudaGetErrorString(error));
  return {loss_rows, d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(htakl, CUDA, m) { m.impl("hta_kl_fused", &hta_kl_fused_cuda); }
