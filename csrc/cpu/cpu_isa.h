// Run-time choice between the copies of a CPU kernel: one compiled for the baseline instruction
// set, one (x86-64 with GCC) for AVX2 + FMA, and for kernels that ask for it one for AVX-512
// (F, DQ, BW, VL). cpu_isa_copies.h includes a kernel header inside `namespace baseline`, and when
// HTAKL_CPU_AVX2 is defined inside `namespace avx2` under `#pragma GCC target("avx2,fma")` (and
// `namespace avx512` likewise); functions from headers included before that keep their baseline
// target and inline into every copy.
#pragma once

#include <cstdlib>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HTAKL_CPU_AVX2 1
#endif

namespace htakl {

// HTAKL_CPU_ISA=baseline or HTAKL_CPU_ISA=avx2 caps the copy that runs (the tests compare the
// copies); unset, the widest one the CPU supports runs.
inline std::string_view forced_cpu_isa() {
  const char* forced = std::getenv("HTAKL_CPU_ISA");
  return forced == nullptr ? std::string_view() : std::string_view(forced);
}

// True when the AVX2 copy may run: the CPU has AVX2 and FMA, and HTAKL_CPU_ISA=baseline does not
// force the baseline copy.
inline bool use_avx2() {
#ifdef HTAKL_CPU_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported && forced_cpu_isa() != "baseline";
#else
  return false;
#endif
}

// True when an AVX-512 copy should run: the CPU also has AVX-512 F, DQ, BW and VL, and
// HTAKL_CPU_ISA caps nothing.
inline bool use_avx512() {
#ifdef HTAKL_CPU_AVX2
  static const bool supported =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  const std::string_view forced = forced_cpu_isa();
  return supported && use_avx2() && forced != "avx2";
#else
  return false;
#endif
}

}  // namespace htakl
