// Per-element multi-step LIF math (docs/SPEC.md section 3) shared by the CPU and CUDA kernels.
//
// Torch-free on purpose: the CUDA translation units include it without torch headers, and the
// CPU kernel includes it too, so the CPU test suite exercises every formula the GPU code runs.
//
// Conventions every backend (and the reference, htakl_kernels/reference/lif.py) follows, so that
// spikes agree bit for bit:
//   * the state (V, H) lives in the storage type's `acc_t` (common.h: double for double, else float);
//   * H is formed exactly as SPEC 3 writes it, with a correctly rounded division by tau (not a
//     multiplication by 1/tau, which rounds differently; the GPU gets the same quotient through
//     divide_by_tau's reciprocal form);
//   * a spike is `H - v_threshold >= 0` (SPEC 3, note the >=);
//   * the hard reset is the product form H (1 - S) + v_reset S (not a select), so an infinite H
//     gives NaN exactly as the reference does. Both products are exact (S is 0 or 1), so a fused
//     multiply-add contraction cannot change the result.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

// Fully unrolls the loop it precedes in device code, where the segment's H must sit in registers
// (an array indexed by a loop counter stays in registers only when every index is a constant);
// nothing on the host, whose segments are memory buffers.
#if defined(__CUDA_ARCH__)
#define HTAKL_UNROLL _Pragma("unroll")
#else
#define HTAKL_UNROLL
#endif

namespace htakl {

// The surrogate whose derivative replaces the Heaviside's in the backward (SPEC 3). Adding one:
// a value here, its name below, a case in lif_surrogate_grad (the compilers warn about a missing
// case), and the same in the Python reference and the Triton kernel.
enum class LifSurrogate : int32_t { sigmoid, atan };

// Each surrogate's name as the ops' `surrogate` argument spells it, in the enum's order.
constexpr const char* kLifSurrogateNames[] = {"sigmoid", "atan"};
constexpr int32_t kLifSurrogateCount =
    static_cast<int32_t>(sizeof(kLifSurrogateNames) / sizeof(kLifSurrogateNames[0]));

// Scalar options of one call, identical across backends.
template <typename acc_t>
struct LifParams {
  acc_t tau;          // > 1
  acc_t v_threshold;
  acc_t v_reset;      // the hard-reset value; 0 for soft reset (SPEC 3: Vr = 0 when soft)
  bool soft_reset;
  bool decay_input;
  bool detach_reset;  // backward only
  LifSurrogate surrogate;  // backward only
  acc_t alpha;             // backward only: surrogate sharpness
  // Set by with_lif_constants once per call, as the GPU does not hoist a division (a subroutine
  // there) out of its loops:
  acc_t v_prev_factor;    // 1 - 1/tau, dH[t]/dV[t-1]
  acc_t tau_reciprocal;   // 1/tau, correctly rounded (divide_by_tau)
  acc_t exact_quotient_min;    // divide_by_tau's reciprocal form serves nonzero |a| >= this ...
  acc_t exact_quotient_limit;  // ... and |a| < this (infinity, or 0 when tau is too large)
};

// 2^exponent, exactly (a constant expression: no ldexp in device code).
template <typename acc_t>
HTAKL_HD constexpr acc_t power_of_two(int exponent) {
  acc_t result = acc_t(1);
  for (; exponent > 0; --exponent) result *= acc_t(2);
  for (; exponent < 0; ++exponent) result /= acc_t(2);
  return result;
}

// p with its derived constants set (every LifParams a kernel receives has them).
template <typename acc_t>
HTAKL_HD LifParams<acc_t> with_lif_constants(LifParams<acc_t> p) {
  p.v_prev_factor = acc_t(1) - acc_t(1) / p.tau;
  p.tau_reciprocal = acc_t(1) / p.tau;
  // divide_by_tau's bounds. Nonzero |a| >= tau 2^(min_exponent + digits + 4) (float: 2^-97 tau,
  // double: 2^-964 tau) keeps the quotient normal and its ulp times tau's ulp at or above the
  // smallest subnormal, so the residual is exact and nothing underflows; tau <= 2^64 keeps 1/tau normal (tau is > 1, but its float may be infinite).
  using limits = std::numeric_limits<acc_t>;
  p.exact_quotient_min = p.tau * power_of_two<acc_t>(limits::min_exponent + limits::digits + 4);
  p.exact_quotient_limit = p.tau <= power_of_two<acc_t>(64) ? acc_t(INFINITY) : acc_t(0);
  return p;
}

// a / tau, correctly rounded (the IEEE quotient, bit for bit), without a division per call site:
// q = a (1/tau) is within an ulp of a / tau, the residual a - q tau is exact in one fma, and one
// more fma with the correctly rounded reciprocal gives the correctly rounded quotient (Markstein's
// theorem, P. Markstein, IBM J. Res. Dev. 34(1), 1990; tests/test_lif_division.py checks it bit for
// bit against the division). The residual is formed negated, q tau - a, so that a = -0 gives -0.
// Outside the band where nothing overflows or underflows (with_lif_constants: tiny nonzero a,
// infinities, NaN, huge tau) the true division runs instead.
//
// The GPU takes the reciprocal form: its division is a reciprocal estimate, refinement and range
// check, about twice the instructions. The CPU kernel divides: a vector division costs it less
// than the form's fma, compare and blend, and its baseline copy has no fma instruction.
template <typename acc_t>
HTAKL_HD acc_t divide_by_tau_reciprocal(acc_t a, const LifParams<acc_t>& p) {
  using std::fabs;
  using std::fma;
  const acc_t magnitude = fabs(a);
  if (magnitude < p.exact_quotient_limit &&
      (magnitude >= p.exact_quotient_min || a == acc_t(0))) {
    const acc_t q = a * p.tau_reciprocal;
    const acc_t negated_residual = fma(q, p.tau, -a);
    return fma(-negated_residual, p.tau_reciprocal, q);
  }
  return a / p.tau;  // rarely taken (bench/census/lif.py leaves it off the GPU's cost)
}

template <typename acc_t>
HTAKL_HD acc_t divide_by_tau(acc_t a, const LifParams<acc_t>& p) {
#if defined(__CUDA_ARCH__)
  return divide_by_tau_reciprocal(a, p);
#else
  return a / p.tau;
#endif
}

// The same options in another precision: each value rounded once (to nearest), as a kernel whose
// state is float rounds the double options it is given.
template <typename to_t, typename from_t>
HTAKL_HD LifParams<to_t> cast_lif_params(const LifParams<from_t>& p) {
  LifParams<to_t> cast{};
  cast.tau = to_t(p.tau);
  cast.v_threshold = to_t(p.v_threshold);
  cast.v_reset = to_t(p.v_reset);
  cast.soft_reset = p.soft_reset;
  cast.decay_input = p.decay_input;
  cast.detach_reset = p.detach_reset;
  cast.surrogate = p.surrogate;
  cast.alpha = to_t(p.alpha);
  return with_lif_constants(cast);
}

// SPEC 3: the membrane after charging, H[t], from V[t-1] and X[t].
template <typename acc_t>
HTAKL_HD acc_t lif_charge(acc_t v_prev, acc_t x, const LifParams<acc_t>& p) {
  if (p.decay_input) return v_prev + divide_by_tau(x - (v_prev - p.v_reset), p);
  return v_prev - divide_by_tau(v_prev - p.v_reset, p) + x;
}

// SPEC 3: S[t] = (H[t] - v_threshold >= 0), as 0 or 1.
template <typename acc_t>
HTAKL_HD acc_t lif_fire(acc_t h, const LifParams<acc_t>& p) {
  return h - p.v_threshold >= acc_t(0) ? acc_t(1) : acc_t(0);
}

// SPEC 3: V[t] after the (soft or hard) reset.
template <typename acc_t>
HTAKL_HD acc_t lif_reset(acc_t h, acc_t spike, const LifParams<acc_t>& p) {
  if (p.soft_reset) return h - p.v_threshold * spike;
  return h * (acc_t(1) - spike) + p.v_reset * spike;
}

// exp through the standard library: the default of the functions below that take an exp. The
// CPU kernel passes its own vectorizable exp of non-positive arguments instead.
struct StdExp {
  template <typename T>
  HTAKL_HD T operator()(T z) const {
    using std::exp;
    return exp(z);
  }
};

// The correctly rounded quotient: the default division of the functions below that take one. The
// GPU's kernels for 16-bit storage pass a faster one (lif_cuda_kernels.cuh).
struct ExactDivide {
  template <typename T>
  HTAKL_HD T operator()(T a, T b) const {
    return a / b;
  }
};

// SPEC 3: the surrogate derivative sg at u = H - v_threshold. The sigmoid's
// alpha sig(alpha u) (1 - sig(alpha u)) is computed as alpha e / (1 + e)^2 with e = exp(-alpha |u|):
// the same function (it is even in u), and exp only ever sees arguments <= 0, so it never
// overflows and a fast exp for that range serves.
template <typename acc_t, typename Exp = StdExp, typename Divide = ExactDivide>
HTAKL_HD acc_t lif_surrogate_grad(acc_t u, const LifParams<acc_t>& p, Exp exp_nonpositive = {},
                                  Divide divide = {}) {
  switch (p.surrogate) {
    case LifSurrogate::sigmoid: {
      const acc_t e = exp_nonpositive(-p.alpha * (u < acc_t(0) ? -u : u));
      const acc_t one_plus_e = acc_t(1) + e;
      return divide(p.alpha * e, one_plus_e * one_plus_e);
    }
    case LifSurrogate::atan: {
      const acc_t scaled = acc_t(1.57079632679489661923) * p.alpha * u;  // (pi / 2) alpha u
      return divide(p.alpha / acc_t(2), acc_t(1) + scaled * scaled);
    }
  }
  // Not reached: the ops turn the surrogate's name into a LifSurrogate and refuse unknown names.
  return acc_t(NAN);
}

// One backward step (SPEC 3's table): the gradient reaching X[t], and the part of the gradient
// reaching V[t-1] that flows through H[t] (the caller adds any direct gradient on V[t-1]).
template <typename acc_t>
struct LifStepGrad {
  acc_t x;
  acc_t v_prev;
};

// `g_spike` is the gradient on S[t]; `g_v` the whole gradient reaching V[t] (through H[t+1] plus
// any direct gradient on V[t]); `h` is H[t] as the forward computed it.
template <typename acc_t, typename Exp = StdExp, typename Divide = ExactDivide>
HTAKL_HD LifStepGrad<acc_t> lif_step_grad(acc_t g_spike, acc_t g_v, acc_t h,
                                          const LifParams<acc_t>& p, Exp exp_nonpositive = {},
                                          Divide divide = {}) {
  const acc_t spike = lif_fire(h, p);
  const acc_t sg = lif_surrogate_grad(h - p.v_threshold, p, exp_nonpositive, divide);
  acc_t g_h;
  if (p.soft_reset) {
    g_h = p.detach_reset ? g_spike * sg + g_v : (g_spike - p.v_threshold * g_v) * sg + g_v;
  } else {
    const acc_t keep = acc_t(1) - spike;
    g_h = p.detach_reset ? g_spike * sg + g_v * keep
                         : (g_spike + g_v * (p.v_reset - h)) * sg + g_v * keep;
  }
  // dH[t]/dX[t] = 1/tau (decay_input) or 1; dH[t]/dV[t-1] = 1 - 1/tau either way.
  return {p.decay_input ? divide_by_tau(g_h, p) : g_h, g_h * p.v_prev_factor};
}

// The backward's walk over time for one group of neurons (one thread's on the GPU, one block's on
// the CPU), holding H for at most `segment` steps at a time, with no buffer the size of x:
//
//   sweep 1   runs SPEC 3's forward from v_init over the segments before the last, saving V at
//             the start of each but the first (the checkpoints);
//   sweep 2   walks the segments from the last to the first: each computes its H from x, the last
//             continuing from sweep 1's V, the others restarting from their checkpoint (v_init
//             for the first), then runs SPEC 3's table over it from its last step down to its
//             first.
//
// H is recomputed by the forward's own functions (lif_charge, lif_fire, lif_reset) from the very V
// the forward had at that step, so every H, spike and gradient is bit for bit what a single sweep
// storing all of H would give. When steps <= segment there is one segment and x is read once;
// otherwise the steps before the last segment read x twice.
//
// `segment` is an int or a std::integral_constant (the GPU's, whose segment of H lives in
// registers: the loops over a segment then unroll). `group` provides
//   begin_forward()            V = v_init
//   save(c) / restore(c)       V at the start of segment c: save for 1 <= c <= segments - 2,
//                              restore for 0 <= c <= segments - 2 (restore(0) reloads v_init)
//   forward(t, k, keep)        one forward step at time t; keep: H[t] into slot k of the segment
//   begin_backward()           the gradient reaching V[T-1] = grad_v_last
//   backward(t, k)             SPEC 3's table at time t from H in slot k (lif_step_grad)
// and may rely on the order of the calls within a segment: forward for k = 0, 1, ... up, then (in
// sweep 2) backward for the same k down to 0.
//   end_backward()             grad_v_init = the gradient reaching V[-1]
template <typename Segment, typename Group>
HTAKL_HD void lif_backward_segments(int64_t steps, Segment segment, Group& group) {
  // an integral_constant's value read as a constant, not through its conversion operator (a host
  // function to nvcc)
  int length;
  if constexpr (std::is_integral_v<Segment>) {
    length = static_cast<int>(segment);
  } else {
    length = Segment::value;
  }
  const int64_t segments = (steps + length - 1) / length;  // 0 when steps == 0
  group.begin_forward();
  for (int64_t c = 0; c + 1 < segments; ++c) {
    if (c > 0) group.save(c);
    HTAKL_UNROLL
    for (int k = 0; k < length; ++k) group.forward(c * length + k, k, false);
  }
  group.begin_backward();
  for (int64_t c = segments - 1; c >= 0; --c) {
    const int64_t first = c * length;
    const int count = steps - first < length ? static_cast<int>(steps - first) : length;
    if (c + 1 < segments) group.restore(c);  // the last segment continues sweep 1
    HTAKL_UNROLL
    for (int k = 0; k < length; ++k) {
      if (k < count) group.forward(first + k, k, true);
    }
    HTAKL_UNROLL
    for (int k = length - 1; k >= 0; --k) {
      if (k < count) group.backward(first + k, k);
    }
  }
  group.end_backward();
}

// Rows of the checkpoint buffer lif_backward_segments needs per neuron: one V for each segment
// but the first and the last.
HTAKL_HD int64_t lif_checkpoints(int64_t steps, int64_t segment) {
  const int64_t segments = (steps + segment - 1) / segment;
  return segments > 2 ? segments - 2 : 0;
}

}  // namespace htakl
