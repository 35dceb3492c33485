// CPU implementation of the fused multi-step LIF ops (contract: htakl_kernels/_ops/lif.py, math: SPEC 3
// via lif_math.h). The kernels live in lif_cpu_kernels.h, compiled once per instruction set
// (cpu_isa.h); this file checks the arguments, allocates the outputs and picks the copy.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "check_text.h"
#include "cpu_isa.h"
#include "huge_pages.h"
#include "lif_math.h"
#include "lif_op.h"

namespace htakl {
namespace {

// The option flags of LifParams as compile-time constants. A kernel instantiated with them
// overwrites the run-time flags of its local copy of the options, so lif_math.h's branches on
// them fold away: GCC does not vectorize a loop that selects on a run-time flag.
template <bool kSoftReset, bool kDecayInput, bool kDetachReset, LifSurrogate kSurrogate>
struct LifFlags {
  template <typename acc_t>
  static LifParams<acc_t> fix(LifParams<acc_t> p) {
    p.soft_reset = kSoftReset;
    p.decay_input = kDecayInput;
    p.detach_reset = kDetachReset;
    p.surrogate = kSurrogate;
    return p;
  }
};

#define HTAKL_CPU_KERNELS "lif_cpu_kernels.h"
#include "cpu_isa_copies.h"

// Calls body(std::true_type{}) or body(std::false_type{}): a run-time flag made a template argument.
template <typename Body>
void with_constant(bool flag, Body&& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Calls body(std::integral_constant<LifSurrogate, surrogate>{}): one instantiation per surrogate
// of lif_math.h's table.
template <typename Body>
void with_surrogate(LifSurrogate surrogate, Body&& body) {
  [&]<int32_t... kIds>(std::integer_sequence<int32_t, kIds...>) {
    ((surrogate == static_cast<LifSurrogate>(kIds)
          ? (body(std::integral_constant<LifSurrogate, static_cast<LifSurrogate>(kIds)>{}), true)
          : false) ||
     ...);
  }(std::make_integer_sequence<int32_t, kLifSurrogateCount>{});
}

// Calls body(LifFlags<...>{}) with p's flags. The forward reads only the first two, so
// `backward_flags` false fixes the others: the forward needs no copy per backward-only option.
template <typename acc_t, typename Body>
void with_lif_flags(const LifParams<acc_t>& p, bool backward_flags, Body&& body) {
  with_constant(p.soft_reset, [&](auto soft_reset) {
    with_constant(p.decay_input, [&](auto decay_input) {
      constexpr bool kSoftReset = decltype(soft_reset)::value;
      constexpr bool kDecayInput = decltype(decay_input)::value;
      if (!backward_flags) {
        body(LifFlags<kSoftReset, kDecayInput, false, LifSurrogate::sigmoid>{});
        return;
      }
      with_constant(p.detach_reset, [&](auto detach_reset) {
        with_surrogate(p.surrogate, [&](auto surrogate) {
          body(LifFlags<kSoftReset, kDecayInput, decltype(detach_reset)::value,
                        decltype(surrogate)::value>{});
        });
      });
    });
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
  const auto [layout, x, v_init] = prepare_lif_forward(x_in, v_init_in);
  at::Tensor spikes = empty_like_huge_pages(x);
  at::Tensor v_last = at::empty_like(v_init);
  at::Tensor v_seq = return_v_seq ? empty_like_huge_pages(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_forward_cpu", [&] {
    using acc_t = htakl::acc_t<scalar_t>;
    const auto p = make_lif_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input,
                                          detach_reset, surrogate, alpha);
    const auto run = [&](auto kernel) {
      kernel(x.const_data_ptr<scalar_t>(), v_init.const_data_ptr<scalar_t>(),
             spikes.mutable_data_ptr<scalar_t>(), v_last.mutable_data_ptr<scalar_t>(),
             return_v_seq ? v_seq.mutable_data_ptr<scalar_t>() : nullptr, layout, p);
    };
    with_lif_flags(p, /*backward_flags=*/false, [&](auto flags) {
      using Flags = decltype(flags);
#ifdef HTAKL_CPU_AVX2
      if (use_avx2()) return run(avx2::forward_kernel<scalar_t, acc_t, Flags>);
#endif
      run(baseline::forward_kernel<scalar_t, acc_t, Flags>);
    });
  });
  return {spikes, v_last, v_seq};
}

// Steps of H the backward holds per block (lif_backward_segments): enough that the usual T runs
// as one segment, reading x once; longer sequences recompute all but their last segment.
constexpr int64_t kCpuSegment = 64;

std::tuple<at::Tensor, at::Tensor> lif_backward_cpu_segments(
    const at::Tensor& grad_spikes_in, const at::Tensor& grad_v_last_in,
    const at::Tensor& grad_v_seq_in, const at::Tensor& x_in, const at::Tensor& v_init_in,
    double tau, double v_threshold, double v_reset, bool soft_reset, bool decay_input,
    bool detach_reset, c10::string_view surrogate, double alpha, int64_t segment) {
  TORCH_CHECK(segment >= 1, "lif_backward: segment must be >= 1, got ",
              integer_text(segment));
  const LifBackwardInputs in =
      prepare_lif_backward(grad_spikes_in, grad_v_last_in, grad_v_seq_in, x_in, v_init_in);
  at::Tensor grad_x = empty_like_huge_pages(in.x);
  at::Tensor grad_v_init = at::empty_like(in.v_init);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "lif_backward_cpu", [&] {
    using acc_t = htakl::acc_t<scalar_t>;
    const auto p = make_lif_params<acc_t>(tau, v_threshold, v_reset, soft_reset, decay_input,
                                          detach_reset, surrogate, alpha);
    const auto run = [&](auto kernel) {
      kernel(data_or_null<scalar_t>(in.grad_spikes), data_or_null<scalar_t>(in.grad_v_last),
             data_or_null<scalar_t>(in.grad_v_seq), in.x.const_data_ptr<scalar_t>(),
             in.v_init.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
             grad_v_init.mutable_data_ptr<scalar_t>(), in.layout, p, segment);
    };
    with_lif_flags(p, /*backward_flags=*/true, [&](auto flags) {
      using Flags = decltype(flags);
#ifdef HTAKL_CPU_AVX2
      if (use_avx2()) return run(avx2::backward_kernel<scalar_t, acc_t, Flags>);
#endif
      run(baseline::backward_kernel<scalar_t, acc_t, Flags>);
    });
  });
  return {grad_x, grad_v_init};
}

std::tuple<at::Tensor, at::Tensor> lif_backward_cpu(
    const at::Tensor& grad_spikes, const at::Tensor& grad_v_last, const at::Tensor& grad_v_seq,
    const at::Tensor& x, const at::Tensor& v_init, double tau, double v_threshold, double v_reset,
    bool soft_reset, bool decay_input, bool detach_reset, c10::string_view surrogate,
    double alpha) {
  return lif_backward_cpu_segments(grad_spikes, grad_v_last, grad_v_seq, x, v_init, tau,
                                   v_threshold, v_reset, soft_reset, decay_input, detach_reset,
                                   surrogate, alpha, kCpuSegment);
}

// divide_by_tau_reciprocal (lif_math.h, the GPU kernels' division by tau) applied to every
// element of a float32 or float64 tensor, for tests/test_lif_division.py to compare with a / tau.
at::Tensor lif_divide_by_tau_cpu(const at::Tensor& a_in, double tau) {
  TORCH_CHECK(std::isfinite(tau) && tau > 1, "_lif_divide_by_tau: tau must be a finite number > 1, "
              "got ", real_text(tau));
  TORCH_CHECK(a_in.scalar_type() == at::kFloat || a_in.scalar_type() == at::kDouble,
              "_lif_divide_by_tau: a must be float32 or float64, got ", a_in.scalar_type());
  const at::Tensor a = a_in.contiguous();
  at::Tensor quotient = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lif_divide_by_tau_cpu", [&] {
    LifParams<scalar_t> p{};
    p.tau = scalar_t(tau);
    p = with_lif_constants(p);
    const scalar_t* from = a.const_data_ptr<scalar_t>();
    scalar_t* to = quotient.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) to[i] = divide_by_tau_reciprocal(from[i], p);
    });
  });
  return quotient;
}

}  // namespace

// Not part of the API: lif_backward with H held `segment` steps at a time instead of
// kCpuSegment, so that tests run the checkpoint and recompute path of lif_backward_segments (the
// GPU kernel's schedule) at small T.
TORCH_LIBRARY_FRAGMENT(htakl, m) {
  m.def(
      "_lif_backward_segments(Tensor grad_spikes, Tensor grad_v_last, Tensor grad_v_seq, "
      "Tensor x, Tensor v_init, float tau, float v_threshold, float v_reset, bool soft_reset, "
      "bool decay_input, bool detach_reset, str surrogate, float alpha, int segment) "
      "-> (Tensor, Tensor)");
  // Not part of the API either: the GPU kernels' division by tau, run on the CPU.
  m.def("_lif_divide_by_tau(Tensor a, float tau) -> Tensor");
}

TORCH_LIBRARY_IMPL(htakl, CPU, m) {
  m.impl("lif_forward", &lif_forward_cpu);
  m.impl("lif_backward", &lif_backward_cpu);
  m.impl("_lif_backward_segments", &lif_backward_cpu_segments);
  m.impl("_lif_divide_by_tau", &lif_divide_by_tau_cpu);
}

}  // namespace htakl
