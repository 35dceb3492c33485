// Torch-side checks and option parsing of the LIF ops, shared by the CPU kernel file and the CUDA
// binding (the CUDA kernels themselves stay torch-free and see only lif_math.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "check_text.h"
#include "lif_math.h"

namespace htakl {

// x is [T, ...] and v_init [...]: T steps of `neurons` independent neurons.
struct LifLayout {
  int64_t steps;
  int64_t neurons;
};

inline LifLayout check_lif_layout(const at::Tensor& x, const at::Tensor& v_init) {
  TORCH_CHECK(x.dim() >= 1, "lif: x must have at least one dimension [T, ...], got a 0-d tensor");
  TORCH_CHECK(v_init.sizes() == x.sizes().slice(1), "lif: v_init must have the shape x.shape[1:] = ",
              shape_text(x.sizes().slice(1)), ", got ", shape_text(v_init.sizes()));
  TORCH_CHECK(v_init.scalar_type() == x.scalar_type(), "lif: v_init must have x's dtype ",
              x.scalar_type(), ", got ", v_init.scalar_type());
  TORCH_CHECK(v_init.device() == x.device(), "lif: v_init must be on x's device ", x.device(),
              ", got ", v_init.device());
  return {x.size(0), v_init.numel()};
}

// A gradient on one output: empty (a zero gradient) or the output's shape, in x's dtype.
inline void check_lif_gradient(const char* name, const at::Tensor& grad, const at::Tensor& like) {
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.sizes() == like.sizes(), "lif_backward: ", name, " must be empty or have shape ",
              shape_text(like.sizes()), ", got ", shape_text(grad.sizes()));
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && grad.device() == like.device(),
              "lif_backward: ", name, " must have x's dtype and device");
}

// The forward's tensors, checked and made contiguous.
struct LifForwardInputs {
  LifLayout layout;
  at::Tensor x;
  at::Tensor v_init;
};

inline LifForwardInputs prepare_lif_forward(const at::Tensor& x, const at::Tensor& v_init) {
  const LifLayout layout = check_lif_layout(x, v_init);
  return {layout, x.contiguous(), v_init.contiguous()};
}

// The backward's tensors, checked and made contiguous (an empty gradient stays empty: zero).
struct LifBackwardInputs {
  LifLayout layout;
  at::Tensor grad_spikes;
  at::Tensor grad_v_last;
  at::Tensor grad_v_seq;
  at::Tensor x;
  at::Tensor v_init;
};

inline LifBackwardInputs prepare_lif_backward(const at::Tensor& grad_spikes,
                                              const at::Tensor& grad_v_last,
                                              const at::Tensor& grad_v_seq, const at::Tensor& x,
                                              const at::Tensor& v_init) {
  const LifLayout layout = check_lif_layout(x, v_init);
  check_lif_gradient("grad_spikes", grad_spikes, x);
  check_lif_gradient("grad_v_last", grad_v_last, v_init);
  check_lif_gradient("grad_v_seq", grad_v_seq, x);
  return {layout,           grad_spikes.contiguous(), grad_v_last.contiguous(),
          grad_v_seq.contiguous(), x.contiguous(),    v_init.contiguous()};
}

// The op's `surrogate` name as a LifSurrogate (lif_math.h's table); an unknown name raises.
inline LifSurrogate parse_lif_surrogate(c10::string_view name) {
  std::string known;
  for (int32_t i = 0; i < kLifSurrogateCount; ++i) {
    if (name == kLifSurrogateNames[i]) return static_cast<LifSurrogate>(i);
    known += (i == 0 ? "'" : ", '") + std::string(kLifSurrogateNames[i]) + "'";
  }
  TORCH_CHECK(false, "lif: surrogate must be one of ", known, ", got '", name, "'");
}

template <typename acc_t>
LifParams<acc_t> make_lif_params(double tau, double v_threshold, double v_reset, bool soft_reset,
                                 bool decay_input, bool detach_reset, c10::string_view surrogate,
                                 double alpha) {
  TORCH_CHECK(std::isfinite(tau) && tau > 1, "lif: tau must be a finite number > 1, got ",
              real_text(tau));
  TORCH_CHECK(std::isfinite(v_threshold), "lif: v_threshold must be finite, got ",
              real_text(v_threshold));
  TORCH_CHECK(std::isfinite(v_reset), "lif: v_reset must be finite, got ", real_text(v_reset));
  const LifSurrogate surrogate_id = parse_lif_surrogate(surrogate);
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "lif: alpha must be a finite number > 0, got ",
              real_text(alpha));
  LifParams<acc_t> p{};
  p.tau = acc_t(tau);
  p.v_threshold = acc_t(v_threshold);
  p.v_reset = soft_reset ? acc_t(0) : acc_t(v_reset);  // SPEC 3: Vr = 0 when soft
  p.soft_reset = soft_reset;
  p.decay_input = decay_input;
  p.detach_reset = detach_reset;
  p.surrogate = surrogate_id;
  p.alpha = acc_t(alpha);
  return with_lif_constants(p);
}

}  // namespace htakl
