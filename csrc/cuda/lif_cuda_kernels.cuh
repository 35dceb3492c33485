// CUDA kernels of the fused multi-step LIF ops (contract: htakl_kernels/_ops/lif.py; math: SPEC 3 via
// lif_math.h, the very functions the CPU kernel runs). Each thread owns kWidth consecutive neurons
// (16 bytes of storage: 4 in float32, 8 in 16-bit types, 2 in float64) and loops over time;
// consecutive threads take consecutive groups, so every step's 16-byte loads and stores are
// coalesced. Tensors whose rows are not 16-byte aligned take one neuron per thread instead.
//
// The backward runs lif_backward_segments (lif_math.h, the CPU kernel's schedule too): H of up to
// kSegment steps lives in registers, so no buffer the size of x is written; sequences longer than
// one segment keep one V per segment in a small buffer (the checkpoints) and recompute H.
// Torch-free: compiled by nvcc without torch headers.
//
// The kernels and their launchers for any storage type (LifCudaLaunch, LifCudaBackward,
// lif_cuda_launch.h). Each lif_cuda_<type>.cu instantiates them for one type, but the
// long-segment backward, fully unrolled and most of the compile time, which
// lif_cuda_<type>_long.cu instantiates: separate translation units, compiled in parallel in the
// build; lif_cuda.cu dispatches on the storage type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../lif_math.h"
#include "launch_kernel.h"
#include "lif_cuda_launch.h"

namespace htakl {
namespace {

constexpr int kThreads = 128;

// The forward issues the loads of kChunk steps before it computes them: the recurrence serializes
// the steps, not the loads, and one step's 16 bytes per thread are too few to cover memory latency.
constexpr int kChunk = 8;

// Steps of H a backward thread holds in registers (kWidth values each): short sequences take the
// short segment (fewer registers, more threads per SM), longer ones the long one; past it, H is
// recomputed from checkpoints. The long segment is 16 steps in every type: H takes 64 registers in
// float32 and float64, 128 in the 16-bit types (8 neurons a thread). float32's 32 steps, which the
// census rated 62 % of copy against 54 % for 16 (H200 constants), made a file that compiled in
// over 30 s, and on an H200 the kernel before it reached 16 % (bench/results/nvidia-h200).
template <typename scalar_t>
struct Segments {
  static constexpr int kShort = 8;
  static constexpr int kLong = 16;
};
// One neuron per thread (rows not 16-byte aligned, a rare layout): one segment length, the short
// one; with longer segments or chunks ptxas spills a few bytes around the out-of-line slow path of
// the divisions (float32 at 16 and 32 steps, float64 chunks of 8).
constexpr int kScalarSegment = 8;
constexpr int kScalarChunk = 4;

// kWidth consecutive values of one row, loaded and stored as one 16-byte access when kWidth fills
// 16 bytes.
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Packed {
  T value[kWidth];
};

template <typename scalar_t, int kWidth, typename acc_t = htakl::acc_t<scalar_t>>
__device__ __forceinline__ void unpack_acc(const Packed<scalar_t, kWidth>& packed,
                                           acc_t (&to)[kWidth]) {
#pragma unroll
  for (int w = 0; w < kWidth; ++w) to[w] = to_acc(packed.value[w]);
}

template <typename scalar_t, int kWidth, typename acc_t = htakl::acc_t<scalar_t>>
__device__ __forceinline__ void load_acc(const scalar_t* __restrict__ from, acc_t (&to)[kWidth]) {
  // one 16-byte load into a local copy, then the conversions (converting through a reference
  // to the row lets the compiler split the load and interleave it with the forward's steps)
  const Packed<scalar_t, kWidth> packed = *reinterpret_cast<const Packed<scalar_t, kWidth>*>(from);
  unpack_acc(packed, to);
}

template <typename scalar_t, int kWidth, typename acc_t = htakl::acc_t<scalar_t>>
__device__ __forceinline__ void store_acc(scalar_t* __restrict__ to, const acc_t (&from)[kWidth]) {
  Packed<scalar_t, kWidth> packed;
#pragma unroll
  for (int w = 0; w < kWidth; ++w) packed.value[w] = from_acc<scalar_t>(from[w]);
  *reinterpret_cast<Packed<scalar_t, kWidth>*>(to) = packed;
}

// The state's own type needs no rounding: checkpoints are stored exactly.
template <typename acc_t, int kWidth>
__device__ __forceinline__ void copy_state(acc_t* __restrict__ to, const acc_t (&from)[kWidth]) {
  Packed<acc_t, kWidth> packed;
#pragma unroll
  for (int w = 0; w < kWidth; ++w) packed.value[w] = from[w];
  *reinterpret_cast<Packed<acc_t, kWidth>*>(to) = packed;
}

template <typename acc_t, int kWidth>
__device__ __forceinline__ void copy_state(acc_t (&to)[kWidth], const acc_t* __restrict__ from) {
  const Packed<acc_t, kWidth> packed = *reinterpret_cast<const Packed<acc_t, kWidth>*>(from);
#pragma unroll
  for (int w = 0; w < kWidth; ++w) to[w] = packed.value[w];
}

template <typename scalar_t, int kWidth>
__global__ void __launch_bounds__(kThreads)
    lif_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
                       scalar_t* __restrict__ spikes, scalar_t* __restrict__ v_last,
                       scalar_t* __restrict__ v_seq, int64_t steps, int64_t neurons,
                       LifParams<htakl::acc_t<scalar_t>> p) {
  using acc_t = htakl::acc_t<scalar_t>;
  constexpr int kSteps = kWidth == 1 ? kScalarChunk : kChunk;
  const int64_t n = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kWidth;
  if (n >= neurons) return;
  acc_t v[kWidth];
  load_acc(v_init + n, v);
  for (int64_t first = 0; first < steps; first += kSteps) {
    acc_t x_chunk[kSteps][kWidth];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      if (first + k < steps) load_acc(x + (first + k) * neurons + n, x_chunk[k]);
    }
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      if (first + k >= steps) break;
      acc_t spike[kWidth];
#pragma unroll
      for (int w = 0; w < kWidth; ++w) {
        const acc_t h = lif_charge(v[w], x_chunk[k][w], p);  // SPEC 3
        spike[w] = lif_fire(h, p);
        v[w] = lif_reset(h, spike[w], p);
      }
      const int64_t index = (first + k) * neurons + n;
      store_acc(spikes + index, spike);
      if (v_seq != nullptr) store_acc(v_seq + index, v);
    }
  }
  store_acc(v_last + n, v);
}

// The kWidth neurons of one backward thread, as lif_backward_segments walks them: V, the gradient
// reaching V, and H of the current segment in registers (every index into `h` is a constant once
// the segment's loops unroll).
// The surrogate's exp and division in the backward of 16-bit storage: the GPU's fast forms
// (__expf, one MUFU ex2 of a scaled argument, within 2 + 1.17 |z| ulp of float, so at most about
// 2^-16 relative before its results flush to 0 below e^-87; __fdividef, a reciprocal estimate
// times the dividend, within 2 ulp for these divisors), far below the 2^-8 or 2^-11 to which a
// 16-bit gradient is rounded, and about 15 fewer instructions per neuron and step than expf and
// the IEEE division. float32 and float64 keep the exact functions: their gradients stay
// those of the CPU kernel's formulas bit for bit. The forward's H, and so every spike, is exact in
// every type (lif_charge's correctly rounded division by tau).
struct FastExp {
  __device__ __forceinline__ float operator()(float z) const { return __expf(z); }
};
struct FastDivide {
  // b >= 1 at both call sites (lif_surrogate_grad); __fdividef returns 0 for b above 2^126 (and
  // infinity), where the quotient is below 2^-126 anyway.
  __device__ __forceinline__ float operator()(float a, float b) const { return __fdividef(a, b); }
};
template <typename scalar_t>
using SurrogateExp = std::conditional_t<sizeof(scalar_t) == 2, FastExp, StdExp>;
template <typename scalar_t>
using SurrogateDivide = std::conditional_t<sizeof(scalar_t) == 2, FastDivide, ExactDivide>;

template <typename scalar_t, int kWidth, int kSegment>
struct ThreadNeurons {
  using acc_t = htakl::acc_t<scalar_t>;
  const scalar_t* __restrict__ grad_spikes;  // nullptr: zero gradient
  const scalar_t* __restrict__ grad_v_last;  // nullptr: zero gradient
  const scalar_t* __restrict__ grad_v_seq;   // nullptr: zero gradient
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ v_init;
  scalar_t* __restrict__ grad_x;
  scalar_t* __restrict__ grad_v_init;
  acc_t* __restrict__ checkpoints;  // [lif_checkpoints(steps, kSegment), neurons]
  int64_t steps;
  int64_t neurons;
  int64_t n;  // the thread's first neuron
  // The element offset of the step forward() reads next, or backward() handled last: a
  // segment's walk (lif_backward_segments) runs forward over its steps from k = 0 up, then
  // backward over the same steps down, so the offset moves by a row per step instead of a 64-bit
  // multiply per step. Vector kernels only: in the one-neuron kernel ptxas spills 8 bytes of
  // float64's around the division's slow path with it.
  static constexpr bool kCursor = kWidth > 1;
  int64_t cursor = 0;
  LifParams<acc_t> p;
  acc_t v[kWidth];
  acc_t g_v[kWidth];
  acc_t h[kSegment][kWidth];
  // The rows of the next kLoadAhead steps of the walk, loaded together: x ahead of the forward
  // walk, the spikes' gradient ahead of the backward walk (a segment's forward walk ends before
  // its backward walk starts, so they share the registers); slot k % kLoadAhead holds step k of
  // the segment. The loads depend on nothing computed, so a thread has kLoadAhead steps' loads in
  // flight per memory latency rather than one step's 16 bytes (bench/census counts the waits in
  // the compiled code). Not the whole segment: beside the long segments' H, ptxas spills. One
  // step in the one-neuron kernel, where ptxas spills around the division's slow path with more.
  static constexpr int kLoadAhead = kWidth == 1 ? 1 : kSegment < kChunk ? kSegment : kChunk;
  static_assert(kSegment % kLoadAhead == 0, "a segment's steps fill whole slots of `ahead`");
  Packed<scalar_t, kWidth> ahead[kLoadAhead];

  __device__ __forceinline__ ThreadNeurons(const scalar_t* grad_spikes_,
                                           const scalar_t* grad_v_last_,
                                           const scalar_t* grad_v_seq_, const scalar_t* x_,
                                           const scalar_t* v_init_, scalar_t* grad_x_,
                                           scalar_t* grad_v_init_, acc_t* checkpoints_,
                                           int64_t steps_, int64_t neurons_, int64_t n_,
                                           LifParams<acc_t> p_)
      : grad_spikes(grad_spikes_), grad_v_last(grad_v_last_), grad_v_seq(grad_v_seq_), x(x_),
        v_init(v_init_), grad_x(grad_x_), grad_v_init(grad_v_init_), checkpoints(checkpoints_),
        steps(steps_), neurons(neurons_), n(n_), p(p_) {}

  __device__ __forceinline__ void begin_forward() { load_acc(v_init + n, v); }
  __device__ __forceinline__ void save(int64_t c) {
    copy_state(checkpoints + (c - 1) * neurons + n, v);
  }
  __device__ __forceinline__ void restore(int64_t c) {
    if (c == 0) return begin_forward();
    copy_state(v, checkpoints + (c - 1) * neurons + n);
  }
  // Rows first .. first + count - 1 of `rows` (count <= kLoadAhead) into ahead[0 .. count - 1].
  __device__ __forceinline__ void load_ahead(const scalar_t* __restrict__ rows, int64_t first,
                                             int64_t count) {
    const scalar_t* from = rows + first * neurons + n;
#pragma unroll
    for (int j = 0; j < kLoadAhead; ++j) {
      // the slots past `count` are set too (never read), so that no register keeps the previous
      // rows alive beside H
      ahead[j] = kLoadAhead == 1 || j < count
                     ? *reinterpret_cast<const Packed<scalar_t, kWidth>*>(from)
                     : Packed<scalar_t, kWidth>{};
      from += neurons;
    }
  }
  __device__ __forceinline__ void forward(int64_t t, int k, bool keep) {
    // lif_backward_segments walks every segment forward from its first step (k = 0) to the
    // sequence's last step at most
    if (k % kLoadAhead == 0) load_ahead(x, t, steps - t);
    if (!kCursor || k == 0) cursor = t * neurons + n;
    cursor += neurons;
    acc_t x_t[kWidth];
    unpack_acc(ahead[k % kLoadAhead], x_t);
#pragma unroll
    for (int w = 0; w < kWidth; ++w) {
      const acc_t h_t = lif_charge(v[w], x_t[w], p);  // SPEC 3
      if (keep) h[k][w] = h_t;
      v[w] = lif_reset(h_t, lif_fire(h_t, p), p);
    }
  }
  __device__ __forceinline__ void begin_backward() {
#pragma unroll
    for (int w = 0; w < kWidth; ++w) g_v[w] = acc_t(0);
    if (grad_v_last != nullptr) load_acc(grad_v_last + n, g_v);
  }
  __device__ __forceinline__ void backward(int64_t t, int k) {
    const int64_t index = kCursor ? cursor -= neurons : t * neurons + n;
    acc_t g_spike[kWidth], g_seq[kWidth];
#pragma unroll
    for (int w = 0; w < kWidth; ++w) g_spike[w] = acc_t(0);
    if (grad_spikes != nullptr) {
      // the backward walk starts at the segment's last step (k = kSegment - 1, or the sequence's
      // last step) and goes down: a slot's rows are loaded at the top of it
      const int slot = k % kLoadAhead;
      if (slot == kLoadAhead - 1 || t == steps - 1) load_ahead(grad_spikes, t - slot, slot + 1);
      unpack_acc(ahead[slot], g_spike);
    }
    if (grad_v_seq != nullptr) {
      load_acc(grad_v_seq + index, g_seq);
#pragma unroll
      for (int w = 0; w < kWidth; ++w) g_v[w] += g_seq[w];
    }
    acc_t g_x[kWidth];
#pragma unroll
    for (int w = 0; w < kWidth; ++w) {
      const LifStepGrad<acc_t> g = lif_step_grad(g_spike[w], g_v[w], h[k][w], p,
                                                 SurrogateExp<scalar_t>{},
                                                 SurrogateDivide<scalar_t>{});
      g_x[w] = g.x;
      g_v[w] = g.v_prev;
    }
    store_acc(grad_x + index, g_x);
  }
  __device__ __forceinline__ void end_backward() { store_acc(grad_v_init + n, g_v); }
};

template <typename scalar_t, int kWidth, int kSegment>
__global__ void __launch_bounds__(kThreads)
    lif_backward_kernel(const scalar_t* __restrict__ grad_spikes,
                        const scalar_t* __restrict__ grad_v_last,
                        const scalar_t* __restrict__ grad_v_seq, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ v_init, scalar_t* __restrict__ grad_x,
                        scalar_t* __restrict__ grad_v_init,
                        htakl::acc_t<scalar_t>* __restrict__ checkpoints, int64_t steps,
                        int64_t neurons, LifParams<htakl::acc_t<scalar_t>> p) {
  const int64_t n = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kWidth;
  if (n >= neurons) return;
  ThreadNeurons<scalar_t, kWidth, kSegment> group(grad_spikes, grad_v_last, grad_v_seq, x, v_init,
                                                  grad_x, grad_v_init, checkpoints, steps,
                                                  neurons, n, p);
  lif_backward_segments(steps, std::integral_constant<int, kSegment>{}, group);
}

template <typename scalar_t>
constexpr int kVectorWidth = 16 / sizeof(scalar_t);

// Whether every row of every tensor starts on a 16-byte boundary, as the vector kernels read and
// write them.
template <typename scalar_t>
bool rows_aligned(int64_t neurons, std::initializer_list<const void*> pointers) {
  if (neurons % kVectorWidth<scalar_t> != 0) return false;
  for (const void* pointer : pointers) {
    if (reinterpret_cast<uintptr_t>(pointer) % 16 != 0) return false;
  }
  return true;
}

unsigned int blocks_for(int64_t neurons, int width) {
  const int64_t per_block = int64_t(kThreads) * width;
  return static_cast<unsigned int>((neurons + per_block - 1) / per_block);
}

// The vector width and segment of each backward kernel (see Segments).
template <typename scalar_t, LifBackwardKernel kKernel>
struct BackwardShape {
  using K = LifBackwardKernel;
  static constexpr int kWidth = kKernel == K::kOneNeuron ? 1 : kVectorWidth<scalar_t>;
  static constexpr int kSegment = kKernel == K::kOneNeuron      ? kScalarSegment
                                  : kKernel == K::kShortSegment ? Segments<scalar_t>::kShort
                                                                : Segments<scalar_t>::kLong;
};

// body(the backward kernel for these arguments, as a std::integral_constant): one neuron per
// thread where a row is not 16-byte aligned, else the short or the long segment.
template <typename scalar_t, typename Body>
auto with_backward_kernel(const LifBackwardArgs& a, Body&& body) {
  using K = LifBackwardKernel;
  if (!rows_aligned<scalar_t>(a.neurons, {a.grad_spikes, a.grad_v_last, a.grad_v_seq, a.x,
                                          a.v_init, a.grad_x, a.grad_v_init})) {
    return body(std::integral_constant<K, K::kOneNeuron>{});
  }
  if (a.steps <= Segments<scalar_t>::kShort) {
    return body(std::integral_constant<K, K::kShortSegment>{});
  }
  return body(std::integral_constant<K, K::kLongSegment>{});
}

}  // namespace

template <typename scalar_t>
cudaError_t LifCudaLaunch<scalar_t>::forward(const LifForwardArgs& a,
                                             const LifParams<double>& params,
                                             cudaStream_t stream) {
  using acc_t = htakl::acc_t<scalar_t>;
  const auto run = [&](auto kernel, int width) {
    return launch_kernel(
        kernel, blocks_for(a.neurons, width), kThreads, 0, stream,
        static_cast<const scalar_t*>(a.x), static_cast<const scalar_t*>(a.v_init),
        static_cast<scalar_t*>(a.spikes), static_cast<scalar_t*>(a.v_last),
        static_cast<scalar_t*>(a.v_seq), a.steps, a.neurons, cast_lif_params<acc_t>(params));
  };
  constexpr int kWidth = kVectorWidth<scalar_t>;
  if (rows_aligned<scalar_t>(a.neurons, {a.x, a.v_init, a.spikes, a.v_last, a.v_seq})) {
    return run(lif_forward_kernel<scalar_t, kWidth>, kWidth);
  }
  return run(lif_forward_kernel<scalar_t, 1>, 1);
}

template <typename scalar_t>
int64_t LifCudaLaunch<scalar_t>::backward_checkpoint_rows(const LifBackwardArgs& a) {
  return with_backward_kernel<scalar_t>(a, [&](auto kernel) {
    return lif_checkpoints(a.steps, BackwardShape<scalar_t, decltype(kernel)::value>::kSegment);
  });
}

template <typename scalar_t, LifBackwardKernel kKernel>
cudaError_t LifCudaBackward<scalar_t, kKernel>::launch(const LifBackwardArgs& a,
                                                       const LifParams<double>& params,
                                                       cudaStream_t stream) {
  using acc_t = htakl::acc_t<scalar_t>;
  using Shape = BackwardShape<scalar_t, kKernel>;
  return launch_kernel(
      lif_backward_kernel<scalar_t, Shape::kWidth, Shape::kSegment>,
      blocks_for(a.neurons, Shape::kWidth), kThreads, 0, stream,
      static_cast<const scalar_t*>(a.grad_spikes), static_cast<const scalar_t*>(a.grad_v_last),
      static_cast<const scalar_t*>(a.grad_v_seq), static_cast<const scalar_t*>(a.x),
      static_cast<const scalar_t*>(a.v_init), static_cast<scalar_t*>(a.grad_x),
      static_cast<scalar_t*>(a.grad_v_init), static_cast<acc_t*>(a.checkpoints), a.steps,
      a.neurons, cast_lif_params<acc_t>(params));
}

template <typename scalar_t>
cudaError_t LifCudaLaunch<scalar_t>::backward(const LifBackwardArgs& a,
                                              const LifParams<double>& params,
                                              cudaStream_t stream) {
  return with_backward_kernel<scalar_t>(a, [&](auto kernel) {
    return LifCudaBackward<scalar_t, decltype(kernel)::value>::launch(a, params, stream);
  });
}

}  // namespace htakl
