// Run-time choice between the two copies of a CPU kernel: one compiled for the baseline
// instruction set, one (x86-64 with GCC) for AVX2 + FMA. cpu_isa_copies.h includes a kernel header
// inside `namespace baseline` and, when HTAKL_CPU_AVX2 is defined, inside `namespace avx2` under
// `#pragma GCC target("avx2,fma")`; functions from headers included before that keep their
// baseline target and inline into both copies.
#pragma once

#include <cstdlib>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HTAKL_CPU_AVX2 1
#endif

namespace htakl {

// True when the AVX2 copy should run: the CPU has AVX2 and FMA, and HTAKL_CPU_ISA=baseline does
// not force the baseline copy (the tests compare the two).
inline bool use_avx2() {
#ifdef HTAKL_CPU_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* forced = std::getenv("HTAKL_CPU_ISA");
  return supported && !(forced != nullptr && std::string_view(forced) == "baseline");
#else
  return false;
#endif
}

}  // namespace htakl
