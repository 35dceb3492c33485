// Torch-side checks of the fused HTA-KL op htakl::hta_kl_fused, shared by the CPU kernel file and
// the CUDA binding (the CUDA kernel itself stays torch-free and sees only hta_kl_math.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "check_text.h"
#include "hta_kl_math.h"
#include "torch_storage.h"

namespace htakl {

// student is [T, R, C] and teacher [R, C], both stored as `storage`.
struct HtaKlLayout {
  int64_t steps;
  int64_t rows;
  int64_t classes;
  Storage storage;
};

// The op's tensors, for a kernel of `device` (CPU or CUDA): on that device type, on one device,
// contiguous, of one floating-point dtype, with matching shapes and T, C >= 1.
inline HtaKlLayout check_hta_kl_tensors(const at::Tensor& student, const at::Tensor& teacher,
                                        c10::DeviceType device) {
  TORCH_CHECK(student.device().type() == device && teacher.device().type() == device,
              "hta_kl_fused (", c10::DeviceTypeName(device), "): student and teacher must be ",
              c10::DeviceTypeName(device), " tensors, got student on ", student.device(),
              " and teacher on ", teacher.device());
  TORCH_CHECK(student.device() == teacher.device(),
              "hta_kl_fused: student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(student.dim() == 3, "hta_kl_fused: student must be [T, R, C], got ",
              shape_text(student.sizes()));
  TORCH_CHECK(teacher.dim() == 2, "hta_kl_fused: teacher must be [R, C], got ",
              shape_text(teacher.sizes()));
  TORCH_CHECK(student.size(1) == teacher.size(0) && student.size(2) == teacher.size(1),
              "hta_kl_fused: student ", shape_text(student.sizes()), " does not match teacher ",
              shape_text(teacher.sizes()));
  TORCH_CHECK(student.size(0) >= 1, "hta_kl_fused: student needs T >= 1 time steps");
  TORCH_CHECK(teacher.size(1) >= 1, "hta_kl_fused: C must be >= 1");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "hta_kl_fused: student and teacher must have the same dtype, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  const Storage storage = storage_of(teacher.scalar_type(), "hta_kl_fused: student and teacher");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(),
              "hta_kl_fused: student and teacher must be contiguous");
  return {student.size(0), teacher.size(0), teacher.size(1), storage};
}

// The op's scalar options, checked.
inline HtaKlOptions make_hta_kl_options(double temperature, double delta, bool logit_mean,
                                        bool detach_weights, double row_scale) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "hta_kl_fused: temperature must be finite and > 0, got ", real_text(temperature));
  TORCH_CHECK(delta > 0 && delta <= 1, "hta_kl_fused: delta must be in (0, 1], got ",
              real_text(delta));
  TORCH_CHECK(std::isfinite(row_scale) && row_scale > 0,
              "hta_kl_fused: row_scale must be finite and > 0, got ", real_text(row_scale));
  return {temperature, delta, logit_mean, detach_weights, row_scale};
}

}  // namespace htakl
