// The two instruction-set copies of a CPU kernel header (see cpu_isa.h). Usage:
//
//   #define HTAKL_CPU_KERNELS "lif_cpu_kernels.h"
//   #include "cpu_isa_copies.h"
//
// defines the header's contents in `namespace baseline` and, where HTAKL_CPU_AVX2 is defined, in
// `namespace avx2` compiled for AVX2 + FMA. No include guard: a file may include it once per
// kernel header.
#ifndef HTAKL_CPU_KERNELS
#error "define HTAKL_CPU_KERNELS as the kernel header to include before including cpu_isa_copies.h"
#endif

namespace baseline {
#include HTAKL_CPU_KERNELS
}  // namespace baseline

#ifdef HTAKL_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include HTAKL_CPU_KERNELS
}  // namespace avx2
#pragma GCC pop_options
#endif

#undef HTAKL_CPU_KERNELS
