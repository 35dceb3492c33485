// CPU entry points for the phases of the vocab-parallel HTA-KL (htakl_kernels/distributed.py):
// each works on one rank's slice of the classes, and the collectives run between them in Python.
// Contracts: htakl_kernels/_ops/hta_kl_phases.py (the PyTorch-op phases there are their
// reference); per-class math: csrc/hta_kl_math.h, the same functions as the fused kernel.
//
// Every tensor is in the accumulation dtype (float or double), contiguous; `[K, R, c]` stacks K
// softmax streams of R rows. Rows run in parallel; within a row every sum runs over the classes
// in ascending order, in double (the per-class terms in the accumulation type, as the fused
// kernel forms them), so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "check_text.h"
#include "hta_kl_math.h"

namespace htakl {
namespace {

constexpr int kMassBits = 62;  // fixed-point scale of the selection's masses (distributed.py)

void check_slice_tensor(const at::Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == dim, name, " must have ", integer_text(dim), " dimensions, got ",
              shape_text(x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (the accumulation dtype), got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

void check_same(const at::Tensor& x, const at::Tensor& like, const char* name,
                const char* other) {
  TORCH_CHECK(x.sizes() == like.sizes(), name, " must have ", other, "'s shape ",
              shape_text(like.sizes()), ", got ", shape_text(x.sizes()));
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), name, " must have ", other, "'s dtype");
}

void check_row_vector(const at::Tensor& x, const char* name, int64_t rows) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.is_contiguous() &&
                  x.dim() == 1 && x.size(0) == rows,
              name, " must be a contiguous CPU int64 tensor of shape [", integer_text(rows), "]");
}

template <typename F>
void for_rows(int64_t rows, int64_t cost_per_row, const F& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cost_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) body(row);
  });
}

// The selection's key of a probability: its bit pattern (non-negative values order like their
// bits), 0 for NaN, which holds no mass.
template <typename acc_t>
int64_t key_of(acc_t p) {
  using bits_t = std::conditional_t<std::is_same_v<acc_t, double>, int64_t, int32_t>;
  if (std::isnan(p)) return 0;
  bits_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  return static_cast<int64_t>(bits);
}

// p * 2**62 truncated, exact (a power-of-two scaling, then floor); p is not NaN (the histogram
// leaves NaN out).
template <typename acc_t>
int64_t fixed_mass(acc_t p) {
  return static_cast<int64_t>(std::floor(static_cast<double>(p) * std::ldexp(1.0, kMassBits)));
}

// x [K, R, c] -> [K, R]: the maximum over the slice, NaN left out, -inf for an empty slice.
at::Tensor slice_max_cpu(const at::Tensor& x) {
  check_slice_tensor(x, "x", 3);
  const int64_t rows = x.size(0) * x.size(1), classes = x.size(2);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hta_kl_slice_max", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    for_rows(rows, classes, [&](int64_t row) {
      scalar_t best = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t k = 0; k < classes; ++k) {
        const scalar_t v = in[row * classes + k];
        best = v > best ? v : best;  // NaN compares false: left out
      }
      result[row] = best;
    });
  });
  return out;
}

// x [K, R, c], row_max [K, R] (over the whole rows) -> (shifted = (x - max) / tau, its
// exponentials, their sums over the slice [K, R] in float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_exp_sums_cpu(const at::Tensor& x,
                                                                  const at::Tensor& row_max,
                                                                  double inv_tau) {
  check_slice_tensor(x, "x", 3);
  check_slice_tensor(row_max, "row_max", 2);
  TORCH_CHECK(row_max.size(0) == x.size(0) && row_max.size(1) == x.size(1) &&
                  row_max.scalar_type() == x.scalar_type(),
              "row_max must be [K, R] = ", shape_text(x.sizes().slice(0, 2)), " in x's dtype");
  const int64_t rows = x.size(0) * x.size(1), classes = x.size(2);
  at::Tensor shifted = at::empty_like(x), exponentials = at::empty_like(x);
  at::Tensor sums = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hta_kl_slice_exp_sums", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* maxima = row_max.const_data_ptr<scalar_t>();
    scalar_t* shift_out = shifted.mutable_data_ptr<scalar_t>();
    scalar_t* exp_out = exponentials.mutable_data_ptr<scalar_t>();
    double* sum_out = sums.mutable_data_ptr<double>();
    const scalar_t scale = static_cast<scalar_t>(inv_tau);
    for_rows(rows, classes, [&](int64_t row) {
      double total = 0;
      for (int64_t k = row * classes; k < (row + 1) * classes; ++k) {
        const scalar_t s = (in[k] - maxima[row]) * scale;
        const scalar_t e = std::exp(s);
        shift_out[k] = s;
        exp_out[k] = e;
        total += static_cast<double>(e);
      }
      sum_out[row] = total;
    });
  });
  return {shifted, exponentials, sums};
}

// One digit of the radix select: over the classes whose key agrees with `prefix` [R] above bit
// shift + width, the count and the fixed-point mass of each value of the digit
// (key >> shift) & (2**width - 1): two int64 tensors [R, 2**width].
std::tuple<at::Tensor, at::Tensor> slice_histogram_cpu(const at::Tensor& p,
                                                       const at::Tensor& prefix, int64_t shift,
                                                       int64_t width) {
  check_slice_tensor(p, "p", 2);
  const int64_t rows = p.size(0), classes = p.size(1);
  check_row_vector(prefix, "prefix", rows);
  const int64_t key_bits = p.scalar_type() == at::kDouble ? 63 : 31;
  TORCH_CHECK(width >= 1 && width <= 16 && shift >= 0 && shift + width <= key_bits,
              "the digit (shift ", integer_text(shift), ", width ", integer_text(width),
              ") must lie within the ", integer_text(key_bits), " key bits, at most 16 bits wide");
  const int64_t buckets = int64_t{1} << width;
  at::Tensor counts = at::zeros({rows, buckets}, prefix.options());
  at::Tensor masses = at::zeros({rows, buckets}, prefix.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hta_kl_slice_histogram", [&] {
    const scalar_t* in = p.const_data_ptr<scalar_t>();
    const int64_t* chosen = prefix.const_data_ptr<int64_t>();
    int64_t* count_out = counts.mutable_data_ptr<int64_t>();
    int64_t* mass_out = masses.mutable_data_ptr<int64_t>();
    for_rows(rows, classes, [&](int64_t row) {
      int64_t* row_counts = count_out + row * buckets;
      int64_t* row_masses = mass_out + row * buckets;
      for (int64_t k = 0; k < classes; ++k) {
        const scalar_t value = in[row * classes + k];
        if (std::isnan(value)) continue;
        const int64_t key = key_of(value);
        if ((key >> (shift + width)) != chosen[row]) continue;
        const int64_t digit = (key >> shift) & (buckets - 1);
        row_counts[digit] += 1;
        row_masses[digit] += fixed_mass(value);
      }
    });
  });
  return {counts, masses};
}

// SPEC 1.3's membership of the slice's classes: key > boundary [R], plus the first
// tied_in_head [R] classes of the slice (ascending index, NaN left out) whose key equals it.
// A boundary of -1 takes the whole row, INT64_MAX none of it.
at::Tensor slice_head_cpu(const at::Tensor& p, const at::Tensor& boundary,
                          const at::Tensor& tied_in_head) {
  check_slice_tensor(p, "p", 2);
  const int64_t rows = p.size(0), classes = p.size(1);
  check_row_vector(boundary, "boundary", rows);
  check_row_vector(tied_in_head, "tied_in_head", rows);
  at::Tensor head = at::empty({rows, classes}, p.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hta_kl_slice_head", [&] {
    const scalar_t* in = p.const_data_ptr<scalar_t>();
    const int64_t* bound = boundary.const_data_ptr<int64_t>();
    const int64_t* tied = tied_in_head.const_data_ptr<int64_t>();
    bool* out = head.mutable_data_ptr<bool>();
    for_rows(rows, classes, [&](int64_t row) {
      int64_t ties_left = tied[row];
      for (int64_t k = row * classes; k < (row + 1) * classes; ++k) {
        const int64_t key = key_of(in[k]);
        bool member = key > bound[row];
        if (key == bound[row] && !std::isnan(in[k]) && ties_left > 0) {
          member = true;
          --ties_left;
        }
        out[k] = member;
      }
    });
  });
  return head;
}

// The slice's tensors of phases 3-4, as raw pointers: p, log p, q, log q [R, c]; the student's
// S softmaxes q_t, log q_t [S, R, c] (S > 1: prob_mean); the head [R, c].
template <typename acc_t>
struct SliceView {
  const acc_t *p, *log_p, *q, *log_q, *q_steps, *log_q_steps;
  const bool* head;
  int64_t rows, classes, softmaxes;

  bool prob_mean() const { return softmaxes > 1; }
  int64_t sums_per_row() const { return 8 + (prob_mean() ? 4 * softmaxes : 0); }
  // q_tk / q_k from the logs (hta_kl_math.h: never a division by a tiny q_k), 0 only where
  // log q_tk is -inf (an underflowed q_tk beside an equally tiny q_k has a ratio of order 1)
  acc_t ratio(int64_t t, int64_t index) const {
    const acc_t log_q_t = log_q_steps[t * rows * classes + index];
    return log_q_t > -std::numeric_limits<acc_t>::infinity() ? std::exp(log_q_t - log_q[index])
                                                             : acc_t(0);
  }
};

void check_phase_tensors(const at::Tensor& p, const at::Tensor& log_p, const at::Tensor& q,
                         const at::Tensor& log_q, const at::Tensor& q_steps,
                         const at::Tensor& log_q_steps, const at::Tensor& head) {
  check_slice_tensor(p, "p", 2);
  check_slice_tensor(q_steps, "q_steps", 3);
  check_same(log_p, p, "log_p", "p");
  check_same(q, p, "q", "p");
  check_same(log_q, p, "log_q", "p");
  for (const at::Tensor* x : {&log_p, &q, &log_q}) {
    TORCH_CHECK(x->is_contiguous(), "p, log_p, q, log_q must be contiguous");
  }
  TORCH_CHECK(q_steps.size(0) >= 1 && q_steps.size(1) == p.size(0) &&
                  q_steps.size(2) == p.size(1) && q_steps.scalar_type() == p.scalar_type(),
              "q_steps must be [S, R, c] with p's R, c and dtype, got ",
              shape_text(q_steps.sizes()));
  check_same(log_q_steps, q_steps, "log_q_steps", "q_steps");
  TORCH_CHECK(log_q_steps.is_contiguous(), "log_q_steps must be contiguous");
  TORCH_CHECK(
      head.scalar_type() == at::kBool && head.sizes() == p.sizes() && head.is_contiguous(),
      "head must be a contiguous bool tensor of p's shape");
}

template <typename acc_t>
SliceView<acc_t> view_of(const at::Tensor& p, const at::Tensor& log_p, const at::Tensor& q,
                         const at::Tensor& log_q, const at::Tensor& q_steps,
                         const at::Tensor& log_q_steps, const at::Tensor& head) {
  return {p.const_data_ptr<acc_t>(),       log_p.const_data_ptr<acc_t>(),
          q.const_data_ptr<acc_t>(),       log_q.const_data_ptr<acc_t>(),
          q_steps.const_data_ptr<acc_t>(), log_q_steps.const_data_ptr<acc_t>(),
          head.const_data_ptr<bool>(),     p.size(0),
          p.size(1),                       q_steps.size(0)};
}

// Phase 3: the slice's row sums [R, n] (SPEC 1.4-1.6, and the class sums of SPEC 2): the head
// and tail distances, F, R, the head and tail sums of q s and of p s, and for prob_mean (S > 1)
// per step the sums of p r_t, of q_t (log q - log p + 1), and the head and tail sums of q_t s.
at::Tensor slice_sums_cpu(const at::Tensor& p, const at::Tensor& log_p, const at::Tensor& q,
                          const at::Tensor& log_q, const at::Tensor& q_steps,
                          const at::Tensor& log_q_steps, const at::Tensor& head) {
  check_phase_tensors(p, log_p, q, log_q, q_steps, log_q_steps, head);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hta_kl_slice_sums", [&] {
    const SliceView<scalar_t> v =
        view_of<scalar_t>(p, log_p, q, log_q, q_steps, log_q_steps, head);
    const int64_t n = v.sums_per_row(), steps = v.softmaxes;
    sums = at::empty({v.rows, n}, p.options());
    scalar_t* out = sums.mutable_data_ptr<scalar_t>();
    for_rows(v.rows, v.classes * steps, [&](int64_t row) {
      double total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = row * v.classes; k < (row + 1) * v.classes; ++k) {
        const scalar_t pk = v.p[k], qk = v.q[k];
        const scalar_t sign = sign_of_difference(qk, pk);
        const int side = v.head[k] ? 0 : 1;
        total[side] += static_cast<double>(std::abs(pk - qk));
        total[2] += static_cast<double>(fkl_term(pk, v.log_p[k], v.log_q[k]));
        total[3] += static_cast<double>(rkl_term(qk, v.log_q[k], v.log_p[k]));
        total[4 + side] += static_cast<double>(qk * sign);
        total[6 + side] += static_cast<double>(pk * sign);
      }
      scalar_t* row_out = out + row * n;
      for (int i = 0; i < 8; ++i) row_out[i] = static_cast<scalar_t>(total[i]);
      if (!v.prob_mean()) return;
      for (int64_t t = 0; t < steps; ++t) {
        double step_total[4] = {0, 0, 0, 0};
        for (int64_t k = row * v.classes; k < (row + 1) * v.classes; ++k) {
          const scalar_t q_t = v.q_steps[t * v.rows * v.classes + k];
          const scalar_t sign = sign_of_difference(v.q[k], v.p[k]);
          step_total[0] += static_cast<double>(v.p[k] * v.ratio(t, k));
          step_total[1] += static_cast<double>(q_t_log_ratio(q_t, v.log_q[k], v.log_p[k]));
          step_total[v.head[k] ? 2 : 3] += static_cast<double>(q_t * sign);
        }
        for (int i = 0; i < 4; ++i) {
          row_out[8 + i * steps + t] = static_cast<scalar_t>(step_total[i]);
        }
      }
    });
  });
  return sums;
}

// Phase 4: from the row sums over the whole rows `totals` [R, n] (phase 3's, summed over the
// ranks): row_scale x loss [R], and the gradients of the slice (SPEC 2) with respect to the
// student's S softmaxes' logits [S, R, c] (a single softmax's carries the 1/steps of a logit
// mean over `steps` steps) and the teacher's [R, c]; empty where not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_grads_cpu(
    const at::Tensor& p, const at::Tensor& log_p, const at::Tensor& q, const at::Tensor& log_q,
    const at::Tensor& q_steps, const at::Tensor& log_q_steps, const at::Tensor& head,
    const at::Tensor& totals, double inv_tau, double row_scale, bool detach_weights, int64_t steps,
    bool want_student, bool want_teacher) {
  check_phase_tensors(p, log_p, q, log_q, q_steps, log_q_steps, head);
  check_slice_tensor(totals, "totals", 2);
  TORCH_CHECK(steps >= 1, "steps must be >= 1, got ", integer_text(steps));
  at::Tensor loss = at::empty({p.size(0)}, p.options());
  at::Tensor d_student =
      at::empty(want_student ? q_steps.sizes() : at::IntArrayRef{0}, p.options());
  at::Tensor d_teacher = at::empty(want_teacher ? p.sizes() : at::IntArrayRef{0}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hta_kl_slice_grads", [&] {
    using acc_t = scalar_t;
    const SliceView<acc_t> v = view_of<acc_t>(p, log_p, q, log_q, q_steps, log_q_steps, head);
    const int64_t n = v.sums_per_row(), softmaxes = v.softmaxes;
    TORCH_CHECK(totals.size(0) == v.rows && totals.size(1) == n &&
                    totals.scalar_type() == p.scalar_type(),
                "totals must be [R, ", integer_text(n), "] in p's dtype, got ",
                shape_text(totals.sizes()));
    const acc_t* sums = totals.const_data_ptr<acc_t>();
    acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
    acc_t* student_out = want_student ? d_student.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* teacher_out = want_teacher ? d_teacher.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t inv_steps = acc_t(1) / static_cast<acc_t>(steps);
    for_rows(v.rows, v.classes * softmaxes, [&](int64_t row) {
      const acc_t* s = sums + row * n;
      const RowStats<acc_t> st = make_row_stats<acc_t>(s[0], s[1], s[2], s[3], detach_weights,
                                                       static_cast<acc_t>(inv_tau),
                                                       static_cast<acc_t>(row_scale));
      loss_out[row] = row_loss(st);
      const acc_t sum_q_dl = weighted_dl_sum(st, s[4], s[5]);
      const acc_t sum_p_dl = weighted_dl_sum(st, s[6], s[7]);
      const auto dl_of = [&](int64_t k) {
        return dlam_h_dq(st, sign_of_difference(v.q[k], v.p[k]), v.head[k]);
      };
      for (int64_t k = row * v.classes; k < (row + 1) * v.classes; ++k) {
        if (teacher_out) {
          teacher_out[k] =
              grad_teacher(st, v.p[k], v.log_p[k], v.q[k], v.log_q[k], dl_of(k), sum_p_dl);
        }
        if (student_out && !v.prob_mean()) {
          student_out[k] = inv_steps * grad_student_softmax(st, v.p[k], v.log_p[k], v.q[k],
                                                            v.log_q[k], dl_of(k), sum_q_dl);
        }
      }
      if (!student_out || !v.prob_mean()) return;
      for (int64_t t = 0; t < softmaxes; ++t) {
        const acc_t g_sum = time_step_g_sum(st, s[8 + t], s[8 + softmaxes + t],
                                            s[8 + 2 * softmaxes + t], s[8 + 3 * softmaxes + t]);
        for (int64_t k = row * v.classes; k < (row + 1) * v.classes; ++k) {
          const int64_t at = t * v.rows * v.classes + k;
          const acc_t q_t = v.q_steps[at];
          const acc_t q_t_g = q_t_times_g(st, v.p[k], v.ratio(t, k), q_t,
                                          q_t_log_ratio(q_t, v.log_q[k], v.log_p[k]), dl_of(k));
          student_out[at] = grad_student_prob_mean(st, q_t_g, q_t, g_sum, inv_steps);
        }
      }
    });
  });
  return {loss, d_student, d_teacher};
}

}  // namespace
}  // namespace htakl

TORCH_LIBRARY_IMPL(htakl, CPU, m) {
  m.impl("hta_kl_slice_max", &htakl::slice_max_cpu);
  m.impl("hta_kl_slice_exp_sums", &htakl::slice_exp_sums_cpu);
  m.impl("hta_kl_slice_histogram", &htakl::slice_histogram_cpu);
  m.impl("hta_kl_slice_head", &htakl::slice_head_cpu);
  m.impl("hta_kl_slice_sums", &htakl::slice_sums_cpu);
  m.impl("hta_kl_slice_grads", &htakl::slice_grads_cpu);
}
