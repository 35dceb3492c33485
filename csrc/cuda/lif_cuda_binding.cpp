// Torch binding of the CUDA LIF kernels (lif_cuda.cu): checks, allocation, stream, dtype mapping.
// Compiled only on CUDA machines (setup.py); the op schemas live in htakl_kernels/_library.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "lif_cuda.h"
#include "lif_op.h"
#include "torch_storage.h"

namespace htakl {
namespace {

const void* data_or_null(const at::Tensor& t) { return t.numel() == 0 ? nullptr : t.const_data_ptr(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_forward_cuda_op(
    const at::Tensor& x_in, const at::Tensor& v_init_in, double tau, double v_threshold,
    double v_reset, bool soft_reset, bool decay_input, bool detach_reset,
    c10::string_view surrogate, double alpha, bool return_v_seq) {
  const auto params = make_lif_params<double>(tau, v_threshold, v_reset, soft_reset, decay_input,
                                              detach_reset, surrogate, alpha);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const auto [layout, x, v_init] = prepare_lif_forward(x_in, v_init_in);
  const Storage storage = storage_of(x.scalar_type(), "lif: x");
  at::Tensor spikes = at::empty_like(x);
  at::Tensor v_last = at::empty_like(v_init);
  at::Tensor v_seq = return_v_seq ? at::empty_like(x) : at::empty({0}, x.options());
  const LifForwardArgs args{x.const_data_ptr(), v_init.const_data_ptr(), spikes.mutable_data_ptr(),
                            v_last.mutable_data_ptr(),
                            return_v_seq ? v_seq.mutable_data_ptr() : nullptr, layout.steps,
                            layout.neurons};
  C10_CUDA_CHECK(lif_forward_cuda(storage, args, params, c10::cuda::getCurrentCUDAStream()));
  return {spikes, v_last, v_seq};
}

std::tuple<at::Tensor, at::Tensor> lif_backward_cuda_op(
    const at::Tensor& grad_spikes_in, const at::Tensor& grad_v_last_in,
    const at::Tensor& grad_v_seq_in, const at::Tensor& x_in, const at::Tensor& v_init_in,
    double tau, double v_threshold, double v_reset, bool soft_reset, bool decay_input,
    bool detach_reset, c10::string_view surrogate, double alpha) {
  const auto params = make_lif_params<double>(tau, v_threshold, v_reset, soft_reset, decay_input,
                                              detach_reset, surrogate, alpha);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const LifBackwardInputs in =
      prepare_lif_backward(grad_spikes_in, grad_v_last_in, grad_v_seq_in, x_in, v_init_in);
  const Storage storage = storage_of(in.x.scalar_type(), "lif: x");
  at::Tensor grad_x = at::empty_like(in.x);
  at::Tensor grad_v_init = at::empty_like(in.v_init);
  LifBackwardArgs args{data_or_null(in.grad_spikes), data_or_null(in.grad_v_last),
                       data_or_null(in.grad_v_seq),  in.x.const_data_ptr(),
                       in.v_init.const_data_ptr(),   grad_x.mutable_data_ptr(),
                       grad_v_init.mutable_data_ptr(), nullptr,
                       in.layout.steps,              in.layout.neurons};
  // V at the start of each recomputed segment: a few rows of the state type, none while the
  // sequence fits in the kernel's registers.
  const int64_t rows = lif_backward_checkpoint_rows(storage, args);
  at::Tensor checkpoints;
  if (rows > 0) {
    checkpoints = at::empty({rows, in.layout.neurons},
                            in.x.options().dtype(acc_dtype(in.x.scalar_type())));
    args.checkpoints = checkpoints.mutable_data_ptr();
  }
  C10_CUDA_CHECK(lif_backward_cuda(storage, args, params, c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_v_init};
}

}  // namespace

TORCH_LIBRARY_IMPL(htakl, CUDA, m) {
  m.impl("lif_forward", &lif_forward_cuda_op);
  m.impl("lif_backward", &lif_backward_cuda_op);
}

}  // namespace htakl
