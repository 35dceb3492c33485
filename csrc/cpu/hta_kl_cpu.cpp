// Fused CPU kernel for htakl::hta_kl_fused (contract: htakl_kernels/_ops/hta_kl.py; math:
// docs/SPEC.md sections 1 and 2, per element in csrc/hta_kl_math.h).
//
// One row at a time, rows in parallel, in the four passes of docs/ARCHITECTURE.md:
//   1. softmax statistics: max of the teacher and of the student logits (per time step for
//      prob_mean), shifted logits and their exponentials into a per-thread workspace, softmax
//      sums in a wider type, then one normalising sweep to p, log p, q, log q (SPEC 1.1, 1.2);
//   2. head selection: a radix select over the probability bits, no sort: one histogram sweep
//      and one compaction sweep over the row, the later digits over the few remaining candidates;
//      then the membership as a 0 / 1 mask (SPEC 1.3);
//   3. row sums: distances, FKL, RKL and the signed sums the gradients need (SPEC 1.4-1.6);
//   4. gradients: one sweep for the student and one for the teacher (SPEC 2).
// Reductions accumulate in kLanes interleaved partial sums combined in a fixed order: the loops
// vectorize without reassociation, and the result does not depend on alignment or thread count.
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
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "huge_pages.h"
#include "hta_kl_math.h"
#include "hta_kl_op.h"

namespace htakl {
namespace {

// The row kernel, compiled three times (cpu_isa.h): for the baseline instruction set, for AVX2 +
// FMA and for AVX-512, which runs it about a quarter faster than AVX2 on the CPUs we measured.
#define HTAKL_CPU_KERNELS "hta_kl_cpu_rows.h"
#define HTAKL_CPU_KERNELS_AVX512
#include "cpu_isa_copies.h"

template <template <typename> class Kernel, typename scalar_t>
Kernel<scalar_t> make_kernel(const at::Tensor& student, const at::Tensor& teacher,
                             at::Tensor& loss, at::Tensor& d_student, at::Tensor& d_teacher,
                             bool grad_student, bool grad_teacher, const HtaKlOptions& options) {
  using acc_t = htakl::acc_t<scalar_t>;
  return {student.const_data_ptr<scalar_t>(),
          teacher.const_data_ptr<scalar_t>(),
          loss.mutable_data_ptr<acc_t>(),
          grad_student ? d_student.mutable_data_ptr<scalar_t>() : nullptr,
          grad_teacher ? d_teacher.mutable_data_ptr<scalar_t>() : nullptr,
          student.size(0), teacher.size(0), teacher.size(1), options};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hta_kl_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double delta,
    bool logit_mean, bool detach_weights, bool grad_student, bool grad_teacher, double row_scale) {
  const HtaKlLayout layout = check_hta_kl_tensors(student, teacher, c10::DeviceType::CPU);
  const HtaKlOptions options =
      make_hta_kl_options(temperature, delta, logit_mean, detach_weights, row_scale);

  // One loss per row, in the accumulation type.
  at::Tensor loss =
      at::empty({layout.rows}, teacher.options().dtype(acc_dtype(teacher.scalar_type())));
  at::Tensor d_student =
      grad_student ? empty_like_huge_pages(student) : at::empty({0}, student.options());
  at::Tensor d_teacher =
      grad_teacher ? empty_like_huge_pages(teacher) : at::empty({0}, teacher.options());
  if (layout.rows == 0) return {loss, d_student, d_teacher};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "hta_kl_fused_cpu", [&] {
#ifdef HTAKL_CPU_AVX2
    if (use_avx512()) {
      avx512::run_rows(make_kernel<avx512::RowKernel, scalar_t>(
          student, teacher, loss, d_student, d_teacher, grad_student, grad_teacher, options));
      return;
    }
    if (use_avx2()) {
      avx2::run_rows(make_kernel<avx2::RowKernel, scalar_t>(
          student, teacher, loss, d_student, d_teacher, grad_student, grad_teacher, options));
      return;
    }
#endif
    baseline::run_rows(make_kernel<baseline::RowKernel, scalar_t>(
        student, teacher, loss, d_student, d_teacher, grad_student, grad_teacher, options));
  });
  return {loss, d_student, d_teacher};
}

}  // namespace
}  // namespace htakl

TORCH_LIBRARY_IMPL(htakl, CPU, m) { m.impl("hta_kl_fused", &htakl::hta_kl_fused_cpu); }
