// Host-side checks of the CUDA HTA-KL kernel's shared-memory layout arithmetic (no GPU needed:
// nothing here launches or calls the CUDA runtime). Built and run by
// tests/test_hta_kl_cuda_layout.py. Prints each failure with its storage type and case, and exits
// non-zero if there was any.
#include <cstdio>

#include "cuda/hta_kl_cuda_kernels.cuh"

namespace {

int failures = 0;

void fail(const char* type, const char* what, long long a, long long b) {
  std::fprintf(stderr, "%s: %s (%lld, %lld)\n", type, what, a, b);
  ++failures;
}

template <typename scalar_t>
void check_type(const char* type) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int64_t kGroup = htakl::kStepGroupOf<acc_t>;
  for (int64_t steps = 1; steps <= 4096; ++steps) {
    const int64_t slots = htakl::step_slots<scalar_t>(steps);
    if (slots < steps || slots >= steps + kGroup || slots % kGroup != 0) {
      fail(type, "step_slots is not T rounded up to whole step groups", steps, slots);
    }
    // add_step_sums' widened read of a group: step_lse[group .. group + kGroup - 1], for every
    // group with a step; it must stay inside step_lse (below step_g_sums = step_lse + slots).
    for (int64_t group = 0; group < steps; group += kGroup) {
      if (group + kGroup > slots) {
        fail(type, "a step group's read reaches step_g_sums", steps, group);
      }
    }
    const size_t bytes = htakl::step_values_bytes<scalar_t>(steps);
    if (bytes != static_cast<size_t>(2 * slots) * sizeof(acc_t) ||
        bytes % htakl::kVectorBytes != 0) {
      fail(type, "step_values_bytes is not step_lse and step_g_sums in 16-byte units", steps,
           static_cast<long long>(bytes));
    }
  }
  // max_steps_within: the largest T whose step values and longest candidate lists fit.
  const size_t list_bytes = 2 * htakl::kCandidates * sizeof(htakl::radix_key_t<scalar_t>);
  for (size_t limit = 0; limit <= list_bytes + 4096; limit += (limit < list_bytes ? 1024 : 1)) {
    const int64_t most = htakl::max_steps_within<scalar_t>(limit);
    const auto front = [&](int64_t steps) {
      return htakl::step_values_bytes<scalar_t>(steps) + list_bytes;
    };
    if (most < 0 || (most > 0 && front(most) > limit) || front(most + 1) <= limit) {
      fail(type, "max_steps_within is not the largest T that fits", static_cast<long long>(limit),
           most);
    }
  }
  const size_t hopper_limit = 232448 - 8192;  // the order of a Hopper block's dynamic limit
  if (htakl::max_steps_within<scalar_t>(hopper_limit) < 1000) {
    fail(type, "max_steps_within leaves fewer than 1000 steps on a Hopper block",
         static_cast<long long>(hopper_limit), htakl::max_steps_within<scalar_t>(hopper_limit));
  }
}

}  // namespace

int main() {
  check_type<float>("float32");
  check_type<double>("float64");
  check_type<__half>("float16");
  check_type<__nv_bfloat16>("bfloat16");
  if (failures != 0) return 1;
  std::printf("hta_kl layout checks passed\n");
  return 0;
}
