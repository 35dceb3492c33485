// Multi-step LIF CPU kernels (see lif_cpu.cpp, which includes this file once per instruction set
// inside its own namespace). The only include is the other per-ISA header; the including file
// provides the standard and ATen ones.
//
// Neurons are independent: each task takes a range of neurons and walks it in blocks, looping
// over time outside and over the block's neurons inside, so every inner loop reads and writes
// contiguous memory and is one SIMD loop. Optional tensors (a null pointer stands for "absent",
// or for a zero gradient) are handled in their own small loops, so the main loops carry no
// pointer test and only loop-invariant option selects.

#include "exp_nonpositive.h"

// Inline every call in a task's body: the per-element math of lif_math.h and the exp must inline
// into the loops for them to vectorize, and GCC's heuristics leave some of those calls out of line.
#define HTAKL_FLATTEN __attribute__((flatten))

constexpr int64_t kMaxBlock = 4096;
// Elements of H per block in the backward (H of one segment); blocks shrink as the segment grows
// so that H stays in the per-core cache.
constexpr int64_t kScratchElements = int64_t(1) << 16;

inline int64_t block_size(int64_t held_steps) {
  return std::clamp<int64_t>(kScratchElements / held_steps, 8, kMaxBlock);
}

// Enough elements per task that a task outweighs its scheduling.
inline int64_t grain_size(int64_t steps) {
  return std::max<int64_t>(kMaxBlock, (int64_t(1) << 15) / std::max<int64_t>(steps, 1));
}

// dst[i] = src[i] in acc_t for i < count, or zeros when src is null.
template <typename scalar_t, typename acc_t>
inline void load_or_zero(const scalar_t* src, int64_t count, acc_t* dst) {
  if (src == nullptr) {
    std::fill_n(dst, count, acc_t(0));
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = to_acc(src[i]);
}

template <typename scalar_t, typename acc_t>
inline void store(const acc_t* src, int64_t count, scalar_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = from_acc<scalar_t>(src[i]);
}

// `Flags` is a LifFlags (lif_cpu.cpp) holding the flags of `options` as constants; the forward
// reads only soft_reset and decay_input.
template <typename scalar_t, typename acc_t, typename Flags>
void forward_kernel(const scalar_t* x, const scalar_t* v_init, scalar_t* spikes, scalar_t* v_last,
                    scalar_t* v_seq, LifLayout layout, const LifParams<acc_t> options) {
  const auto [steps, neurons] = layout;
  at::parallel_for(0, neurons, grain_size(steps), [=](int64_t begin, int64_t end) HTAKL_FLATTEN {
    const LifParams<acc_t> p = Flags::fix(options);
    acc_t v[kMaxBlock];
    for (int64_t first = begin; first < end; first += kMaxBlock) {
      const int64_t count = std::min(kMaxBlock, end - first);
      load_or_zero(v_init + first, count, v);
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t row = t * neurons + first;
        const scalar_t* x_t = x + row;
        scalar_t* spikes_t = spikes + row;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) {
          const acc_t h = lif_charge(v[i], to_acc(x_t[i]), p);  // SPEC 3
          const acc_t spike = lif_fire(h, p);
          v[i] = lif_reset(h, spike, p);
          spikes_t[i] = from_acc<scalar_t>(spike);
        }
        if (v_seq != nullptr) store(v, count, v_seq + row);
      }
      store(v, count, v_last + first);
    }
  });
}

// One block of `count` neurons starting at neuron `first`, walked over time by
// lif_backward_segments (lif_math.h): every step is one SIMD loop over the block. Null gradient
// pointers stand for zero gradients.
template <typename scalar_t, typename acc_t, typename Exp>
struct BackwardBlock {
  const scalar_t* grad_spikes;
  const scalar_t* grad_v_last;
  const scalar_t* grad_v_seq;
  const scalar_t* x;
  const scalar_t* v_init;
  scalar_t* grad_x;
  scalar_t* grad_v_init;
  int64_t neurons;
  int64_t first;
  int64_t count;
  int64_t stride;       // elements between two slots of `h` and two rows of `checkpoints`
  acc_t* v;             // V of the forward sweeps
  acc_t* g_v;           // the gradient reaching V[t] in the backward sweep
  acc_t* grad_spike;    // the gradient on S[t] of one step
  acc_t* h;             // H of the segment: slot k at h + k * stride
  acc_t* checkpoints;   // V at the start of segment c at checkpoints + (c - 1) * stride
  LifParams<acc_t> p;
  Exp exp_nonpositive;

  void begin_forward() { load_or_zero(v_init + first, count, v); }
  void save(int64_t c) { std::copy_n(v, count, checkpoints + (c - 1) * stride); }
  void restore(int64_t c) {
    if (c == 0) return begin_forward();
    std::copy_n(checkpoints + (c - 1) * stride, count, v);
  }
  void forward(int64_t t, int k, bool keep) {
    const scalar_t* x_t = x + t * neurons + first;
    if (keep) {
      acc_t* h_k = h + k * stride;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        h_k[i] = lif_charge(v[i], to_acc(x_t[i]), p);  // SPEC 3
        v[i] = lif_reset(h_k[i], lif_fire(h_k[i], p), p);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        const acc_t h_t = lif_charge(v[i], to_acc(x_t[i]), p);
        v[i] = lif_reset(h_t, lif_fire(h_t, p), p);
      }
    }
  }
  void begin_backward() {
    load_or_zero(grad_v_last == nullptr ? nullptr : grad_v_last + first, count, g_v);
  }
  void backward(int64_t t, int k) {
    const int64_t row = t * neurons + first;
    const acc_t* h_k = h + k * stride;
    if (grad_v_seq != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) g_v[i] += to_acc(grad_v_seq[row + i]);
    }
    load_or_zero(grad_spikes == nullptr ? nullptr : grad_spikes + row, count, grad_spike);
    scalar_t* grad_x_t = grad_x + row;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const LifStepGrad<acc_t> g = lif_step_grad(grad_spike[i], g_v[i], h_k[i], p, exp_nonpositive);
      grad_x_t[i] = from_acc<scalar_t>(g.x);
      g_v[i] = g.v_prev;
    }
  }
  void end_backward() { store(g_v, count, grad_v_init + first); }
};

// The backward through lif_backward_segments, H held `segment` steps at a time (kCpuSegment in
// the op; the test-only op picks small ones to exercise the checkpoints).
template <typename scalar_t, typename acc_t, typename Flags>
void backward_kernel(const scalar_t* grad_spikes, const scalar_t* grad_v_last,
                     const scalar_t* grad_v_seq, const scalar_t* x, const scalar_t* v_init,
                     scalar_t* grad_x, scalar_t* grad_v_init, LifLayout layout,
                     const LifParams<acc_t> options, int64_t segment) {
  const auto [steps, neurons] = layout;
  // a segment longer than the sequence holds it whole: the same walk as one of T steps
  const int64_t held = std::min(std::max<int64_t>(steps, 1), segment);
  const int64_t block = block_size(held);
  const int64_t checkpoint_rows = lif_checkpoints(steps, held);
  const auto fast_exp = [](acc_t z) { return exp_nonpositive(z); };
  at::parallel_for(0, neurons, grain_size(steps), [=](int64_t begin, int64_t end) HTAKL_FLATTEN {
    std::vector<acc_t> h(static_cast<size_t>(held * block));
    std::vector<acc_t> checkpoints(static_cast<size_t>(checkpoint_rows * block));
    acc_t v[kMaxBlock];
    acc_t g_v[kMaxBlock];
    acc_t grad_spike[kMaxBlock];
    for (int64_t first = begin; first < end; first += block) {
      BackwardBlock<scalar_t, acc_t, decltype(fast_exp)> group{
          grad_spikes, grad_v_last, grad_v_seq, x, v_init, grad_x, grad_v_init, neurons, first,
          std::min(block, end - first), block, v, g_v, grad_spike, h.data(), checkpoints.data(),
          Flags::fix(options), fast_exp};
      lif_backward_segments(steps, static_cast<int>(held), group);
    }
  });
}
