// The torch side of common.h's storage types, for the argument checks (hta_kl_op.h, lif_op.h) and
// the CUDA bindings: a tensor dtype as a Storage, and the dtype of its accumulation type.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace htakl {

// `what` names the op and argument in the error for a dtype no kernel stores.
inline Storage storage_of(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat: return Storage::kFloat32;
    case at::kDouble: return Storage::kFloat64;
    case at::kHalf: return Storage::kFloat16;
    case at::kBFloat16: return Storage::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, what, " must be floating-point (float16, bfloat16, float32 or float64), got ",
              dtype);
}

// acc_t<T> of common.h as a dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace htakl
