// CUDA HTA-KL: the loss of every row and, on request, its gradients, in one launch (SPEC 1, 2).
//
// Work layout. One block per row (a grid-stride loop when there are more rows than a grid holds).
// The block sweeps its row several times; each sweep is a "pass" below, each ends in a block
// reduction in a fixed order, so results are bit-for-bit reproducible (no float atomics):
//   1. teacher log-sum-exp (SPEC 1.1);
//   2. student log-sum-exp: of each step for prob_mean / 2-D, of the mean logits for logit_mean
//      (SPEC 1.2);
//   3. head boundary: radix select over the bits of p, 8 bits per round; the row is swept until
//      the candidates left fit a shared-memory list, later rounds read the list (SPEC 1.3);
//   4. the row sums: d_head, d_tail, F, R and the signed sums the gradient needs (SPEC 1.4-1.6);
//   5. gradients (SPEC 2): teacher and single-softmax student in one pass; prob_mean students with
//      T > 1 need per-step sums first (one pass per group of kStepGroupOf steps) and then one pass.
// docs/ARCHITECTURE.md groups these into its four passes shared by all backends: 1-2 are its
// Pass 1, 3 its Pass 2, 4 its Pass 3, 5 its Pass 4 (the numbers here are bench/census's anchors).
// p, q and their logs are recomputed from the logits in every pass with the same expressions
// (explicit fma, so the compiler cannot contract them differently), hence bit-identical between
// passes: the head membership found in pass 3 is exactly the one passes 4 and 5 see. float math
// works in base 2 (LogBase: one exp2 per softmax, no log per class). Each kind of student (one
// softmax, logit_mean, prob_mean) is its own kernel (Student), so no pass carries another's code.
//
// Memory. When the row (teacher plus T student steps, storage dtype) fits in shared memory and
// the copy still leaves two blocks per SM (or costs none), the block copies it there once with
// 16-byte loads and every pass reads shared memory: the kernel reads each input byte from DRAM
// once. Other rows (C up to 2^31 - 1) are re-read from global memory in every pass (mostly L2
// hits); that is the multi-pass path. Rows are addressed by 64-bit base pointers and 32-bit
// offsets within the row. Every pass walks its row's whole 16-byte chunks
// with one vector access each and no bounds checks when all the row's pointers are aligned, then
// the row's edge element by element (for_each_span). A single block per row loops over any C; a cooperating group of blocks per row
// is not implemented: it only pays off when there are fewer rows than SMs.
//
// Head boundary without a sort (SPEC 1.3, `tied_head_count` in hta_kl_math.h). Non-negative floats
// order like their bit patterns. The boundary value w is the largest p whose "mass at or above"
// reaches delta; it is found digit by digit from the most significant bits: a histogram of the
// mass of the candidates per 8-bit digit, then the largest digit whose suffix mass (plus the mass
// already known to lie above) reaches delta. The masses are summed in 2^-62 fixed point with
// integer atomics: exact, hence independent of the atomics' order, and the mass of a digit's bucket
// equals the sum of its sub-buckets at the next digit, so the selection is self-consistent. Once
// the candidates (classes whose key has the digits chosen so far) number at most kCandidates, the
// sweep of that round also lists their keys in shared memory, and the later rounds read only the
// list, each keeping the keys still candidates for the next: a row is swept once when
// C <= kCandidates, typically twice otherwise.
// Head = {p > w} plus the first r classes tied at w by ascending index (a block-wide ordered count
// finds the r-th only when 0 < r < #ties). If the row's whole mass is below delta, every class is
// in the head.
//
// The kernel and its launcher for any storage type (HtaKlCudaLaunch, hta_kl_cuda_launch.h). Each
// hta_kl_cuda_<type>.cu instantiates them for one type, so that the kernels of the four types
// compile in separate translation units (in parallel in the build); hta_kl_cuda.cu dispatches on
// the storage type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>

#include "../hta_kl_math.h"
#include "hta_kl_cuda_launch.h"
#include "launch_kernel.h"

namespace htakl {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 512;  // 128 registers per thread: the per-chunk arrays stay in registers
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kRadixBits = 8;
constexpr int kRadixBuckets = 1 << kRadixBits;
constexpr int kBucketsPerLane = kRadixBuckets / kWarpSize;
constexpr int kCandidates = 2048;  // boundary candidates whose keys pass 3 keeps in shared memory
// Chunks each thread takes at least: a short row gets fewer threads, so that its per-row work
// (block reductions, the selection's bookkeeping) is spread over more classes per thread.
constexpr int kChunksPerThread = 4;
constexpr int kStepGroup = 4;                 // prob_mean steps whose sums one pass gathers
constexpr int kSumsPerStep = 4;               // sum p r_t, sum q_t (log q - log p + 1), signed H/T
constexpr int kMaxSums = kStepGroup * kSumsPerStep;
// double's sums take two registers each and its exp many more: one step per group keeps the
// prob_mean row-sums pass within 128 registers without spilling (double's speed is secondary).
template <typename acc_t>
constexpr int kStepGroupOf = sizeof(acc_t) == 8 ? 1 : kStepGroup;
template <typename acc_t>
constexpr int kStepSumsOf = kStepGroupOf<acc_t> * kSumsPerStep;
constexpr int kVectorBytes = 16;
// Resident blocks per SM a row cache in shared memory must leave (the launcher's choice).
constexpr int kMinCachingBlocksPerSm = 2;

// ---------------------------------------------------------------------------------------------
// Types: storage -> accumulation is common.h's acc_t (to_acc / from_acc convert); the key type of
// radix select is the unsigned integer as wide as acc_t.

template <typename scalar_t>
using radix_key_t = std::conditional_t<sizeof(acc_t<scalar_t>) == 8, uint64_t, uint32_t>;

__device__ __forceinline__ float fused_multiply_add(float a, float b, float c) {
  return fmaf(a, b, c);
}
__device__ __forceinline__ double fused_multiply_add(double a, double b, double c) {
  return fma(a, b, c);
}

// Probabilities are >= 0, so their bit patterns order like their values (SPEC 1.3 via radix).
__device__ __forceinline__ uint32_t key_of(float p) { return __float_as_uint(p); }
__device__ __forceinline__ uint64_t key_of(double p) {
  return static_cast<uint64_t>(__double_as_longlong(p));
}
__device__ __forceinline__ float value_of_key(uint32_t key) { return __uint_as_float(key); }
__device__ __forceinline__ double value_of_key(uint64_t key) {
  return __longlong_as_double(static_cast<long long>(key));
}

// Mass in 2^-62 fixed point: a row's total (about 1) fits an unsigned 64-bit integer four times
// over, and a probability below 2^-63 rounds to zero (at most C * 2^-63 of mass ignored).
constexpr double kFixedOne = 4611686018427387904.0;  // 2^62
__device__ __forceinline__ unsigned long long fixed_mass(float p) {
  return __float2ull_rn(p * static_cast<float>(kFixedOne));
}
__device__ __forceinline__ unsigned long long fixed_mass(double p) {
  return __double2ull_rn(p * kFixedOne);
}

// ---------------------------------------------------------------------------------------------
// 16-byte chunks of a row. A row of C elements is cut into chunks of kWidth elements. Offsets in
// a row are 32-bit (C < 2^31, and an offset plus a block's stride stays below 2^32); the row's
// base pointer carries the 64-bit part. A pass walks its row in two loops (for_each_span): the
// whole chunks of a row whose pointers are all 16-byte aligned, with one 16-byte access each and
// no bounds checks (kWhole), then the row's edge element by element (the last partial chunk, or
// every chunk of an unaligned row). Elements past C read as 0 and are never stored; callers skip
// them in their sums (Span::has).

// Which elements of a chunk are in the row: all of them for a whole chunk.
template <bool kWhole>
struct Span {
  uint32_t first;    // the chunk's first element
  uint32_t classes;  // the row's length
  __device__ __forceinline__ bool has(int j) const {
    return kWhole || first + static_cast<uint32_t>(j) < classes;
  }
};

template <typename scalar_t>
struct Chunk {
  static constexpr int kWidth = kVectorBytes / static_cast<int>(sizeof(scalar_t));
  using acc_t = htakl::acc_t<scalar_t>;

  template <bool kWhole>
  __device__ __forceinline__ static void load(const scalar_t* row, Span<kWhole> span,
                                              acc_t (&out)[kWidth]) {
    if constexpr (kWhole) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + span.first);
      scalar_t values[kWidth];
      memcpy(values, &raw, sizeof(raw));
#pragma unroll
      for (int j = 0; j < kWidth; ++j) out[j] = to_acc(values[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        out[j] = span.has(j) ? to_acc(row[span.first + j]) : acc_t(0);
      }
    }
  }

  template <bool kWhole>
  __device__ __forceinline__ static void store(scalar_t* row, Span<kWhole> span,
                                               const acc_t (&in)[kWidth]) {
    if constexpr (kWhole) {
      scalar_t values[kWidth];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) values[j] = from_acc<scalar_t>(in[j]);
      uint4 raw;
      memcpy(&raw, values, sizeof(raw));
      *reinterpret_cast<uint4*>(row + span.first) = raw;
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        if (span.has(j)) row[span.first + j] = from_acc<scalar_t>(in[j]);
      }
    }
  }

  // Copy of a chunk in storage dtype (global row -> shared-memory row, which is 16-byte aligned
  // and padded to whole chunks).
  template <bool kWhole>
  __device__ __forceinline__ static void copy(scalar_t* dst, const scalar_t* src,
                                              Span<kWhole> span) {
    if constexpr (kWhole) {
      *reinterpret_cast<uint4*>(dst + span.first) =
          *reinterpret_cast<const uint4*>(src + span.first);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        if (span.has(j)) dst[span.first + j] = src[span.first + j];
      }
    }
  }
};

__device__ __forceinline__ bool vector_aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % kVectorBytes == 0;
}

// The elements of a row's whole chunks: C rounded down to whole chunks when `aligned` (every
// pointer the pass reads or writes is 16-byte aligned, and so is the distance between steps),
// none otherwise (the whole row is its edge).
template <typename scalar_t>
__device__ __forceinline__ uint32_t whole_chunks_end(uint32_t classes, bool aligned) {
  constexpr uint32_t kWidth = Chunk<scalar_t>::kWidth;
  return aligned ? classes / kWidth * kWidth : 0u;
}

// First element of this thread's first chunk, and the distance between its chunks.
template <typename scalar_t>
__device__ __forceinline__ uint32_t first_chunk_start() {
  return threadIdx.x * static_cast<uint32_t>(Chunk<scalar_t>::kWidth);
}
template <typename scalar_t>
__device__ __forceinline__ uint32_t chunk_stride() {
  return blockDim.x * static_cast<uint32_t>(Chunk<scalar_t>::kWidth);
}

// Calls visit(span) for each of this thread's chunks of a row of `classes` elements: the whole
// chunks below `whole_end` first (Span<true>), then the edge (Span<false>).
template <typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_span(uint32_t classes, uint32_t whole_end, Visit visit) {
  uint32_t first = first_chunk_start<scalar_t>();
  for (; first < whole_end; first += chunk_stride<scalar_t>()) visit(Span<true>{first, classes});
  for (; first < classes; first += chunk_stride<scalar_t>()) visit(Span<false>{first, classes});
}

// ---------------------------------------------------------------------------------------------
// The base of the kernel's logarithms. float math works in base 2: logits are scaled once by
// log2(e) / tau, so every softmax is one exp2 (one MUFU op) of one fma and every normaliser a
// base-2 log-sum-exp; the natural logs that hta_kl_math.h's SPEC 1.6 and 2 formulas take are
// base-2 logs times ln 2, so no log is taken per class except in a prob_mean student's
// log-sum-exp over its steps. double keeps the full-precision natural exp and log (its factors
// are 1 and fold away).

template <typename acc_t>
struct LogBase;

template <>
struct LogBase<float> {
  static constexpr double kPerNatural = 1.4426950408889634;  // log2(e): base-2 units per nat
  // One MUFU op: subnormal results flush to zero (a probability below 2^-126 carries less mass
  // than the selection's 2^-62 fixed point resolves, and terms of that size vanish in every sum).
  // (The host arms serve tests/cuda/host's emulation: the same functions, flushed alike.)
  __device__ __forceinline__ static float exp(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    const float y = exp2f(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
#endif
  }
  // Only of a log-sum-exp's scaled sum: 0 or at least 1 (its maximum term is 1), never subnormal.
  __device__ __forceinline__ static float log(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return log2f(x);
#endif
  }
  __device__ __forceinline__ static float to_natural(float x) { return x * 0.6931471805599453f; }
};

template <>
struct LogBase<double> {
  static constexpr double kPerNatural = 1.0;
  __device__ __forceinline__ static double exp(double x) { return ::exp(x); }
  __device__ __forceinline__ static double log(double x) { return ::log(x); }
  __device__ __forceinline__ static double to_natural(double x) { return x; }
};

// ---------------------------------------------------------------------------------------------
// Log-sum-exp in one sweep, in LogBase units: the running maximum and the sum of exp(x - max).
// -inf contributes nothing; NaN poisons the sum (so the row's result is NaN, as the reference's
// softmax gives); +inf gives max = +inf and a NaN sum as soon as anything is compared against it,
// again like the reference (exp(inf - inf)).

template <typename acc_t>
struct LogSumExp {
  acc_t max_value;
  acc_t scaled_sum;

  __device__ __forceinline__ static LogSumExp empty() { return {acc_t(-INFINITY), acc_t(0)}; }

  __device__ __forceinline__ void add(acc_t x) {
    if (x > max_value) {
      scaled_sum = scaled_sum * LogBase<acc_t>::exp(max_value - x) + acc_t(1);
      max_value = x;
    } else if (!(x == acc_t(-INFINITY))) {
      scaled_sum += LogBase<acc_t>::exp(x - max_value);  // NaN x lands here: poisons the sum
    }
  }

  // A chunk of values at once (padding past the row's end given as -inf): one rescale per chunk
  // at most, then one exp per value. Same rules: -inf adds nothing (also when everything so far
  // is -inf: the shift is then 0), NaN poisons the sum (fmax ignores it in the maximum), +inf
  // makes the sum NaN.
  template <int N>
  __device__ __forceinline__ void add_chunk(const acc_t (&x)[N]) {
    acc_t chunk_max = x[0];
#pragma unroll
    for (int j = 1; j < N; ++j) chunk_max = fmax(chunk_max, x[j]);
    if (chunk_max > max_value) {
      scaled_sum *= LogBase<acc_t>::exp(max_value - chunk_max);
      max_value = chunk_max;
    }
    const acc_t shift = max_value == acc_t(-INFINITY) ? acc_t(0) : max_value;
#pragma unroll
    for (int j = 0; j < N; ++j) scaled_sum += LogBase<acc_t>::exp(x[j] - shift);
  }

  // Commutative (bit for bit): the maxima are never NaN, fmax is symmetric, + commutes.
  __device__ __forceinline__ void merge(const LogSumExp& other) {
    const acc_t merged_max = fmax(max_value, other.max_value);
    if (merged_max == acc_t(-INFINITY)) {
      scaled_sum += other.scaled_sum;  // both empty (or NaN-poisoned): no rescaling to do
    } else {
      scaled_sum = scaled_sum * LogBase<acc_t>::exp(max_value - merged_max) +
                   other.scaled_sum * LogBase<acc_t>::exp(other.max_value - merged_max);
    }
    max_value = merged_max;
  }

  __device__ __forceinline__ acc_t value() const {
    return max_value + LogBase<acc_t>::log(scaled_sum);
  }
};

// ---------------------------------------------------------------------------------------------
// Block-wide reductions. Fixed order: a butterfly within each warp, then every thread adds the
// warps' partials in warp order, so every thread holds the same bits. blockDim.x is a multiple of
// 32 (whole warps) and at most kMaxThreads.

template <typename acc_t>
struct BlockScratch {
  acc_t partial[kMaxSums][kMaxWarps];
  acc_t lse_max[kMaxWarps];
  acc_t lse_sum[kMaxWarps];
  unsigned long long radix_mass[kRadixBuckets];
  unsigned int radix_count[kRadixBuckets];
  unsigned long long selected_mass_above;  // radix select: mass strictly above the chosen digit
  unsigned int selected_digit;
  unsigned int selected_count;
  int selected_found;
  unsigned int candidate_count;  // keys listed (in the dynamic shared memory, KernelParams)
  unsigned int warp_tied[kMaxWarps];  // tie search: tied classes per warp in one sweep
  long long tie_limit;
};

template <int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&values)[N], BlockScratch<acc_t>& scratch) {
  static_assert(N <= kMaxSums, "BlockScratch::partial holds kMaxSums sums");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      values[k] += __shfl_xor_sync(kFullMask, values[k], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch.partial[k][warp] = values[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    acc_t total = acc_t(0);
#pragma unroll 1  // a few warps: a short loop, not an unrolled copy with remainder code per sum
    for (int w = 0; w < warps; ++w) total += scratch.partial[k][w];
    values[k] = total;
  }
  __syncthreads();  // scratch is reused by the next reduction
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_logsumexp(LogSumExp<acc_t> mine,
                                                 BlockScratch<acc_t>& scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    LogSumExp<acc_t> other;
    other.max_value = __shfl_xor_sync(kFullMask, mine.max_value, offset);
    other.scaled_sum = __shfl_xor_sync(kFullMask, mine.scaled_sum, offset);
    mine.merge(other);
  }
  if (lane == 0) {
    scratch.lse_max[warp] = mine.max_value;
    scratch.lse_sum[warp] = mine.scaled_sum;
  }
  __syncthreads();
  LogSumExp<acc_t> total = LogSumExp<acc_t>::empty();
#pragma unroll 1
  for (int w = 0; w < warps; ++w) total.merge({scratch.lse_max[w], scratch.lse_sum[w]});
  __syncthreads();
  return total.value();
}

// ---------------------------------------------------------------------------------------------
// One launch's parameters and one row's view.

template <typename scalar_t>
struct KernelParams {
  using acc_t = htakl::acc_t<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  acc_t* loss_rows;
  scalar_t* grad_student;  // nullptr: not requested
  scalar_t* grad_teacher;  // nullptr: not requested
  int64_t steps, rows, classes;
  acc_t inv_tau, delta, inv_steps;
  acc_t logit_scale;               // LogBase units per logit: log_b(e) / tau
  acc_t log_steps;                 // log_b T
  acc_t row_scale;                 // HtaKlOptions::row_scale
  unsigned long long delta_fixed;  // delta in 2^-62 fixed point, at least 1
  bool detach_weights;
  bool cache_rows;             // copy the row to shared memory first
  int64_t cache_row_stride;    // classes rounded up to whole chunks (shared-memory row stride)
  int64_t step_slots;          // step_lse's and step_g_sums' length: T in whole step groups
  int64_t list_capacity;       // keys a candidate list holds: min(C, kCandidates)
  size_t list_bytes;           // the two lists' shared-memory bytes (16-byte multiple)
};

// How a row's student distribution is formed (SPEC 1.2); each is its own kernel, so no pass carries
// the code of another.
enum class Student {
  kSingle,     // one softmax: a 2-D student, or T = 1
  kLogitMean,  // softmax of the mean logits, T > 1
  kProbMean,   // mean of the T > 1 steps' softmaxes
};

template <typename scalar_t, Student kStudent>
struct RowView {
  using acc_t = htakl::acc_t<scalar_t>;
  using key_t = radix_key_t<scalar_t>;
  static constexpr int kWidth = Chunk<scalar_t>::kWidth;

  const scalar_t* teacher;  // global row or its shared-memory copy
  const scalar_t* student;  // step 0
  int64_t step_stride;      // elements from one step's row to the next
  uint32_t classes;
  uint32_t whole_end;       // the whole chunks the passes read (whole_chunks_end)
  int64_t steps;            // 1 for a single softmax (step_count)
  acc_t logit_scale, inv_steps, log_steps;  // KernelParams'
  // Log-sum-exps and every log below are in LogBase<acc_t> units (natural for double, base 2
  // otherwise).
  acc_t teacher_lse;        // SPEC 1.1: logsumexp(a / tau)
  acc_t mean_lse;           // SPEC 1.2 logit_mean: logsumexp(mean_t z_t / tau)
  const acc_t* step_lse;    // SPEC 1.2 otherwise: logsumexp(z_t / tau) per step (shared memory)
  key_t boundary_key;       // SPEC 1.3: head = key > boundary_key, or == and index < tie_limit
  uint32_t tie_limit;

  // The student's steps, a compile-time 1 for a single softmax.
  __device__ __forceinline__ int64_t step_count() const {
    return kStudent == Student::kSingle ? 1 : steps;
  }
  __device__ __forceinline__ const scalar_t* step(int64_t t) const {
    return student + t * step_stride;
  }

  // SPEC 1.1: log p = a / tau - logsumexp(a / tau), and p = exp(log p). Every pass computes them
  // with these expressions, so every pass sees the same bits of p.
  __device__ __forceinline__ acc_t teacher_log_prob(acc_t logit) const {
    return fused_multiply_add(logit, logit_scale, -teacher_lse);
  }
  __device__ __forceinline__ static acc_t prob(acc_t log_prob) {
    return LogBase<acc_t>::exp(log_prob);
  }

  template <bool kWhole>
  __device__ __forceinline__ void teacher_log_probs(Span<kWhole> span,
                                                    acc_t (&log_p)[kWidth]) const {
    Chunk<scalar_t>::load(teacher, span, log_p);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) log_p[j] = teacher_log_prob(log_p[j]);
  }

  // log softmax(z_t / tau) of one step (prob_mean and 2-D students).
  __device__ __forceinline__ acc_t step_log_prob(acc_t logit, int64_t t) const {
    return fused_multiply_add(logit, logit_scale, -step_lse[t]);
  }

  // SPEC 1.2: log q of a chunk of classes, from all T steps.
  template <bool kWhole>
  __device__ __forceinline__ void student_log_probs(Span<kWhole> span,
                                                    acc_t (&log_q)[kWidth]) const {
    acc_t logits[kWidth];
    if constexpr (kStudent == Student::kLogitMean) {
      acc_t sums[kWidth] = {};
      for (int64_t t = 0; t < steps; ++t) {
        Chunk<scalar_t>::load(step(t), span, logits);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) sums[j] += logits[j];
      }
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        log_q[j] = fused_multiply_add(sums[j] * inv_steps, logit_scale, -mean_lse);
      }
    } else if constexpr (kStudent == Student::kSingle) {
      Chunk<scalar_t>::load(step(0), span, logits);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) log_q[j] = step_log_prob(logits[j], 0);
    } else {
      // log q = logsumexp_t(log softmax(z_t / tau)) - log T.
      LogSumExp<acc_t> per_class[kWidth];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) per_class[j] = LogSumExp<acc_t>::empty();
      for (int64_t t = 0; t < steps; ++t) {
        Chunk<scalar_t>::load(step(t), span, logits);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) per_class[j].add(step_log_prob(logits[j], t));
      }
#pragma unroll
      for (int j = 0; j < kWidth; ++j) log_q[j] = per_class[j].value() - log_steps;
    }
  }

  // The ratio q_t / q (in [0, T]) in LogBase units: exp(log q_t - log q), never a division by
  // a tiny q. Zero only where log q_t is -inf: a q_t that underflowed beside an equally tiny q
  // still has a ratio of order 1, and with it the teacher's pull on that class (SPEC 2).
  __device__ __forceinline__ static acc_t step_ratio(acc_t log_q_t, acc_t log_q) {
    return log_q_t > acc_t(-INFINITY) ? prob(log_q_t - log_q) : acc_t(0);
  }

  // Non-short-circuit operators: a few predicate ops, no branch.
  __device__ __forceinline__ bool in_head(acc_t p, uint32_t index) const {
    const key_t key = key_of(p);
    return (key > boundary_key) | ((key == boundary_key) & (index < tie_limit));
  }
};

// ---------------------------------------------------------------------------------------------
// Passes 1 and 2: the log-sum-exps of SPEC 1.1 and 1.2.

// Adds a chunk of logits times `scale` to `acc`, the row's padding as -inf (adds nothing).
template <bool kWhole, typename acc_t, int kWidth>
__device__ __forceinline__ void add_scaled_chunk(LogSumExp<acc_t>& acc, Span<kWhole> span,
                                                 acc_t (&values)[kWidth], acc_t scale) {
#pragma unroll
  for (int j = 0; j < kWidth; ++j) values[j] = span.has(j) ? values[j] * scale : acc_t(-INFINITY);
  acc.add_chunk(values);
}

template <typename scalar_t, Student kStudent>
__device__ void compute_log_sum_exps(RowView<scalar_t, kStudent>& row,
                                     htakl::acc_t<scalar_t>* step_lse,
                                     BlockScratch<htakl::acc_t<scalar_t>>& scratch) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  acc_t values[kWidth];

  LogSumExp<acc_t> teacher_acc = LogSumExp<acc_t>::empty();
  for_each_span<scalar_t>(row.classes, row.whole_end, [&](auto span) {
    Chunk<scalar_t>::load(row.teacher, span, values);
    add_scaled_chunk(teacher_acc, span, values, row.logit_scale);
  });
  row.teacher_lse = block_logsumexp(teacher_acc, scratch);

  if constexpr (kStudent == Student::kLogitMean) {
    LogSumExp<acc_t> mean_acc = LogSumExp<acc_t>::empty();
    for_each_span<scalar_t>(row.classes, row.whole_end, [&](auto span) {
      acc_t sums[kWidth] = {};
      for (int64_t t = 0; t < row.steps; ++t) {
        Chunk<scalar_t>::load(row.step(t), span, values);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) sums[j] += values[j];
      }
#pragma unroll
      for (int j = 0; j < kWidth; ++j) sums[j] *= row.inv_steps;  // the mean logits
      add_scaled_chunk(mean_acc, span, sums, row.logit_scale);
    });
    row.mean_lse = block_logsumexp(mean_acc, scratch);
  } else {
    for (int64_t t = 0; t < row.step_count(); ++t) {
      LogSumExp<acc_t> step_acc = LogSumExp<acc_t>::empty();
      for_each_span<scalar_t>(row.classes, row.whole_end, [&](auto span) {
        Chunk<scalar_t>::load(row.step(t), span, values);
        add_scaled_chunk(step_acc, span, values, row.logit_scale);
      });
      const acc_t lse = block_logsumexp(step_acc, scratch);
      if (threadIdx.x == 0) step_lse[t] = lse;
    }
    __syncthreads();  // step_lse written by thread 0, read by all
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 3: the head boundary (SPEC 1.3).

// Warp 0 picks the largest digit whose bucket, with every bucket above it and the mass already
// above the candidates, reaches delta. Lane l owns buckets [8l, 8l + 8).
template <typename acc_t>
__device__ void select_digit(BlockScratch<acc_t>& scratch, unsigned long long mass_above,
                             unsigned long long delta_fixed) {
  const int lane = threadIdx.x % kWarpSize;
  unsigned long long lane_mass = 0;
#pragma unroll
  for (int b = 0; b < kBucketsPerLane; ++b) {
    lane_mass += scratch.radix_mass[lane * kBucketsPerLane + b];
  }
  // Inclusive suffix sum over lanes: the mass of every bucket from this lane's first one upwards.
  unsigned long long suffix = lane_mass;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const unsigned long long upper = __shfl_down_sync(kFullMask, suffix, offset);
    if (lane + offset < kWarpSize) suffix += upper;
  }
  // The suffix mass decreases with the lane, so the lanes that reach delta are a prefix.
  const unsigned reaching = __ballot_sync(kFullMask, mass_above + suffix >= delta_fixed);
  if (reaching == 0) {
    if (lane == 0) scratch.selected_found = 0;
    return;
  }
  const int chosen_lane = kWarpSize - 1 - __clz(static_cast<int>(reaching));
  if (lane != chosen_lane) return;
  unsigned long long running = mass_above + (suffix - lane_mass);  // mass above this lane's buckets
  for (int b = kBucketsPerLane - 1; b >= 0; --b) {
    const int digit = lane * kBucketsPerLane + b;
    const unsigned long long bucket = scratch.radix_mass[digit];
    if (running + bucket >= delta_fixed) {
      scratch.selected_found = 1;
      scratch.selected_digit = static_cast<unsigned>(digit);
      scratch.selected_mass_above = running;
      scratch.selected_count = scratch.radix_count[digit];
      return;
    }
    running += bucket;
  }
  // Unreachable: this lane's suffix reaches delta, so one of its buckets does.
}

// A key's radix digit at `shift`.
template <typename key_t>
__device__ __forceinline__ int digit_of(key_t key, int shift) {
  return static_cast<int>((key >> shift) & key_t(kRadixBuckets - 1));
}

// The warp's candidates added to the round's histogram: every lane whose `candidate` is set adds
// its `mass` and a count of one to bucket `digit`; every lane of the warp calls it. Candidates
// tend to share a digit (the exponent bits of similar probabilities): the lanes of one digit sum
// their masses and one of them updates the bucket, instead of 32 atomics on one address. The sum
// is three warp reductions of 27-bit parts (32 of them stay below 2^32): their cost does not grow
// with the lanes sharing the digit, as a loop of shuffles over them would (the compiled code
// runs a collective once per distinct group of lanes, so a lane alone with its digit skips it).
// Integer sums are exact, so their order does not matter.
template <typename acc_t>
__device__ __forceinline__ void add_to_histogram(BlockScratch<acc_t>& scratch, bool candidate,
                                                 int digit, unsigned long long mass) {
  const unsigned same_digit = __match_any_sync(kFullMask, candidate ? digit : kRadixBuckets);
  if (!candidate) return;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  unsigned long long group_mass = mass;
  if (same_digit != 1u << lane) {
    constexpr int kPartBits = 27;
    constexpr unsigned long long kPart = (1ull << kPartBits) - 1;
    const unsigned long long low =
        __reduce_add_sync(same_digit, static_cast<unsigned>(mass & kPart));
    const unsigned long long middle =
        __reduce_add_sync(same_digit, static_cast<unsigned>((mass >> kPartBits) & kPart));
    const unsigned long long high =
        __reduce_add_sync(same_digit, static_cast<unsigned>(mass >> (2 * kPartBits)));
    group_mass = low + (middle << kPartBits) + (high << (2 * kPartBits));
  }
  if (lane == __ffs(static_cast<int>(same_digit)) - 1) {
    atomicAdd(&scratch.radix_mass[digit], group_mass);
    atomicAdd(&scratch.radix_count[digit], static_cast<unsigned>(__popc(same_digit)));
  }
}

// The class index one past the r-th class (1-based, ascending index) whose p equals the boundary
// value: the tied classes below it are the head's tied members (SPEC 1.3's stable order).
template <typename scalar_t, Student kStudent>
__device__ uint32_t tie_limit_of(const RowView<scalar_t, kStudent>& row, int64_t head_ties,
                                BlockScratch<htakl::acc_t<scalar_t>>& scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  int64_t seen = 0;  // tied classes in earlier sweeps
  if (threadIdx.x == 0) scratch.tie_limit = row.classes;  // overwritten below: head_ties < #ties
  for (uint32_t sweep = 0; sweep < row.classes; sweep += blockDim.x) {
    const uint32_t index = sweep + threadIdx.x;
    bool tied = false;
    if (index < row.classes) {
      const auto p = row.prob(row.teacher_log_prob(to_acc(row.teacher[index])));
      tied = key_of(p) == row.boundary_key;
    }
    const unsigned ballot = __ballot_sync(kFullMask, tied);
    if (lane == 0) scratch.warp_tied[warp] = __popc(ballot);
    __syncthreads();
    int64_t rank = seen + __popc(ballot & ((1u << lane) - 1u));  // tied classes before this one
    int64_t sweep_total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) rank += scratch.warp_tied[w];
      sweep_total += scratch.warp_tied[w];
    }
    if (tied && rank + 1 == head_ties) scratch.tie_limit = index + 1;
    seen += sweep_total;
    __syncthreads();  // tie_limit visible; warp_tied free for the next sweep
    if (seen >= head_ties) break;  // uniform: every thread holds the same `seen`
  }
  return static_cast<uint32_t>(scratch.tie_limit);
}

template <typename scalar_t, Student kStudent>
__device__ void find_head_boundary(RowView<scalar_t, kStudent>& row,
                                   const KernelParams<scalar_t>& params,
                                   radix_key_t<scalar_t>* candidate_key,
                                   BlockScratch<htakl::acc_t<scalar_t>>& scratch) {
  using acc_t = htakl::acc_t<scalar_t>;
  using key_t = radix_key_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  constexpr int kKeyBits = static_cast<int>(sizeof(key_t)) * 8;
  const uint32_t classes = row.classes;
  // Every class in the head: the key of any p (>= 0) is >= 0 and every index is < classes.
  row.boundary_key = 0;
  row.tie_limit = classes;
  // A non-finite teacher log-sum-exp (NaN or +inf logits, or all -inf) makes every p NaN: the
  // whole row's results are NaN whatever the membership, and NaN has no place in the order.
  if (!isfinite(row.teacher_lse)) return;

  key_t prefix = 0;  // the boundary key's digits chosen so far
  key_t known = 0;   // mask of those digits
  unsigned long long mass_above = 0;
  unsigned int tied_count = 0;
  // The candidates: classes whose key has the digits chosen so far. Once they fit in a list
  // (candidate_key holds two of list_capacity keys), the round that sweeps the row lists their
  // keys as well, and every later round reads only the list and writes the keys still
  // candidates into the other one: a typical row is swept once or twice, not once per digit,
  // and each listed round reads the candidates the previous digit left.
  int64_t candidates = classes;
  bool listed = false;
  unsigned int listed_count = 0;
  key_t* list = candidate_key;                              // read by a listed round
  key_t* next_list = candidate_key + params.list_capacity;  // written by any listing round
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  acc_t log_p[kWidth];
#pragma unroll 1  // one copy of the sweep, not one per digit
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    const bool compact = !listed && candidates <= params.list_capacity;  // uniform
    for (int b = threadIdx.x; b < kRadixBuckets; b += blockDim.x) {
      scratch.radix_mass[b] = 0;
      scratch.radix_count[b] = 0;
    }
    if (threadIdx.x == 0 && (compact || listed)) scratch.candidate_count = 0;
    __syncthreads();
    // Listed rounds: the list's keys (at most list_capacity), a whole warp at a time (the warp
    // intrinsics see all 32 lanes; lanes past the list's end hold no candidate). The keys still
    // candidates go to the other list, one slot range per warp (the list's order is free).
    for (uint32_t base = threadIdx.x - lane; listed && base < listed_count; base += blockDim.x) {
      const uint32_t i = base + static_cast<uint32_t>(lane);
      const key_t key = i < listed_count ? list[i] : key_t(0);
      const bool candidate = i < listed_count && (key & known) == prefix;
      const unsigned listing = __ballot_sync(kFullMask, candidate);
      unsigned slot = 0;
      if (lane == 0 && listing != 0) {
        slot = atomicAdd(&scratch.candidate_count, static_cast<unsigned>(__popc(listing)));
      }
      slot = __shfl_sync(kFullMask, slot, 0) +
             static_cast<unsigned>(__popc(listing & ((1u << lane) - 1u)));
      if (candidate) next_list[slot] = key;
      add_to_histogram(scratch, candidate, digit_of(key, shift), fixed_mass(value_of_key(key)));
    }
    // Sweeping rounds. The whole warp runs the same number of iterations (each loop ends when the
    // warp's first chunk is past its range, lanes past the row see only padding), so the
    // warp-wide intrinsics below see all 32 lanes; the first loop takes the warp's chunks while
    // all 32 are whole.
    const auto sweep = [&](auto span) {
      row.teacher_log_probs(span, log_p);
      key_t keys[kWidth];
      unsigned candidates_here = 0;  // bit j: element j is a candidate
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const acc_t p = row.prob(log_p[j]);
        const key_t key = key_of(p);
        keys[j] = key;
        const bool candidate = span.has(j) && (key & known) == prefix;
        candidates_here |= static_cast<unsigned>(candidate) << j;
        add_to_histogram(scratch, candidate, digit_of(key, shift), fixed_mass(p));
      }
      if (compact) {  // list the chunk's candidates: one slot range per warp and chunk
        const unsigned count = static_cast<unsigned>(__popc(candidates_here));
        unsigned before = count;  // inclusive scan over the lanes, then exclusive
#pragma unroll
        for (int offset = 1; offset < kWarpSize; offset *= 2) {
          const unsigned lower = __shfl_up_sync(kFullMask, before, offset);
          if (lane >= offset) before += lower;
        }
        unsigned slot = 0;
        if (lane == kWarpSize - 1 && before != 0) {
          slot = atomicAdd(&scratch.candidate_count, before);  // the warp's total
        }
        slot = __shfl_sync(kFullMask, slot, kWarpSize - 1) + before - count;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {  // the list's order does not matter
          if ((candidates_here >> j) & 1u) next_list[slot++] = keys[j];
        }
      }
    };
    const uint32_t lane_offset = static_cast<uint32_t>(lane) * kWidth;
    constexpr uint32_t kWarpChunk = kWarpSize * kWidth;  // classes of one warp's chunks
    uint32_t first = first_chunk_start<scalar_t>();
    for (; !listed && first - lane_offset + kWarpChunk <= row.whole_end;
         first += chunk_stride<scalar_t>()) {
      sweep(Span<true>{first, classes});
    }
    for (; !listed && first - lane_offset < classes; first += chunk_stride<scalar_t>()) {
      sweep(Span<false>{first, classes});
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) select_digit(scratch, mass_above, params.delta_fixed);
    __syncthreads();
    const bool found = scratch.selected_found != 0;
    const unsigned int digit = scratch.selected_digit;
    const unsigned long long selected_mass_above = scratch.selected_mass_above;
    const unsigned int selected_count = scratch.selected_count;
    if (compact || listed) {
      listed = true;
      listed_count = scratch.candidate_count;
      key_t* const read = next_list;
      next_list = list;
      list = read;
    }
    __syncthreads();  // read before the next round resets the histogram and the selection
    // Not found only in the first round (later rounds split a bucket that reaches delta): the
    // row's whole mass is below delta and every class is in the head.
    if (!found) return;
    prefix |= key_t(digit) << shift;
    known |= key_t(kRadixBuckets - 1) << shift;
    mass_above = selected_mass_above;
    tied_count = selected_count;
    candidates = selected_count;
  }
  // Every bit is chosen: prefix is the boundary value's key, tied_count (>= 1) classes hold it.
  row.boundary_key = prefix;
  const acc_t boundary_value = value_of_key(prefix);
  const acc_t mass_above_value = static_cast<acc_t>(mass_above) * acc_t(1.0 / kFixedOne);
  const int64_t head_ties =
      tied_head_count(mass_above_value, boundary_value, static_cast<int64_t>(tied_count), params.delta);
  if (head_ties == 0) {
    row.tie_limit = 0;
  } else if (head_ties < static_cast<int64_t>(tied_count)) {
    row.tie_limit = tie_limit_of(row, head_ties, scratch);
  }  // else every tied class is in the head: tie_limit stays `classes`
}

// Passes 4 and 5 walk the row the same way: calls visit(span, log_p, log_q) for each of this
// thread's chunks, with the teacher's and the student's log-probabilities (SPEC 1.1, 1.2, in
// LogBase units: row.prob gives p and q, LogBase::to_natural the natural logs) of the chunk's
// classes (entries past the row's end are padding). `whole_end`: the whole chunks, for every
// pointer the pass touches (a gradient pass's stores too).
template <typename scalar_t, Student kStudent, typename Visit>
__device__ __forceinline__ void for_each_chunk(const RowView<scalar_t, kStudent>& row,
                                               uint32_t whole_end, Visit visit) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  acc_t log_p[kWidth], log_q[kWidth];
  for_each_span<scalar_t>(row.classes, whole_end, [&](auto span) {
    row.teacher_log_probs(span, log_p);
    row.student_log_probs(span, log_q);
    visit(span, log_p, log_q);
  });
}

// ---------------------------------------------------------------------------------------------
// Pass 4: the row sums (SPEC 1.4-1.6 and the signed sums of SPEC 2's dl).

enum RowSum {
  kDistanceHead,     // d_head
  kDistanceTail,     // d_tail
  kForwardKl,        // F
  kReverseKl,        // R
  kSignedQHead,      // sum_{i in H} q_i s_i
  kSignedQTail,      // sum_{i not in H} q_i s_i
  kSignedPHead,      // sum_{i in H} p_i s_i
  kSignedPTail,      // sum_{i not in H} p_i s_i
  kRowSums
};

// prob_mean: the class sums that SPEC 2's G_t = sum_j q_tj g_j of the steps group ..
// group + kStepGroupOf - 1 is made of (time_step_g_sum), added over one chunk: per step, sum p r_t,
// sum q_t (log q - log p + 1), and q_t s summed over the head and over the tail.
template <typename scalar_t, Student kStudent, bool kWhole>
__device__ __forceinline__ void add_step_sums(
    const RowView<scalar_t, kStudent>& row, int64_t group, Span<kWhole> span,
    const htakl::acc_t<scalar_t> (&log_p)[Chunk<scalar_t>::kWidth],
    const htakl::acc_t<scalar_t> (&log_q)[Chunk<scalar_t>::kWidth],
    htakl::acc_t<scalar_t> (&sums)[kStepSumsOf<htakl::acc_t<scalar_t>>]) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  // What does not depend on the step, once per class.
  acc_t p[kWidth], sign[kWidth];
  bool head[kWidth];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    p[j] = row.prob(log_p[j]);
    sign[j] = sign_of_difference(row.prob(log_q[j]), p[j]);
    head[j] = row.in_head(p[j], span.first + j);
  }
  acc_t logits[kWidth];
#pragma unroll
  for (int g = 0; g < kStepGroupOf<acc_t>; ++g) {
    const int64_t t = group + g;
    if (t >= row.steps) break;
    Chunk<scalar_t>::load(row.step(t), span, logits);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      if (!span.has(j)) continue;
      const acc_t log_q_t = row.step_log_prob(logits[j], t);
      const acc_t q_t = row.prob(log_q_t);
      const acc_t signed_q_t = q_t * sign[j];
      sums[g * kSumsPerStep + 0] += p[j] * row.step_ratio(log_q_t, log_q[j]);
      sums[g * kSumsPerStep + 1] +=
          q_t_log_ratio(q_t, LogBase<acc_t>::to_natural(log_q[j]),
                        LogBase<acc_t>::to_natural(log_p[j]));
      sums[g * kSumsPerStep + 2] += head[j] ? signed_q_t : acc_t(0);
      sums[g * kSumsPerStep + 3] += head[j] ? acc_t(0) : signed_q_t;
    }
  }
}

// G_t of the steps group .. group + kStepGroupOf - 1 from their block-wide sums; thread 0 writes.
template <typename acc_t>
__device__ __forceinline__ void write_step_g_sums(const RowStats<acc_t>& stats, int64_t group,
                                                  int64_t steps,
                                                  const acc_t (&sums)[kStepSumsOf<acc_t>],
                                                  acc_t* step_g_sums) {
  if (threadIdx.x != 0) return;
  for (int g = 0; g < kStepGroupOf<acc_t> && group + g < steps; ++g) {
    step_g_sums[group + g] =
        time_step_g_sum(stats, sums[g * kSumsPerStep + 0], sums[g * kSumsPerStep + 1],
                        sums[g * kSumsPerStep + 2], sums[g * kSumsPerStep + 3]);
  }
}

// The row sums, and for a prob_mean student whose gradient is asked for (`with_step_sums`) the
// first kStepGroupOf steps' sums of SPEC 2's G_t in the same pass.
template <typename scalar_t, Student kStudent>
__device__ void compute_row_sums(const RowView<scalar_t, kStudent>& row,
                                 htakl::acc_t<scalar_t> (&sums)[kRowSums],
                                 htakl::acc_t<scalar_t> (
                                     &step_sums)[kStepSumsOf<htakl::acc_t<scalar_t>>],
                                 bool with_step_sums,
                                 BlockScratch<htakl::acc_t<scalar_t>>& scratch) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
#pragma unroll
  for (int k = 0; k < kRowSums; ++k) sums[k] = acc_t(0);
#pragma unroll
  for (int k = 0; k < kStepSumsOf<acc_t>; ++k) step_sums[k] = acc_t(0);
  for_each_chunk(row, row.whole_end, [&](auto span, const auto& log_p, const auto& log_q) {
    if constexpr (kStudent == Student::kProbMean) {
      if (with_step_sums) add_step_sums(row, 0, span, log_p, log_q, step_sums);
    }
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      if (!span.has(j)) continue;
      const acc_t p = row.prob(log_p[j]);
      const acc_t q = row.prob(log_q[j]);
      const acc_t ln_p = LogBase<acc_t>::to_natural(log_p[j]);
      const acc_t ln_q = LogBase<acc_t>::to_natural(log_q[j]);
      const bool head = row.in_head(p, span.first + j);
      const acc_t distance = fabs(p - q);
      const acc_t sign = sign_of_difference(q, p);
      // Selects, not a computed index: the sums stay in registers.
      sums[kDistanceHead] += head ? distance : acc_t(0);
      sums[kDistanceTail] += head ? acc_t(0) : distance;
      sums[kForwardKl] += fkl_term(p, ln_p, ln_q);
      sums[kReverseKl] += rkl_term(q, ln_q, ln_p);
      sums[kSignedQHead] += head ? q * sign : acc_t(0);
      sums[kSignedQTail] += head ? acc_t(0) : q * sign;
      sums[kSignedPHead] += head ? p * sign : acc_t(0);
      sums[kSignedPTail] += head ? acc_t(0) : p * sign;
    }
  });
  block_sum(sums, scratch);
  if constexpr (kStudent == Student::kProbMean) {
    if (with_step_sums) block_sum(step_sums, scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 5: gradients (SPEC 2).

// Teacher gradient and the student gradient of a single softmax (2-D students, T = 1, and
// logit_mean, whose gradient is the same for every step, divided by T).
template <typename scalar_t, Student kStudent>
__device__ void write_softmax_gradients(const RowView<scalar_t, kStudent>& row,
                                        const RowStats<htakl::acc_t<scalar_t>>& stats,
                                        htakl::acc_t<scalar_t> sum_q_dl,
                                        htakl::acc_t<scalar_t> sum_p_dl,
                                        scalar_t* grad_teacher_row, scalar_t* grad_student_row,
                                        int64_t grad_step_stride, uint32_t whole_end) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  acc_t teacher_grad[kWidth], student_grad[kWidth];
  for_each_chunk(row, whole_end, [&](auto span, const auto& log_p, const auto& log_q) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const acc_t p = row.prob(log_p[j]);
      const acc_t q = row.prob(log_q[j]);
      const acc_t ln_p = LogBase<acc_t>::to_natural(log_p[j]);
      const acc_t ln_q = LogBase<acc_t>::to_natural(log_q[j]);
      const acc_t dl = dlam_h_dq(stats, sign_of_difference(q, p), row.in_head(p, span.first + j));
      teacher_grad[j] = grad_teacher(stats, p, ln_p, q, ln_q, dl, sum_p_dl);
      student_grad[j] =
          grad_student_softmax(stats, p, ln_p, q, ln_q, dl, sum_q_dl) * row.inv_steps;
    }
    if (grad_teacher_row != nullptr) Chunk<scalar_t>::store(grad_teacher_row, span, teacher_grad);
    if (grad_student_row != nullptr) {
      for (int64_t t = 0; t < row.step_count(); ++t) {
        Chunk<scalar_t>::store(grad_student_row + t * grad_step_stride, span, student_grad);
      }
    }
  });
}

// prob_mean with T > 1: G_t = sum_j q_tj g_j for every step (the first kStepGroupOf steps' sums
// come from pass 4; each further group of kStepGroupOf steps takes one pass, so the sums stay in
// registers), then dL/dz_tk (SPEC 2).
template <typename scalar_t, Student kStudent>
__device__ void write_prob_mean_student_gradient(
    const RowView<scalar_t, kStudent>& row, const RowStats<htakl::acc_t<scalar_t>>& stats,
    const htakl::acc_t<scalar_t> (&first_group_sums)[kStepSumsOf<htakl::acc_t<scalar_t>>],
    htakl::acc_t<scalar_t>* step_g_sums, scalar_t* grad_student_row,
    int64_t grad_step_stride, uint32_t whole_end, BlockScratch<htakl::acc_t<scalar_t>>& scratch) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  acc_t logits[kWidth], grad[kWidth];
  write_step_g_sums(stats, 0, row.steps, first_group_sums, step_g_sums);
  constexpr int kGroup = kStepGroupOf<acc_t>;
  for (int64_t group = kGroup; group < row.steps; group += kGroup) {
    acc_t sums[kStepSumsOf<acc_t>] = {};
    for_each_chunk(row, row.whole_end, [&](auto span, const auto& log_p, const auto& log_q) {
      add_step_sums(row, group, span, log_p, log_q, sums);
    });
    block_sum(sums, scratch);
    write_step_g_sums(stats, group, row.steps, sums, step_g_sums);
  }
  __syncthreads();  // step_g_sums written by thread 0, read by all

  for_each_chunk(row, whole_end, [&](auto span, const auto& log_p, const auto& log_q) {
    acc_t p[kWidth], dl[kWidth];
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      p[j] = row.prob(log_p[j]);
      const acc_t q = row.prob(log_q[j]);
      dl[j] = dlam_h_dq(stats, sign_of_difference(q, p[j]), row.in_head(p[j], span.first + j));
    }
    for (int64_t t = 0; t < row.steps; ++t) {
      Chunk<scalar_t>::load(row.step(t), span, logits);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const acc_t log_q_t = row.step_log_prob(logits[j], t);
        const acc_t q_t = row.prob(log_q_t);
        const acc_t q_t_g = q_t_times_g(
            stats, p[j], row.step_ratio(log_q_t, log_q[j]), q_t,
            q_t_log_ratio(q_t, LogBase<acc_t>::to_natural(log_q[j]),
                          LogBase<acc_t>::to_natural(log_p[j])),
            dl[j]);
        grad[j] = grad_student_prob_mean(stats, q_t_g, q_t, step_g_sums[t], row.inv_steps);
      }
      Chunk<scalar_t>::store(grad_student_row + t * grad_step_stride, span, grad);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The kernel.

// Blocks of kMaxThreads threads each SM must hold at once, which caps the registers per thread
// (65536 per SM): a float single softmax keeps two blocks per SM at 64 registers without spilling;
// the students with per-step sums, and double, need up to 128. Named explicitly: with a maximum of
// threads only, ptxas may aim at more blocks per SM and spill instead.
template <typename scalar_t, Student kStudent>
constexpr int kMinBlocksPerSm =
    kStudent == Student::kSingle && sizeof(htakl::acc_t<scalar_t>) == 4 ? 2 : 1;

template <typename scalar_t, Student kStudent>
__global__ void __launch_bounds__(kMaxThreads, (kMinBlocksPerSm<scalar_t, kStudent>))
    hta_kl_fused_kernel(const KernelParams<scalar_t> params) {
  using acc_t = htakl::acc_t<scalar_t>;
  __shared__ BlockScratch<acc_t> scratch;
  // Dynamic shared memory: step_lse and step_g_sums (step_slots each: T rounded up to whole step
  // groups, see step_slots), the head selection's two candidate lists, then (when cache_rows) the
  // teacher row and the T student rows, each cache_row_stride elements (16-byte aligned).
#ifdef HTAKL_CUDA_HOST_EMULATION  // tests/cuda/host: a buffer of the launch's size
  uint4* const dynamic_shared = dynamic_shared_memory();
#else
  extern __shared__ uint4 dynamic_shared[];
#endif
  acc_t* step_lse = reinterpret_cast<acc_t*>(dynamic_shared);
  acc_t* step_g_sums = step_lse + params.step_slots;
  unsigned char* const list_start =
      reinterpret_cast<unsigned char*>(step_g_sums + params.step_slots);
  radix_key_t<acc_t>* candidate_key = reinterpret_cast<radix_key_t<acc_t>*>(list_start);
  scalar_t* row_cache = reinterpret_cast<scalar_t*>(list_start + params.list_bytes);

  const uint32_t classes = static_cast<uint32_t>(params.classes);  // < 2^31 (the launcher's check)
  const int64_t step_elements = params.rows * params.classes;  // 64-bit: may exceed 2^31
  // Every step's row as aligned as step 0's (a single softmax reads and writes step 0 only).
  const bool steps_aligned = kStudent == Student::kSingle ||
                             step_elements * static_cast<int64_t>(sizeof(scalar_t)) % kVectorBytes == 0;
  for (int64_t r = blockIdx.x; r < params.rows; r += gridDim.x) {
    const int64_t row_offset = r * params.classes;
    scalar_t* grad_teacher_row =
        params.grad_teacher != nullptr ? params.grad_teacher + row_offset : nullptr;
    scalar_t* grad_student_row =
        params.grad_student != nullptr ? params.grad_student + row_offset : nullptr;
    const bool inputs_aligned = steps_aligned && vector_aligned(params.teacher + row_offset) &&
                                vector_aligned(params.student + row_offset);
    RowView<scalar_t, kStudent> row;
    row.classes = classes;
    row.steps = params.steps;
    row.logit_scale = params.logit_scale;
    row.inv_steps = params.inv_steps;
    row.log_steps = params.log_steps;
    row.step_lse = step_lse;
    if (params.cache_rows) {
      const int64_t stride = params.cache_row_stride;
      const scalar_t* teacher = params.teacher + row_offset;
      const scalar_t* student = params.student + row_offset;
      for_each_span<scalar_t>(classes, whole_chunks_end<scalar_t>(classes, inputs_aligned),
                              [&](auto span) {
        Chunk<scalar_t>::copy(row_cache, teacher, span);
        for (int64_t t = 0; t < row.step_count(); ++t) {
          Chunk<scalar_t>::copy(row_cache + (t + 1) * stride, student + t * step_elements, span);
        }
      });
      __syncthreads();
      row.teacher = row_cache;
      row.student = row_cache + stride;
      row.step_stride = stride;
    } else {
      row.teacher = params.teacher + row_offset;
      row.student = params.student + row_offset;
      row.step_stride = step_elements;
    }
    // The shared-memory copy is aligned and padded to whole chunks.
    const bool reads_aligned = params.cache_rows || inputs_aligned;
    row.whole_end = whole_chunks_end<scalar_t>(classes, reads_aligned);
    const bool grads_aligned =
        steps_aligned && (grad_teacher_row == nullptr || vector_aligned(grad_teacher_row)) &&
        (grad_student_row == nullptr || vector_aligned(grad_student_row));
    const uint32_t grad_whole_end =
        whole_chunks_end<scalar_t>(classes, reads_aligned && grads_aligned);

    compute_log_sum_exps(row, step_lse, scratch);       // SPEC 1.1, 1.2
    find_head_boundary(row, params, candidate_key, scratch);  // SPEC 1.3
    acc_t sums[kRowSums], step_sums[kStepSumsOf<acc_t>];
    compute_row_sums(row, sums, step_sums, grad_student_row != nullptr, scratch);  // SPEC 1.4, 1.6
    const RowStats<acc_t> stats =                       // SPEC 1.5
        make_row_stats(sums[kDistanceHead], sums[kDistanceTail], sums[kForwardKl],
                       sums[kReverseKl], params.detach_weights, params.inv_tau, params.row_scale);
    if (threadIdx.x == 0) params.loss_rows[r] = row_loss(stats);  // SPEC 1.6

    // SPEC 2.
    constexpr bool single_softmax = kStudent != Student::kProbMean;
    if (grad_teacher_row != nullptr || (grad_student_row != nullptr && single_softmax)) {
      write_softmax_gradients(row, stats,
                              weighted_dl_sum(stats, sums[kSignedQHead], sums[kSignedQTail]),
                              weighted_dl_sum(stats, sums[kSignedPHead], sums[kSignedPTail]),
                              grad_teacher_row, single_softmax ? grad_student_row : nullptr,
                              step_elements, grad_whole_end);
    }
    if (grad_student_row != nullptr && !single_softmax) {
      write_prob_mean_student_gradient(row, stats, step_sums, step_g_sums, grad_student_row,
                                       step_elements, grad_whole_end, scratch);
    }
    __syncthreads();  // the next row overwrites the row cache and the per-step values
  }
}

// ---------------------------------------------------------------------------------------------
// Launch.

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// step_lse's and step_g_sums' length in shared memory: T rounded up to whole step groups.
// add_step_sums reads step_lse[group + g] only for the steps that exist, but ptxas merges a
// group's reads into one 16-byte load issued before the bounds checks (LDS.128 at step_lse +
// group; the values past T are discarded). With step_g_sums right behind step_lse[T - 1], the
// load of the second group reads step_g_sums[0..] while thread 0 may still be writing them (the
// first group's G_t; no barrier between, write_prob_mean_student_gradient): harmless, as those
// values are unused, but a shared-memory hazard that compute-sanitizer's racecheck reports. The
// padding keeps the load inside step_lse's own slots, which nothing writes.
template <typename scalar_t>
int64_t step_slots(int64_t steps) {
  return round_up(steps, kStepGroupOf<htakl::acc_t<scalar_t>>);
}

// Shared-memory bytes of step_lse and step_g_sums: a 16-byte multiple, so the lists behind them
// stay aligned.
template <typename scalar_t>
size_t step_values_bytes(int64_t steps) {
  using acc_t = htakl::acc_t<scalar_t>;
  static_assert(2 * kStepGroupOf<acc_t> * sizeof(acc_t) % kVectorBytes == 0,
                "a step group's values must fill whole 16-byte units");
  return static_cast<size_t>(2 * step_slots<scalar_t>(steps)) * sizeof(acc_t);
}

// The largest T whose step values and the longest candidate lists fit in `limit` bytes.
template <typename scalar_t>
int64_t max_steps_within(size_t limit) {
  using acc_t = htakl::acc_t<scalar_t>;
  const size_t list_bytes = 2 * kCandidates * sizeof(radix_key_t<scalar_t>);
  if (limit < list_bytes) return 0;
  constexpr size_t kGroupBytes = 2 * kStepGroupOf<acc_t> * sizeof(acc_t);
  return static_cast<int64_t>((limit - list_bytes) / kGroupBytes) * kStepGroupOf<acc_t>;
}

// Dynamic shared memory one block may use beyond the kernel's static shared memory on the current
// device; the kernel's ceiling is raised to it on first use.
template <typename scalar_t>
cudaError_t dynamic_shared_limit(size_t* limit) {
  // The kernel's dynamic shared-memory ceiling is a process-wide attribute: it is raised once per
  // device, to the whole limit, and never changed again, so that two host threads launching at
  // once cannot lower it under each other (each launch still asks only for the bytes it uses).
  static std::mutex mutex;
  static std::unordered_map<int, size_t> limits;  // device -> limit, once the ceiling is raised
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto known = limits.find(device);
  if (known != limits.end()) {
    *limit = known->second;
    return cudaSuccess;
  }
  int optin = 0;
  error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess) return error;
  const size_t total = static_cast<size_t>(optin);
  size_t dynamic = total;  // the smallest over the kernels of this dtype
  for (const auto kernel : {hta_kl_fused_kernel<scalar_t, Student::kSingle>,
                            hta_kl_fused_kernel<scalar_t, Student::kLogitMean>,
                            hta_kl_fused_kernel<scalar_t, Student::kProbMean>}) {
    cudaFuncAttributes attributes;
    error = cudaFuncGetAttributes(&attributes, kernel);
    if (error != cudaSuccess) return error;
    const size_t kernel_dynamic =
        total > attributes.sharedSizeBytes ? total - attributes.sharedSizeBytes : 0;
    error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(kernel_dynamic));
    if (error != cudaSuccess) return error;
    if (kernel_dynamic < dynamic) dynamic = kernel_dynamic;
  }
  limits.emplace(device, dynamic);
  *limit = dynamic;
  return cudaSuccess;
}

// Whether a block that also holds its row in shared memory (front_bytes + cache_bytes) still
// keeps kMinCachingBlocksPerSm blocks resident per SM, or as many as one without it: the
// launcher's condition for the row cache. The occupancy queries behind it are host work; the
// answer depends only on the device, the kernel and the sizes, which a training loop repeats on
// every call, so it is kept per (device, kernel, threads, sizes).
template <typename scalar_t>
cudaError_t row_cache_keeps_occupancy(void (*kernel)(KernelParams<scalar_t>), int threads,
                                      size_t front_bytes, size_t cache_bytes, bool* keeps) {
  using Key = std::tuple<int, const void*, int, size_t, size_t>;
  static std::mutex mutex;
  static std::map<Key, bool> known;
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const Key key{device, reinterpret_cast<const void*>(kernel), threads, front_bytes, cache_bytes};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(key);
    if (found != known.end()) {
      *keeps = found->second;
      return cudaSuccess;
    }
  }
  int caching_blocks = 0, streaming_blocks = 0;
  error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&caching_blocks, kernel, threads,
                                                        front_bytes + cache_bytes);
  if (error != cudaSuccess) return error;
  error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&streaming_blocks, kernel, threads,
                                                        front_bytes);
  if (error != cudaSuccess) return error;
  *keeps = caching_blocks >= std::min(kMinCachingBlocksPerSm, streaming_blocks);
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(key, *keeps);
  return cudaSuccess;
}

}  // namespace

template <typename scalar_t>
cudaError_t HtaKlCudaLaunch<scalar_t>::fused(const HtaKlCudaProblem& problem,
                                             cudaStream_t stream) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kWidth = Chunk<scalar_t>::kWidth;
  const HtaKlOptions& options = problem.options;
  if (problem.steps < 1 || problem.rows < 0 || problem.classes < 1 ||
      problem.classes > kHtaKlCudaMaxClasses ||
      !(options.temperature > 0) || !(options.delta > 0 && options.delta <= 1) ||
      !(options.row_scale > 0) || !std::isfinite(options.row_scale)) {
    return cudaErrorInvalidValue;
  }
  if (problem.rows == 0) return cudaSuccess;

  size_t shared_limit = 0;
  cudaError_t error = dynamic_shared_limit<scalar_t>(&shared_limit);
  if (error != cudaSuccess) return error;
  const size_t steps_bytes = step_values_bytes<scalar_t>(problem.steps);

  KernelParams<scalar_t> params;
  params.student = static_cast<const scalar_t*>(problem.student);
  params.teacher = static_cast<const scalar_t*>(problem.teacher);
  params.loss_rows = static_cast<acc_t*>(problem.loss_rows);
  params.grad_student = static_cast<scalar_t*>(problem.grad_student);
  params.grad_teacher = static_cast<scalar_t*>(problem.grad_teacher);
  params.steps = problem.steps;
  params.rows = problem.rows;
  params.classes = problem.classes;
  params.inv_tau = static_cast<acc_t>(1.0 / options.temperature);
  params.delta = static_cast<acc_t>(options.delta);
  params.row_scale = static_cast<acc_t>(options.row_scale);
  params.inv_steps = static_cast<acc_t>(1.0 / static_cast<double>(problem.steps));
  params.logit_scale = static_cast<acc_t>(LogBase<acc_t>::kPerNatural / options.temperature);
  params.log_steps = static_cast<acc_t>(LogBase<acc_t>::kPerNatural *
                                        std::log(static_cast<double>(problem.steps)));
  // delta <= 1, so at most 2^62; at least 1 so that the selected bucket always holds mass.
  const double delta_fixed = options.delta * kFixedOne;
  params.delta_fixed = delta_fixed < 1.0 ? 1ull : static_cast<unsigned long long>(delta_fixed);
  params.detach_weights = options.detach_weights;
  params.cache_row_stride = round_up(problem.classes, kWidth);
  params.step_slots = step_slots<scalar_t>(problem.steps);
  params.list_capacity = problem.classes < kCandidates ? problem.classes : kCandidates;
  params.list_bytes = static_cast<size_t>(round_up(
      2 * params.list_capacity * static_cast<int64_t>(sizeof(radix_key_t<scalar_t>)),
      kVectorBytes));
  const size_t front_bytes = steps_bytes + params.list_bytes;
  if (front_bytes > shared_limit) return cudaErrorInvalidValue;  // T beyond hta_kl_cuda_max_steps

  // Whole warps, kChunksPerThread chunks per thread on short rows, at most kMaxThreads.
  const int64_t chunks = (problem.classes + kWidth - 1) / kWidth;
  const int64_t thread_chunks = (chunks + kChunksPerThread - 1) / kChunksPerThread;
  const int threads = static_cast<int>(
      thread_chunks >= kMaxThreads ? kMaxThreads : round_up(thread_chunks, kWarpSize));
  // A 2-D student or one step: logit_mean and prob_mean agree.
  void (*const kernel)(KernelParams<scalar_t>) =
      problem.steps == 1   ? hta_kl_fused_kernel<scalar_t, Student::kSingle>
      : options.logit_mean ? hta_kl_fused_kernel<scalar_t, Student::kLogitMean>
                           : hta_kl_fused_kernel<scalar_t, Student::kProbMean>;

  // Keep the row in shared memory when the teacher and all steps fit (the size is compared in
  // double: (T + 1) * C may overflow 64 bits only far beyond any shared memory), and the cache
  // leaves kMinCachingBlocksPerSm blocks resident per SM or costs none. A block alone on its SM
  // copies its row, then computes on it: the DRAM idles while it computes and its few warps
  // cannot hide the passes' latencies (bench/census/model.py); re-reading the row through L2 in
  // every pass with more resident blocks is then faster.
  const double cache_bytes = static_cast<double>(problem.steps + 1) *
                             static_cast<double>(params.cache_row_stride) * sizeof(scalar_t);
  params.cache_rows = cache_bytes <= static_cast<double>(shared_limit - front_bytes);
  if (params.cache_rows) {
    bool keeps = false;
    error = row_cache_keeps_occupancy(kernel, threads, front_bytes,
                                      static_cast<size_t>(cache_bytes), &keeps);
    if (error != cudaSuccess) return error;
    params.cache_rows = keeps;
  }
  const size_t dynamic_bytes =
      front_bytes + (params.cache_rows ? static_cast<size_t>(cache_bytes) : size_t(0));

  const unsigned blocks =
      static_cast<unsigned>(problem.rows < INT_MAX ? problem.rows : int64_t(INT_MAX));
  return launch_kernel(kernel, blocks, static_cast<unsigned>(threads), dynamic_bytes, stream,
                       params);
}

template <typename scalar_t>
int64_t HtaKlCudaLaunch<scalar_t>::max_steps(cudaError_t* error) {
  size_t limit = 0;
  *error = dynamic_shared_limit<scalar_t>(&limit);
  if (*error != cudaSuccess) return -1;
  return max_steps_within<scalar_t>(limit);
}

}  // namespace htakl
