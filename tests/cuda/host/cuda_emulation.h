// A host emulation of the part of CUDA the kernels in csrc/cuda use, so that their own source
// (not a copy) runs on a CPU in CI: tests/test_cuda_emulated.py compiles csrc/cuda's .cu files as
// C++ with this directory first on the include path (cuda_runtime.h and the other headers here
// stand in for the toolkit's) and runs them against the float64 oracle.
//
// What it models. Each CUDA thread is a fiber (ucontext) with its own stack; a block's fibers run
// on one OS thread, one block after another, and switch only at __syncthreads and the warp
// intrinsics. A fiber that reaches one waits there until the others it names have reached it too:
// every live thread of the block for __syncthreads, the lanes of `mask` for a warp intrinsic,
// which then computes its result from all of their arguments at once, as the hardware does.
// Threads that a barrier or an intrinsic waits for and that exited, lanes that call intrinsics
// with different masks, a barrier some threads never reach: each is a deadlock on a GPU (or
// undefined), and here an error that names the block, the thread and what it waits for.
// __shared__ variables are static (one block runs at a time), the block's dynamic shared memory
// is a buffer of exactly the launch's size, filled with a pattern rather than zeros; integer
// atomics are plain read-modify-writes (fibers never switch inside one).
//
// What it does not model: memory ordering and races (compute-sanitizer's racecheck does, on a
// GPU), the device's approximate math (the kernels' `__CUDA_ARCH__` arms; their host arms compute
// the same function to float rounding, flushing subnormals where the device instruction does),
// and speed. Occupancy and device attributes are those of an H100 (sm_90).
#pragma once

#include <math.h>  // the C++ wrapper: isfinite, fmaf, exp2f, ... in the global namespace, as in CUDA
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// The compiler's view: CUDA source, no device pass (so the kernels take their host arms).
#define __CUDACC__ 1
#define HTAKL_CUDA_HOST_EMULATION 1
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulation {
// The bits of `from` read as a `To` of the same size.
template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
}  // namespace cuda_emulation

// ---------------------------------------------------------------------------------------------
// 16-bit storage types: bits and round-to-nearest-even conversions (no arithmetic: the kernels
// convert to float first, as the build's __CUDA_NO_HALF_OPERATORS__ makes them).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1fu,
                 mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) {  // inf, NaN
    return cuda_emulation::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  }
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -24)
                                        : std::ldexp(static_cast<float>(mantissa | 0x400u),
                                                     static_cast<int>(exponent) - 25);
  return sign ? -magnitude : magnitude;
}

inline __half __float2half_rn(float x) {
  const uint32_t bits = cuda_emulation::bit_cast<uint32_t>(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (std::isnan(x)) return {static_cast<uint16_t>(sign | 0x7e00u)};
  const float magnitude = std::fabs(x);
  if (magnitude >= 65520.0f) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  // Scale so that the half's last mantissa bit is the float's unit, round to nearest even there.
  int exponent;
  std::frexp(magnitude, &exponent);  // magnitude = f * 2^exponent, f in [0.5, 1)
  const int unit = std::max(exponent - 11, -24);  // the half's ulp is 2^unit
  const float scaled = std::nearbyint(std::ldexp(magnitude, -unit));  // FE_TONEAREST: even ties
  const float rounded = std::ldexp(scaled, unit);
  if (rounded == 0.0f) return {sign};
  int e;
  std::frexp(rounded, &e);
  if (e - 1 < -14) {  // subnormal: mantissa = rounded / 2^-24
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::ldexp(rounded, 24)))};
  }
  const uint32_t mantissa = static_cast<uint32_t>(std::ldexp(rounded, 11 - e)) & 0x3ffu;
  return {static_cast<uint16_t>(sign | ((e - 1 + 15) << 10) | mantissa)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return cuda_emulation::bit_cast<float>(static_cast<uint32_t>(h.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits = cuda_emulation::bit_cast<uint32_t>(x);
  if (std::isnan(x)) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even on the dropped 16 bits
  return {static_cast<uint16_t>(bits >> 16)};
}

// ---------------------------------------------------------------------------------------------
// Bit and conversion intrinsics.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __float_as_uint(float x) { return cuda_emulation::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return cuda_emulation::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return cuda_emulation::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return cuda_emulation::bit_cast<double>(x); }
// Round to nearest; negative and NaN give 0 and too large the maximum, as the device saturates.
template <typename T>
inline unsigned long long saturating_ull(T x) {
  if (!(x > T(0))) return 0;
  if (x >= T(18446744073709551616.0)) return ~0ull;
  return static_cast<unsigned long long>(std::nearbyint(x));
}
inline unsigned long long __float2ull_rn(float x) { return saturating_ull(x); }
inline unsigned long long __double2ull_rn(double x) { return saturating_ull(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

// Shared-memory integer atomics: fibers never switch inside one.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// ---------------------------------------------------------------------------------------------
// The fibers of one block and their meeting points.
namespace cuda_emulation {

enum class Wait { kRunnable, kBarrier, kWarp, kDone };
enum class WarpOp { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kMatchAny, kReduceAdd };

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarpSize = 32;

struct Thread {
  ucontext_t context;
  char* stack = nullptr;  // from stack_pool
  Wait wait = Wait::kRunnable;
  WarpOp op = WarpOp::kShfl;
  unsigned mask = 0;
  uint64_t value = 0;  // the argument's bits
  int lane_arg = 0;    // source lane, delta or lane mask
  uint64_t result = 0;
};

struct Block {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
};

// AddressSanitizer is told of every stack switch, so that it follows the fibers' stacks.
#ifdef __SANITIZE_ADDRESS__
}  // namespace cuda_emulation
#include <sanitizer/common_interface_defs.h>
namespace cuda_emulation {
inline void* scheduler_fake_stack = nullptr;
inline const void* scheduler_stack_bottom = nullptr;
inline size_t scheduler_stack_size = 0;
#define HTAKL_EMULATION_SWITCH(fake, bottom, size) __sanitizer_start_switch_fiber(fake, bottom, size)
#define HTAKL_EMULATION_ARRIVE(fake, bottom, size) __sanitizer_finish_switch_fiber(fake, bottom, size)
#else
#define HTAKL_EMULATION_SWITCH(fake, bottom, size)
#define HTAKL_EMULATION_ARRIVE(fake, bottom, size)
#endif

inline Block* running = nullptr;
// The fibers' stacks, reused by every block.
inline std::vector<std::unique_ptr<char[]>> stack_pool;
inline uint4* dynamic_shared = nullptr;
inline std::string failure;  // the first emulation error of a launch

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void switch_to_scheduler() {
  Thread& self = running->threads[running->current];
  [[maybe_unused]] void* fake_stack = nullptr;
  HTAKL_EMULATION_SWITCH(&fake_stack, scheduler_stack_bottom, scheduler_stack_size);
  swapcontext(&self.context, &running->scheduler);
  HTAKL_EMULATION_ARRIVE(fake_stack, &scheduler_stack_bottom, &scheduler_stack_size);
}

inline void fiber_entry() {
  HTAKL_EMULATION_ARRIVE(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
  (*running->body)();
  running->threads[running->current].wait = Wait::kDone;
  // Returns to uc_link, the scheduler; this fiber's stack is done with.
  HTAKL_EMULATION_SWITCH(nullptr, scheduler_stack_bottom, scheduler_stack_size);
}

template <typename T>
inline uint64_t bits_of(T value) {
  static_assert(sizeof(T) <= 8, "warp intrinsics take values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
inline T value_of(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Parks the calling thread at a warp intrinsic until every lane of `mask` is there; returns its
// result.
inline uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_arg) {
  Thread& self = running->threads[running->current];
  const unsigned lane = running->current % kWarpSize;
  if (!(mask >> lane & 1u)) {
    fail("thread " + std::to_string(running->current) + " calls a warp intrinsic with mask " +
         std::to_string(mask) + " that does not include its own lane");
  }
  self.wait = Wait::kWarp;
  self.op = op;
  self.mask = mask;
  self.value = value;
  self.lane_arg = lane_arg;
  switch_to_scheduler();
  return self.result;
}

// Completes the warp intrinsics whose lanes have all arrived; returns whether any did.
inline bool resolve_warps(Block& block) {
  bool resolved = false;
  const unsigned threads = static_cast<unsigned>(block.threads.size());
  for (unsigned base = 0; base < threads; base += kWarpSize) {
    for (unsigned lane = 0; lane < kWarpSize && base + lane < threads; ++lane) {
      Thread& first = block.threads[base + lane];
      if (first.wait != Wait::kWarp) continue;
      const unsigned mask = first.mask;
      bool complete = true;
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if (!(mask >> other & 1u)) continue;
        if (base + other >= threads) {
          fail("a warp intrinsic's mask names lane " + std::to_string(other) +
               " past the block's last thread");
        }
        const Thread& peer = block.threads[base + other];
        if (peer.wait == Wait::kDone) {
          fail("block " + std::to_string(blockIdx.x) + ": thread " +
               std::to_string(base + lane) + " waits in a warp intrinsic for lane " +
               std::to_string(other) + ", which has exited");
        }
        if (peer.wait != Wait::kWarp || peer.mask != mask) complete = false;
        else if (peer.op != first.op) fail("lanes of one mask call different warp intrinsics");
      }
      if (!complete) continue;
      unsigned ballot = 0;
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if ((mask >> other & 1u) && block.threads[base + other].value != 0) ballot |= 1u << other;
      }
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if (!(mask >> other & 1u)) continue;
        Thread& t = block.threads[base + other];
        // The source lane of a shuffle (itself where the source is out of range, as on the device).
        int source = static_cast<int>(other);
        switch (t.op) {
          case WarpOp::kShfl: source = t.lane_arg & (kWarpSize - 1); break;
          case WarpOp::kShflUp:
            if (static_cast<int>(other) >= t.lane_arg) source = static_cast<int>(other) - t.lane_arg;
            break;
          case WarpOp::kShflDown:
            if (static_cast<int>(other) + t.lane_arg < kWarpSize) {
              source = static_cast<int>(other) + t.lane_arg;
            }
            break;
          case WarpOp::kShflXor: source = static_cast<int>(other) ^ t.lane_arg; break;
          default: break;
        }
        if (t.op == WarpOp::kBallot) {
          t.result = ballot;
        } else if (t.op == WarpOp::kReduceAdd) {
          uint32_t sum = 0;  // wraps modulo 2^32, as the device's
          for (unsigned peer = 0; peer < kWarpSize; ++peer) {
            if (mask >> peer & 1u) sum += static_cast<uint32_t>(block.threads[base + peer].value);
          }
          t.result = sum;
        } else if (t.op == WarpOp::kMatchAny) {
          unsigned same = 0;
          for (unsigned peer = 0; peer < kWarpSize; ++peer) {
            if ((mask >> peer & 1u) && block.threads[base + peer].value == t.value) {
              same |= 1u << peer;
            }
          }
          t.result = same;
        } else {
          if (!(mask >> source & 1u)) {
            fail("a shuffle reads lane " + std::to_string(source) + ", outside its mask");
          }
          t.result = block.threads[base + static_cast<unsigned>(source)].value;
        }
      }
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if (mask >> other & 1u) block.threads[base + other].wait = Wait::kRunnable;
      }
      resolved = true;
    }
  }
  return resolved;
}

// Sets `thread` up to run fiber_entry on `stack`, then return to `scheduler`. A function of its
// own: getcontext returns twice, which would leave a caller's loop variables undefined.
[[gnu::noinline]] inline void start_fiber(Thread& thread, char* stack, ucontext_t* scheduler) {
  thread.stack = stack;
  getcontext(&thread.context);
  thread.context.uc_stack.ss_sp = stack;
  thread.context.uc_stack.ss_size = kStackBytes;
  thread.context.uc_link = scheduler;
  makecontext(&thread.context, fiber_entry, 0);
}

// Runs one block of `threads` fibers of `body` to completion.
inline void run_block(unsigned threads, const std::function<void()>& body) {
  Block block;
  block.threads.resize(threads);
  block.body = &body;
  running = &block;
  while (stack_pool.size() < threads) stack_pool.emplace_back(new char[kStackBytes]);
  for (unsigned i = 0; i < threads; ++i) {
    start_fiber(block.threads[i], stack_pool[i].get(), &block.scheduler);
  }
  for (;;) {
    bool ran = false;
    for (unsigned i = 0; i < threads; ++i) {
      if (block.threads[i].wait != Wait::kRunnable) continue;
      block.current = i;
      threadIdx.x = i;
      HTAKL_EMULATION_SWITCH(&scheduler_fake_stack, block.threads[i].stack, kStackBytes);
      swapcontext(&block.scheduler, &block.threads[i].context);
      HTAKL_EMULATION_ARRIVE(scheduler_fake_stack, nullptr, nullptr);
      ran = true;
    }
    if (ran || resolve_warps(block)) continue;
    unsigned done = 0, at_barrier = 0;
    for (const Thread& t : block.threads) {
      done += t.wait == Wait::kDone;
      at_barrier += t.wait == Wait::kBarrier;
    }
    if (done == threads) break;
    if (done + at_barrier == threads) {
      for (Thread& t : block.threads) {
        if (t.wait == Wait::kBarrier) t.wait = Wait::kRunnable;
      }
      continue;
    }
    for (unsigned i = 0; i < threads; ++i) {
      const Thread& t = block.threads[i];
      if (t.wait == Wait::kWarp) {
        fail("block " + std::to_string(blockIdx.x) + " deadlocks: thread " + std::to_string(i) +
             " waits in a warp intrinsic (mask " + std::to_string(t.mask) +
             ") while other threads wait at __syncthreads or in another intrinsic");
      }
    }
    fail("block " + std::to_string(blockIdx.x) + " deadlocks");
  }
  running = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() {
  cuda_emulation::running->threads[cuda_emulation::running->current].wait =
      cuda_emulation::Wait::kBarrier;
  cuda_emulation::switch_to_scheduler();
}

namespace cuda_emulation {
template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T value, int lane_arg, int width) {
  if (width != kWarpSize) fail("shuffles narrower than a warp are not emulated");
  return value_of<T>(warp_collective(op, mask, bits_of(value), lane_arg));
}
}  // namespace cuda_emulation

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
  return cuda_emulation::shuffle(cuda_emulation::WarpOp::kShfl, mask, value, source, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return cuda_emulation::shuffle(cuda_emulation::WarpOp::kShflUp, mask, value,
                                 static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return cuda_emulation::shuffle(cuda_emulation::WarpOp::kShflDown, mask, value,
                                 static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return cuda_emulation::shuffle(cuda_emulation::WarpOp::kShflXor, mask, value, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(cuda_emulation::warp_collective(
      cuda_emulation::WarpOp::kBallot, mask, predicate != 0, 0));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(cuda_emulation::warp_collective(
      cuda_emulation::WarpOp::kReduceAdd, mask, value, 0));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(cuda_emulation::warp_collective(
      cuda_emulation::WarpOp::kMatchAny, mask, cuda_emulation::bits_of(value), 0));
}

// The block's dynamic shared memory: the kernels' HTAKL_CUDA_HOST_EMULATION arms call this
// where CUDA declares `extern __shared__`.
inline uint4* dynamic_shared_memory() { return cuda_emulation::dynamic_shared; }

// ---------------------------------------------------------------------------------------------
// The runtime API subset the launchers call, for one H100-like device.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};

namespace cuda_emulation {
constexpr int kSharedOptin = 232448;       // bytes one block may opt in to (227 KiB)
constexpr int kSharedPerSm = 233472;       // 228 KiB per SM
constexpr size_t kStaticShared = 8192;     // what a kernel's __shared__ variables are taken to use
constexpr int kDefaultDynamicLimit = 49152;
constexpr int kThreadsPerSm = 2048;
constexpr int kMultiprocessors = 132;
inline std::vector<std::pair<const void*, int>> dynamic_limits;  // raised per kernel

inline int dynamic_limit(const void* kernel) {
  for (const auto& [known, limit] : dynamic_limits) {
    if (known == kernel) return limit;
  }
  return kDefaultDynamicLimit;
}
}  // namespace cuda_emulation

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "emulated CUDA error";
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = cuda_emulation::kSharedOptin; break;
    case cudaDevAttrMultiProcessorCount: *value = cuda_emulation::kMultiprocessors; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
  attributes->sharedSizeBytes = cuda_emulation::kStaticShared;
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) + cuda_emulation::kStaticShared >
                       static_cast<size_t>(cuda_emulation::kSharedOptin)) {
    return cudaErrorInvalidValue;
  }
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& [known, limit] : cuda_emulation::dynamic_limits) {
    if (known == key) {
      limit = value;
      return cudaSuccess;
    }
  }
  cuda_emulation::dynamic_limits.emplace_back(key, value);
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel*, int threads,
                                                                 size_t dynamic_bytes) {
  const size_t shared = cuda_emulation::kStaticShared + dynamic_bytes;
  const int by_threads = cuda_emulation::kThreadsPerSm / threads;
  const int by_shared = static_cast<int>(cuda_emulation::kSharedPerSm / shared);
  *blocks = by_threads < by_shared ? by_threads : by_shared;
  return cudaSuccess;
}

namespace cuda_emulation {
// The kernel's arguments, copied out of cudaLaunchKernel's array of pointers to them.
template <typename... Params, size_t... I>
std::tuple<Params...> copy_arguments(void** args, std::index_sequence<I...>) {
  return std::tuple<Params...>(*static_cast<const Params*>(args[I])...);
}
}  // namespace cuda_emulation

// A launch runs to completion before it returns (the stream is ignored).
template <typename... Params>
inline cudaError_t cudaLaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block,
                                    void** args, size_t dynamic_bytes, cudaStream_t) {
  if (block.x == 0 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x == 0 ||
      grid.y != 1 || grid.z != 1) {
    return cudaErrorInvalidConfiguration;
  }
  if (dynamic_bytes > static_cast<size_t>(
                          cuda_emulation::dynamic_limit(reinterpret_cast<const void*>(kernel)))) {
    return cudaErrorInvalidValue;
  }
  const std::tuple<Params...> arguments = cuda_emulation::copy_arguments<Params...>(
      args, std::index_sequence_for<Params...>());
  // Exactly the bytes asked for (a sanitizer build sees any access past them), never zeroed.
  std::unique_ptr<uint4[]> shared(new uint4[(dynamic_bytes + sizeof(uint4) - 1) / sizeof(uint4)]);
  std::memset(static_cast<void*>(shared.get()), 0xa5, dynamic_bytes);
  cuda_emulation::dynamic_shared = shared.get();
  gridDim = uint3{grid.x, 1, 1};
  blockDim = uint3{block.x, 1, 1};
  const std::function<void()> body = [&arguments, kernel] { std::apply(kernel, arguments); };
  for (unsigned b = 0; b < grid.x; ++b) {
    blockIdx = uint3{b, 0, 0};
    cuda_emulation::run_block(block.x, body);
  }
  cuda_emulation::dynamic_shared = nullptr;
  return cudaSuccess;
}
