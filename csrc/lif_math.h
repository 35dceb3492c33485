// Per-element multi-step LIF math (docs/SPEC.md section 3) shared by the CPU and CUDA kernels.
//
// Torch-free on purpose: the CUDA translation units include it without torch headers, and the
// CPU kernel includes it too, so the CPU test suite exercises every formula the GPU code runs.
//
// Conventions every backend (and the reference, htakl_kernels/reference/lif.py) follows, so that
// spikes agree bit for bit:
//   * the state (V, H) lives in the storage type's `acc_t` (common.h: double for double, else float);
//   * H is formed exactly as SPEC 3 writes it, with a true division by tau (not a multiplication
//     by 1/tau, which rounds differently);
//   * a spike is `H - v_threshold >= 0` (SPEC 3, note the >=);
//   * the hard reset is the product form H (1 - S) + v_reset S (not a select), so an infinite H
//     gives NaN exactly as the reference does. Both products are exact (S is 0 or 1), so a fused
//     multiply-add contraction cannot change the result.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

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
};

// The same options in another precision: each value rounded once (to nearest), as a kernel whose
// state is float rounds the double options it is given.
template <typename to_t, typename from_t>
HTAKL_HD LifParams<to_t> cast_lif_params(const LifParams<from_t>& p) {
  return {to_t(p.tau), to_t(p.v_threshold), to_t(p.v_reset), p.soft_reset, p.decay_input,
          p.detach_reset, p.surrogate, to_t(p.alpha)};
}

// SPEC 3: the membrane after charging, H[t], from V[t-1] and X[t].
template <typename acc_t>
HTAKL_HD acc_t lif_charge(acc_t v_prev, acc_t x, const LifParams<acc_t>& p) {
  if (p.decay_input) return v_prev + (x - (v_prev - p.v_reset)) / p.tau;
  return v_prev - (v_prev - p.v_reset) / p.tau + x;
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

// SPEC 3: the surrogate derivative sg at u = H - v_threshold. The sigmoid's
// alpha sig(alpha u) (1 - sig(alpha u)) is computed as alpha e / (1 + e)^2 with e = exp(-alpha |u|):
// the same function (it is even in u), and exp only ever sees arguments <= 0, so it never
// overflows and a fast exp for that range serves.
template <typename acc_t, typename Exp = StdExp>
HTAKL_HD acc_t lif_surrogate_grad(acc_t u, const LifParams<acc_t>& p, Exp exp_nonpositive = {}) {
  switch (p.surrogate) {
    case LifSurrogate::sigmoid: {
      const acc_t e = exp_nonpositive(-p.alpha * (u < acc_t(0) ? -u : u));
      const acc_t one_plus_e = acc_t(1) + e;
      return p.alpha * e / (one_plus_e * one_plus_e);
    }
    case LifSurrogate::atan: {
      const acc_t scaled = acc_t(1.57079632679489661923) * p.alpha * u;  // (pi / 2) alpha u
      return p.alpha / acc_t(2) / (acc_t(1) + scaled * scaled);
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
template <typename acc_t, typename Exp = StdExp>
HTAKL_HD LifStepGrad<acc_t> lif_step_grad(acc_t g_spike, acc_t g_v, acc_t h,
                                          const LifParams<acc_t>& p, Exp exp_nonpositive = {}) {
  const acc_t spike = lif_fire(h, p);
  const acc_t sg = lif_surrogate_grad(h - p.v_threshold, p, exp_nonpositive);
  acc_t g_h;
  if (p.soft_reset) {
    g_h = p.detach_reset ? g_spike * sg + g_v : (g_spike - p.v_threshold * g_v) * sg + g_v;
  } else {
    const acc_t keep = acc_t(1) - spike;
    g_h = p.detach_reset ? g_spike * sg + g_v * keep
                         : (g_spike + g_v * (p.v_reset - h)) * sg + g_v * keep;
  }
  // dH[t]/dX[t] = 1/tau (decay_input) or 1; dH[t]/dV[t-1] = 1 - 1/tau either way.
  return {p.decay_input ? g_h / p.tau : g_h, g_h * (acc_t(1) - acc_t(1) / p.tau)};
}

}  // namespace htakl
