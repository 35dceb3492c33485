// CPU kernels of the fused multi-step LIF ops (contract: htakl_kernels/lif.py, math: SPEC 3 via
// lif_math.h). Neurons are independent: each task takes a range of neurons and walks it in
// blocks, looping over time outside and over the block's neurons inside, so the inner loop reads
// and writes contiguous memory. The backward recomputes H[t] of one block into a small scratch
// buffer (it stays in cache) and then sweeps t from T-1 down to 0.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "lif_math.h"
#include "lif_op.h"

namespace htakl {
namespace {

constexpr int64_t kMaxBlock = 256;
// Scratch elements per block in the backward (H of every step); blocks shrink as T grows.
constexpr int64_t kScratchElements = int64_t(1) << 16;

int64_t block_size(int64_t steps) {
  return std::clamp<int64_t>(kScratchElements / std::max<int64_t>(steps, 1), 8, kMaxBlock);
}

// Enough elements per task that a task outweighs its scheduling.
int64_t grain_size(int64_t steps) {
  return std::max<int64_t>(kMaxBlock, (int64_t(1) << 15) / std::max<int64_t>(steps, 1));
}

// The options are taken by value: a local copy cannot alias the output stores, which lets the
// compiler keep them in registers, hoist their branches out of the loops and vectorize.
template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* x, const scalar_t* v_init, scalar_t* spikes, scalar_t* v_last,
                    scalar_t* v_seq, LifLayout layout, const LifParams<acc_t> p) {
  const auto [steps, neurons] = layout;
  at::parallel_for(0, neurons, grain_size(steps), [=](int64_t begin, int64_t end) {
    acc_t v[kMaxBlock];
    for (int64_t first = begin; first < end; first += kMaxBlock) {
      const int64_t count = std::min(kMaxBlock, end - first);
      for (int64_t i = 0; i < count; ++i) v[i] = acc_t(v_init[first + i]);
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t row = t * neurons + first;
        for (int64_t i = 0; i < count; ++i) {
          const acc_t h = lif_charge(v[i], acc_t(x[row + i]), p);  // SPEC 3
          const acc_t spike = lif_fire(h, p);
          v[i] = lif_reset(h, spike, p);
          spikes[row + i] = scalar_t(spike);
          if (v_seq != nullptr) v_seq[row + i] = scalar_t(v[i]);
        }
      }
      for (int64_t i = 0; i < count; ++i) v_last[first + i] = scalar_t(v[i]);
    }
  });
}

// Null gradient pointers stand for zero gradients.
template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_spikes, const scalar_t* grad_v_last,
                     const scalar_t* grad_v_seq, const scalar_t* x, const scalar_t* v_init,
                     scalar_t* grad_x, scalar_t* grad_v_init, LifLayout layout,
                     const LifParams<acc_t> p) {
  const auto [steps, neurons] = layout;
  const int64_t block = block_size(steps);
  at::parallel_for(0, neurons, grain_size(steps), [=](int64_t begin, int64_t end) {
    std::vector<acc_t> h(static_cast<size_t>(steps * block));  // h[t * block + i] = H[t]
    acc_t v[kMaxBlock];  // V[t] in the first sweep, the gradient reaching it in the second
    for (int64_t first = begin; first < end; first += block) {
      const int64_t count = std::min(block, end - first);
      // Sweep 1: recompute H[t] (SPEC 3 forward) from x and v_init.
      for (int64_t i = 0; i < count; ++i) v[i] = acc_t(v_init[first + i]);
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t row = t * neurons + first;
        acc_t* h_t = h.data() + t * block;
        for (int64_t i = 0; i < count; ++i) {
          h_t[i] = lif_charge(v[i], acc_t(x[row + i]), p);
          v[i] = lif_reset(h_t[i], lif_fire(h_t[i], p), p);
        }
      }
      // Sweep 2: SPEC 3's table from t = T-1 down to 0.
      for (int64_t i = 0; i < count; ++i) {
        v[i] = grad_v_last != nullptr ? acc_t(grad_v_last[first + i]) : acc_t(0);
      }
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t row = t * neurons + first;
        const acc_t* h_t = h.data() + t * block;
        for (int64_t i = 0; i < count; ++i) {
          const acc_t g_v = v[i] + (grad_v_seq != nullptr ? acc_t(grad_v_seq[row + i]) : acc_t(0));
          const acc_t g_spike = grad_spikes != nullptr ? acc_t(grad_spikes[row + i]) : acc_t(0);
          const LifStepGrad<acc_t> g = lif_step_grad(g_spike, g_v, h_t[i], p);
          grad_x[row + i] = scalar_t(g.x);
          v[i] = g.v_prev;
        }
      }
      for (int64_t i = 0; i < count; ++i) grad_v_init[first + i] = scalar_t(v[i]);
    }
  });
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.numel() == 0 ? nullptr : t.const_data_ptr<scalar_t>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& v_init_in, double tau, double v_threshold,
    double v_reset, bool soft_reset, bool decay_input, bool detach_reset,
    c10::string_view surrogate, double alpha, bool return_v_seq) {
  const LifLayout layout = check_lif_layout(x_in, v_init_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor v_init = v_init_in.contiguous();
  at::Tensor spikes = at::empty_like(x);
  at::Tensor v_last = at::empty_like(v_init);
  at::Tensor v_seq = return_v_seq ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_lif_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input,
                                          detach_reset, surrogate, alpha);
    forward_kernel<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), v_init.const_data_ptr<scalar_t>(),
        spikes.mutable_data_ptr<scalar_t>(), v_last.mutable_data_ptr<scalar_t>(),
        return_v_seq ? v_seq.mutable_data_ptr<scalar_t>() : nullptr, layout, p);
  });
  return {spikes, v_last, v_seq};
}

std::tuple<at::Tensor, at::Tensor> lif_backward_cpu(
    const at::Tensor& grad_spikes_in, const at::Tensor& grad_v_last_in,
    const at::Tensor& grad_v_seq_in, const at::Tensor& x_in, const at::Tensor& v_init_in,
    double tau, double v_threshold, double v_reset, bool soft_reset, bool decay_input,
    bool detach_reset, c10::string_view surrogate, double alpha) {
  const LifLayout layout = check_lif_layout(x_in, v_init_in);
  check_lif_gradient("grad_spikes", grad_spikes_in, x_in);
  check_lif_gradient("grad_v_last", grad_v_last_in, v_init_in);
  check_lif_gradient("grad_v_seq", grad_v_seq_in, x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor v_init = v_init_in.contiguous();
  const at::Tensor grad_spikes = grad_spikes_in.contiguous();
  const at::Tensor grad_v_last = grad_v_last_in.contiguous();
  const at::Tensor grad_v_seq = grad_v_seq_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_v_init = at::empty_like(v_init);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_lif_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input,
                                          detach_reset, surrogate, alpha);
    backward_kernel<scalar_t, acc_t>(
        data_or_null<scalar_t>(grad_spikes), data_or_null<scalar_t>(grad_v_last),
        data_or_null<scalar_t>(grad_v_seq), x.const_data_ptr<scalar_t>(),
        v_init.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        grad_v_init.mutable_data_ptr<scalar_t>(), layout, p);
  });
  return {grad_x, grad_v_init};
}

}  // namespace

TORCH_LIBRARY_IMPL(htakl, CPU, m) {
  m.impl("lif_forward", &lif_forward_cpu);
  m.impl("lif_backward", &lif_backward_cpu);
}

}  // namespace htakl
