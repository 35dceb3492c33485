// The instruction-set copies of a CPU kernel header (see cpu_isa.h). Usage:
//
//   #define HTAKL_CPU_KERNELS "lif_cpu_kernels.h"
//   #include "cpu_isa_copies.h"
//
// defines the header's contents in `namespace baseline` and, where HTAKL_CPU_AVX2 is defined, in
// `namespace avx2` compiled for AVX2 + FMA. Defining HTAKL_CPU_KERNELS_AVX512 as well adds
// `namespace avx512`, compiled for AVX-512 F, DQ, BW and VL (32 vector registers and mask
// registers help wide loops even at 256 bits; a kernel opts in where that pays for its compile
// time). No include guard: a file may include it once per kernel header.
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
#ifdef HTAKL_CPU_KERNELS_AVX512
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")
namespace avx512 {
#include HTAKL_CPU_KERNELS
}  // namespace avx512
#pragma GCC pop_options
#endif
#endif

#undef HTAKL_CPU_KERNELS
#undef HTAKL_CPU_KERNELS_AVX512
