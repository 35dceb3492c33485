// CUDA kernels of the fused multi-step LIF ops (contract: htakl_kernels/lif.py; math: SPEC 3 via
// lif_math.h, the very functions the CPU kernel runs). One thread per neuron looping over time;
// consecutive threads take consecutive neurons, so every step's loads and stores are coalesced.
// Torch-free: compiled by nvcc without torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lif_cuda.h"
#include "lif_math.h"

namespace htakl {
namespace {

constexpr int kThreads = 256;

// Each thread walks time in chunks of kChunk steps and issues all loads of a chunk before it
// computes: one neuron per thread leaves too few bytes in flight to cover memory latency
// otherwise (the recurrence serializes the steps, not the loads).
constexpr int kChunk = 8;

// SPEC 3's forward for neuron n, from V[-1] = v: calls visit(index, h, spike, v) at every step t
// in order, with index = t * neurons + n, H[t], S[t] and V[t]; returns V[T-1]. The forward and the
// backward's recompute sweep differ only in what they store.
template <typename scalar_t, typename acc_t, typename Visit>
__device__ __forceinline__ acc_t lif_forward_sweep(const scalar_t* __restrict__ x, acc_t v,
                                                   int64_t steps, int64_t neurons, int64_t n,
                                                   const LifParams<acc_t>& p, Visit visit) {
  for (int64_t first = 0; first < steps; first += kChunk) {
    acc_t x_chunk[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (first + k < steps) x_chunk[k] = to_acc(x[(first + k) * neurons + n]);
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (first + k >= steps) break;
      const acc_t h = lif_charge(v, x_chunk[k], p);  // SPEC 3
      const acc_t spike = lif_fire(h, p);
      v = lif_reset(h, spike, p);
      visit((first + k) * neurons + n, h, spike, v);
    }
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lif_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
                       scalar_t* __restrict__ spikes, scalar_t* __restrict__ v_last,
                       scalar_t* __restrict__ v_seq, int64_t steps, int64_t neurons,
                       LifParams<acc_t> p) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= neurons) return;
  const acc_t v = lif_forward_sweep(
      x, to_acc(v_init[n]), steps, neurons, n, p,
      [&](int64_t index, acc_t /*h*/, acc_t spike, acc_t v_t) {
        spikes[index] = from_acc<scalar_t>(spike);
        if (v_seq != nullptr) v_seq[index] = from_acc<scalar_t>(v_t);
      });
  v_last[n] = from_acc<scalar_t>(v);
}

// `h_scratch` may alias `grad_x` (same type): each thread reads H[t] back before it writes
// grad_x[t] at that address (a chunk's loads all precede its stores), hence no __restrict__ on
// either.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lif_backward_kernel(const scalar_t* __restrict__ grad_spikes,
                        const scalar_t* __restrict__ grad_v_last,
                        const scalar_t* __restrict__ grad_v_seq, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ v_init, scalar_t* grad_x,
                        scalar_t* __restrict__ grad_v_init, acc_t* h_scratch, int64_t steps,
                        int64_t neurons, LifParams<acc_t> p) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= neurons) return;
  // Sweep 1: recompute H[t] (SPEC 3 forward).
  lif_forward_sweep(x, to_acc(v_init[n]), steps, neurons, n, p,
                    [&](int64_t index, acc_t h, acc_t /*spike*/, acc_t /*v*/) {
                      h_scratch[index] = h;
                    });
  // Sweep 2: SPEC 3's table from t = T-1 down to 0; g_v_next is the gradient reaching V[t].
  acc_t g_v_next = grad_v_last != nullptr ? to_acc(grad_v_last[n]) : acc_t(0);
  for (int64_t last = steps - 1; last >= 0; last -= kChunk) {
    acc_t h_chunk[kChunk], g_spike_chunk[kChunk], g_v_chunk[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (last - k < 0) break;
      const int64_t index = (last - k) * neurons + n;
      h_chunk[k] = h_scratch[index];
      g_spike_chunk[k] = grad_spikes != nullptr ? to_acc(grad_spikes[index]) : acc_t(0);
      g_v_chunk[k] = grad_v_seq != nullptr ? to_acc(grad_v_seq[index]) : acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (last - k < 0) break;
      const LifStepGrad<acc_t> g =
          lif_step_grad(g_spike_chunk[k], g_v_next + g_v_chunk[k], h_chunk[k], p);
      grad_x[(last - k) * neurons + n] = from_acc<scalar_t>(g.x);
      g_v_next = g.v_prev;
    }
  }
  grad_v_init[n] = from_acc<scalar_t>(g_v_next);
}

unsigned int blocks_for(int64_t neurons) {
  return static_cast<unsigned int>((neurons + kThreads - 1) / kThreads);
}

template <typename scalar_t>
cudaError_t launch_forward(const LifForwardArgs& a, const LifParams<double>& params,
                           cudaStream_t stream) {
  using acc_t = htakl::acc_t<scalar_t>;
  lif_forward_kernel<scalar_t, acc_t><<<blocks_for(a.neurons), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(a.x), static_cast<const scalar_t*>(a.v_init),
      static_cast<scalar_t*>(a.spikes), static_cast<scalar_t*>(a.v_last),
      static_cast<scalar_t*>(a.v_seq), a.steps, a.neurons, cast_lif_params<acc_t>(params));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const LifBackwardArgs& a, const LifParams<double>& params,
                            cudaStream_t stream) {
  using acc_t = htakl::acc_t<scalar_t>;
  lif_backward_kernel<scalar_t, acc_t><<<blocks_for(a.neurons), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(a.grad_spikes), static_cast<const scalar_t*>(a.grad_v_last),
      static_cast<const scalar_t*>(a.grad_v_seq), static_cast<const scalar_t*>(a.x),
      static_cast<const scalar_t*>(a.v_init), static_cast<scalar_t*>(a.grad_x),
      static_cast<scalar_t*>(a.grad_v_init), static_cast<acc_t*>(a.scratch), a.steps, a.neurons,
      cast_lif_params<acc_t>(params));
  return cudaGetLastError();
}

}  // namespace

cudaError_t lif_forward_cuda(Storage storage, const LifForwardArgs& args,
                             const LifParams<double>& params, cudaStream_t stream) {
  if (args.neurons == 0) return cudaSuccess;
  switch (storage) {
    case Storage::kFloat16: return launch_forward<__half>(args, params, stream);
    case Storage::kBFloat16: return launch_forward<__nv_bfloat16>(args, params, stream);
    case Storage::kFloat32: return launch_forward<float>(args, params, stream);
    case Storage::kFloat64: return launch_forward<double>(args, params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t lif_backward_cuda(Storage storage, const LifBackwardArgs& args,
                              const LifParams<double>& params, cudaStream_t stream) {
  if (args.neurons == 0) return cudaSuccess;
  switch (storage) {
    case Storage::kFloat16: return launch_backward<__half>(args, params, stream);
    case Storage::kBFloat16: return launch_backward<__nv_bfloat16>(args, params, stream);
    case Storage::kFloat32: return launch_backward<float>(args, params, stream);
    case Storage::kFloat64: return launch_backward<double>(args, params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace htakl
