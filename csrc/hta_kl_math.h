// Per-element HTA-KL math shared by the CPU (C++) and CUDA kernels.
//
// Torch-free on purpose: the CUDA translation units include it without torch headers, and the
// CPU kernel includes it too, so the CPU test suite exercises every formula the GPU code uses.
// Section numbers refer to docs/SPEC.md ("SPEC 1.6" = section 1, step 6).
//
// Conventions (all backends agree on them):
//   * `acc_t` is the accumulation type of the storage type (common.h: double for double, else float).
//   * 0 * log 0 = 0: a probability that is exactly zero contributes nothing, whatever the log of
//     the other distribution is (this is also what makes masked classes, logit = -inf, finite).
//   * No epsilon anywhere; an infinite KL term stays infinite.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace htakl {

// Scalar options of one call, identical across backends.
struct HtaKlOptions {
  double temperature;   // tau > 0
  double delta;         // head mass in (0, 1]
  bool logit_mean;      // time input reduced by mean of logits instead of mean of probabilities
  bool detach_weights;  // lam_h, lam_t treated as constants in the backward
  // Each row's weight in the reduction that follows (1/R for batchmean, 1 for sum and none): the
  // loss rows and their gradients come out multiplied by it, so the backward of a sum over rows
  // with an upstream gradient of 1 has nothing left to scale.
  double row_scale;
};

// SPEC 1.6: one forward-KL term p (log p - log q), with 0 log 0 = 0.
template <typename acc_t>
HTAKL_HD acc_t fkl_term(acc_t p, acc_t log_p, acc_t log_q) {
  return p > acc_t(0) ? p * (log_p - log_q) : acc_t(0);
}

// SPEC 1.6: one reverse-KL term q (log q - log p), with 0 log 0 = 0.
template <typename acc_t>
HTAKL_HD acc_t rkl_term(acc_t q, acc_t log_q, acc_t log_p) {
  return q > acc_t(0) ? q * (log_q - log_p) : acc_t(0);
}

// SPEC 2: s_i = sign(q_i - p_i), sign(0) = 0.
template <typename acc_t>
HTAKL_HD acc_t sign_of_difference(acc_t q, acc_t p) {
  return q > p ? acc_t(1) : (q < p ? acc_t(-1) : acc_t(0));  // selects: vectorizes
}

// SPEC 1.5: the head and tail weights; 1/2 each when both distances are zero.
template <typename acc_t>
struct RowWeights {
  acc_t lam_h, lam_t;
};

template <typename acc_t>
HTAKL_HD RowWeights<acc_t> row_weights(acc_t d_head, acc_t d_tail) {
  const acc_t total = d_head + d_tail;
  if (total == acc_t(0)) return {acc_t(0.5), acc_t(0.5)};
  return {d_head / total, d_tail / total};
}

// Everything the per-element gradient needs from the row (SPEC 1 and 2), computed once per row
// after the reductions.
template <typename acc_t>
struct RowStats {
  acc_t lam_h, lam_t;
  acc_t fkl, rkl;        // F and R
  acc_t dl_head;         // d lam_h / d q_i for i in head, before the sign: d_tail / Sg^2
  acc_t dl_tail;         // likewise for i in tail: -d_head / Sg^2 (both formed as lam / Sg)
  acc_t row_scale;       // HtaKlOptions::row_scale
  acc_t grad_scale;      // row_scale / tau: the factor in front of every gradient of SPEC 2
};

// SPEC 1.5-1.6 and 2: weights, loss and the coefficients of dl_i. `dl_*` are zero when the
// weights are detached or both distances vanish (SPEC 2).
template <typename acc_t>
HTAKL_HD RowStats<acc_t> make_row_stats(acc_t d_head, acc_t d_tail, acc_t fkl, acc_t rkl,
                                        bool detach_weights, acc_t inv_tau, acc_t row_scale) {
  RowStats<acc_t> st;
  const RowWeights<acc_t> w = row_weights(d_head, d_tail);
  st.lam_h = w.lam_h;
  st.lam_t = w.lam_t;
  st.fkl = fkl;
  st.rkl = rkl;
  st.row_scale = row_scale;
  st.grad_scale = row_scale * inv_tau;
  const acc_t total = d_head + d_tail;
  if (detach_weights || total == acc_t(0)) {
    st.dl_head = acc_t(0);
    st.dl_tail = acc_t(0);
  } else {
    // d_tail / Sg^2 as lam_t / Sg (and likewise for the tail): Sg^2 would underflow for rows
    // where student and teacher agree closely (Sg below ~1e-19 in float), making 0 * inf = NaN
    // gradients out of a tiny finite loss. The reference's autograd divides the same way.
    st.dl_head = w.lam_t / total;
    st.dl_tail = -w.lam_h / total;
  }
  return st;
}

// SPEC 1.6: loss_row = lam_h F + lam_t R (0 * inf stays NaN, exactly as the reference computes),
// times the row's weight.
template <typename acc_t>
HTAKL_HD acc_t row_loss(const RowStats<acc_t>& st) {
  return st.row_scale * (st.lam_h * st.fkl + st.lam_t * st.rkl);
}

// SPEC 2: dl_i = s_i * (d_tail [i in H] - d_head [i not in H]) / Sg^2.
template <typename acc_t>
HTAKL_HD acc_t dlam_h_dq(const RowStats<acc_t>& st, acc_t sign, bool in_head) {
  return sign * (in_head ? st.dl_head : st.dl_tail);
}

// Row sums of x_i * dl_i are assembled from two signed partial sums, one over the head and one
// over the tail, accumulated in the statistics pass before the weights are known:
//   sum_i x_i dl_i = dl_head * sum_{i in H} x_i s_i + dl_tail * sum_{i not in H} x_i s_i.
template <typename acc_t>
HTAKL_HD acc_t weighted_dl_sum(const RowStats<acc_t>& st, acc_t signed_head_sum,
                               acc_t signed_tail_sum) {
  return st.dl_head * signed_head_sum + st.dl_tail * signed_tail_sum;
}

// SPEC 2's gradients below carry the row's weight in their 1/tau factor (grad_scale).
//
// SPEC 2, student, one softmax over the class axis (2-D input, or logit_mean before the 1/T):
//   dL/dz_k = (1/tau) [ lam_h (q_k - p_k) + lam_t q_k (log q_k - log p_k - R)
//                       + (F - R) q_k (dl_k - sum_j q_j dl_j) ]
template <typename acc_t>
HTAKL_HD acc_t grad_student_softmax(const RowStats<acc_t>& st, acc_t p, acc_t log_p, acc_t q,
                                    acc_t log_q, acc_t dl, acc_t sum_q_dl) {
  const acc_t rkl_part = q > acc_t(0) ? q * (log_q - log_p - st.rkl) : acc_t(0);
  return st.grad_scale * (st.lam_h * (q - p) + st.lam_t * rkl_part +
                          (st.fkl - st.rkl) * q * (dl - sum_q_dl));
}

// SPEC 2, student, prob_mean: the k-th term q_tk g_k of the time step t, where
//   g_k = -lam_h p_k / q_k + lam_t (log q_k - log p_k + 1) + (F - R) dl_k.
// The ratio r_tk = q_tk / q_k (in [0, T]) comes from the logs, never from dividing by a tiny
// q_k, and is zero only where log q_tk is -inf: an underflowed q_tk beside an equally tiny q_k
// has a ratio of order 1. Each kernel forms it in its own layout.

// The three class sums of SPEC 2's prob_mean formula that do not involve dl:
//   q_tk g_k = -lam_h p_k r_tk + lam_t q_tk (log q_k - log p_k + 1) + (F - R) q_tk dl_k,
// with r_tk = q_tk / q_k. `q_t_log_ratio` is q_tk (log q_k - log p_k + 1) with 0 log 0 = 0.
template <typename acc_t>
HTAKL_HD acc_t q_t_log_ratio(acc_t q_t, acc_t log_q, acc_t log_p) {
  return q_t > acc_t(0) ? q_t * (log_q - log_p + acc_t(1)) : acc_t(0);
}

template <typename acc_t>
HTAKL_HD acc_t q_t_times_g(const RowStats<acc_t>& st, acc_t p, acc_t ratio, acc_t q_t,
                           acc_t log_ratio_term, acc_t dl) {
  return -st.lam_h * p * ratio + st.lam_t * log_ratio_term + (st.fkl - st.rkl) * q_t * dl;
}

// Per time step t, the row sum G_t = sum_j q_tj g_j from the sums gathered in the statistics
// pass: sum_j p_j r_tj, sum_j q_t_log_ratio_j, and the signed head/tail sums of q_tj.
template <typename acc_t>
HTAKL_HD acc_t time_step_g_sum(const RowStats<acc_t>& st, acc_t sum_p_ratio,
                               acc_t sum_log_ratio_term, acc_t signed_head_sum,
                               acc_t signed_tail_sum) {
  return -st.lam_h * sum_p_ratio + st.lam_t * sum_log_ratio_term +
         (st.fkl - st.rkl) * weighted_dl_sum(st, signed_head_sum, signed_tail_sum);
}

// SPEC 2, student, prob_mean: dL/dz_tk = (1/(T tau)) (q_tk g_k - q_tk G_t).
template <typename acc_t>
HTAKL_HD acc_t grad_student_prob_mean(const RowStats<acc_t>& st, acc_t q_t_g, acc_t q_t,
                                      acc_t g_sum_t, acc_t inv_steps) {
  return st.grad_scale * inv_steps * (q_t_g - q_t * g_sum_t);
}

// SPEC 2, teacher:
//   dL/da_k = (1/tau) [ lam_h p_k (log p_k - log q_k - F) + lam_t (p_k - q_k)
//                       - (F - R) p_k (dl_k - sum_j p_j dl_j) ]
template <typename acc_t>
HTAKL_HD acc_t grad_teacher(const RowStats<acc_t>& st, acc_t p, acc_t log_p, acc_t q, acc_t log_q,
                            acc_t dl, acc_t sum_p_dl) {
  const acc_t fkl_part = p > acc_t(0) ? p * (log_p - log_q - st.fkl) : acc_t(0);
  return st.grad_scale * (st.lam_h * fkl_part + st.lam_t * (p - q) -
                          (st.fkl - st.rkl) * p * (dl - sum_p_dl));
}

// SPEC 1.3, without a sort. Probabilities are non-negative, so their IEEE bit patterns order like
// the values; a radix select over those bits finds the boundary value w: the largest value whose
// "mass at or above" reaches delta. Then
//   head = { p > w }  plus the first r tied members at w (ascending class index), where
//   r = #{ k in 1..n_w : mass_above_w + k * w < delta },
// which is the prefix a stable descending sort followed by a cumulative sum would mark (up to the
// rounding at the boundary that SPEC 1.3 allows).
// If the whole row's mass stays below delta, every class is in the head.
template <typename acc_t>
HTAKL_HD int64_t tied_head_count(acc_t mass_above, acc_t boundary_value, int64_t tied_count,
                                 acc_t delta) {
  // The cumulative sums mass_above + k w grow with k, so r is the closed form
  // ceil((delta - mass_above) / w) - 1, clamped to [0, n] and corrected by one either way for the
  // division's rounding: O(1) for any number of ties (a uniform row ties all C classes; counting
  // them one by one cost milliseconds per row on a GPU). The Triton kernel does the same.
  using std::ceil;
  const acc_t estimate = ceil((delta - mass_above) / boundary_value) - acc_t(1);
  int64_t r = 0;  // also for a NaN estimate
  if (estimate >= static_cast<acc_t>(tied_count)) {
    r = tied_count;
  } else if (estimate > acc_t(0)) {
    r = static_cast<int64_t>(estimate);
  }
  if (r < tied_count && mass_above + static_cast<acc_t>(r + 1) * boundary_value < delta) ++r;
  if (r > 0 && !(mass_above + static_cast<acc_t>(r) * boundary_value < delta)) --r;
  return r;
}

}  // namespace htakl
