// Checks of cuda_emulation.h itself, against what the CUDA programming guide specifies for each
// primitive (tests/test_cuda_emulated.py builds and runs it). With no argument: every semantic
// check, exit status 0 when all pass. With one of the names in `kBrokenKernels`: launches that
// kernel, which would hang or be undefined on a GPU; the emulation must stop with an error.
// `convert IN OUT`: the 16-bit conversions of the values in IN (see convert()).
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_runtime.h"

namespace {

struct Params {
  unsigned* out;  // one slot per thread and check
  int checks;
};

__device__ unsigned& slot(const Params& params, int check) {
  return params.out[threadIdx.x * params.checks + check];
}

// One thread per slot; a block of 64 threads (two warps).
__global__ void warp_kernel(Params params) {
  const unsigned lane = threadIdx.x % 32;
  slot(params, 0) = __shfl_sync(0xffffffffu, lane * 10u, 5);                // lane 5's value
  slot(params, 1) = __shfl_up_sync(0xffffffffu, lane, 3);                   // lane - 3, or own
  slot(params, 2) = __shfl_down_sync(0xffffffffu, lane, 3);                 // lane + 3, or own
  slot(params, 3) = __shfl_xor_sync(0xffffffffu, lane, 1);                  // the pair's other
  slot(params, 4) = __ballot_sync(0xffffffffu, lane % 3 == 0);              // lanes 0, 3, ...
  slot(params, 5) = __match_any_sync(0xffffffffu, lane / 8);                // groups of 8 lanes
  // A partial mask: only the even lanes take part, each reading the next even lane.
  slot(params, 6) = lane % 2 == 0 ? __shfl_sync(0x55555555u, lane, (lane + 2) % 32) : 99u;
  // 64-bit values keep all their bits.
  const unsigned long long wide = (1ull << 40) + lane;
  slot(params, 7) = static_cast<unsigned>(__shfl_sync(0xffffffffu, wide, 31) >> 32);
  // Reductions over groups of lanes that call at once with different masks: lanes 0-9, 10-31.
  slot(params, 8) = __reduce_add_sync(lane < 10 ? 0x3ffu : ~0x3ffu, lane);
}

__global__ void block_kernel(Params params) {
  __shared__ unsigned counter;
  __shared__ unsigned order[64];
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  order[threadIdx.x] = atomicAdd(&counter, 1u);
  __syncthreads();
  // Every thread sees every other's write once past the barrier.
  unsigned seen = 0;
  for (unsigned i = 0; i < blockDim.x; ++i) seen += order[i];
  slot(params, 0) = counter;
  slot(params, 1) = seen;  // 0 + 1 + ... + 63
  slot(params, 2) = blockIdx.x;
  uint4* dynamic = dynamic_shared_memory();
  reinterpret_cast<unsigned*>(dynamic)[threadIdx.x] = threadIdx.x * 2;
  __syncthreads();
  slot(params, 3) = reinterpret_cast<unsigned*>(dynamic)[blockDim.x - 1 - threadIdx.x];
}

// Lane 0's shuffle names lane 1, which exits without reaching it: a hang on a GPU.
__global__ void exited_lane_kernel(Params params) {
  if (threadIdx.x % 32 != 0) return;
  slot(params, 0) = __shfl_sync(0x3u, 1u, 0);
}

// Half the block waits at a barrier the other half never reaches while the other half waits
// in a shuffle with the first half.
__global__ void divergent_barrier_kernel(Params params) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    slot(params, 0) = __shfl_sync(0xffffffffu, 1u, 0);
  }
}

// A lane calls a shuffle whose mask leaves it out.
__global__ void foreign_mask_kernel(Params params) {
  slot(params, 0) = __shfl_sync(0x1u, 1u, 0);
}

const char* const kBrokenKernels[] = {"exited_lane", "divergent_barrier", "foreign_mask"};

int failures = 0;

void expect(bool ok, const char* what, unsigned thread, unsigned got, unsigned want) {
  if (ok) return;
  std::fprintf(stderr, "%s, thread %u: got %u, want %u\n", what, thread, got, want);
  ++failures;
}

std::vector<unsigned> launch(void (*kernel)(Params), unsigned blocks, unsigned threads,
                             int checks, size_t dynamic_bytes = 0) {
  std::vector<unsigned> out(threads * checks, 0xdeadbeefu);
  Params params{out.data(), checks};
  void* arguments[] = {&params};
  if (cudaLaunchKernel(kernel, dim3(blocks), dim3(threads), arguments, dynamic_bytes, nullptr) !=
      cudaSuccess) {
    std::fprintf(stderr, "launch failed\n");
    ++failures;
  }
  return out;
}

void check_warp_intrinsics() {
  const std::vector<unsigned> out = launch(warp_kernel, 1, 64, 9);
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; lane += 3) ballot |= 1u << lane;
  for (unsigned thread = 0; thread < 64; ++thread) {
    const unsigned lane = thread % 32;
    const unsigned* got = &out[thread * 9];
    expect(got[0] == 50, "__shfl_sync", thread, got[0], 50);
    expect(got[1] == (lane >= 3 ? lane - 3 : lane), "__shfl_up_sync", thread, got[1], lane);
    expect(got[2] == (lane + 3 < 32 ? lane + 3 : lane), "__shfl_down_sync", thread, got[2], lane);
    expect(got[3] == (lane ^ 1u), "__shfl_xor_sync", thread, got[3], lane ^ 1u);
    expect(got[4] == ballot, "__ballot_sync", thread, got[4], ballot);
    expect(got[5] == 0xffu << (lane / 8 * 8), "__match_any_sync", thread, got[5],
           0xffu << (lane / 8 * 8));
    const unsigned partial = lane % 2 == 0 ? (lane + 2) % 32 : 99u;
    expect(got[6] == partial, "__shfl_sync with a partial mask", thread, got[6], partial);
    expect(got[7] == 1u << 8, "__shfl_sync of 64 bits", thread, got[7], 1u << 8);
    const unsigned group_sum = lane < 10 ? 45u : 496u - 45u;  // 0 + ... + 9, 10 + ... + 31
    expect(got[8] == group_sum, "__reduce_add_sync", thread, got[8], group_sum);
  }
}

void check_block_primitives() {
  const unsigned blocks = 3, threads = 64;
  const std::vector<unsigned> out = launch(block_kernel, blocks, threads, 4, threads * 4);
  // The last block's values (every block writes the same slots).
  for (unsigned thread = 0; thread < threads; ++thread) {
    const unsigned* got = &out[thread * 4];
    expect(got[0] == threads, "atomicAdd count", thread, got[0], threads);
    expect(got[1] == threads * (threads - 1) / 2, "__syncthreads visibility", thread, got[1],
           threads * (threads - 1) / 2);
    expect(got[2] == blocks - 1, "blockIdx", thread, got[2], blocks - 1);
    expect(got[3] == (threads - 1 - thread) * 2, "dynamic shared memory", thread, got[3],
           (threads - 1 - thread) * 2);
  }
}

}  // namespace

// `convert IN OUT`: IN holds float32 values; OUT receives, for each, the bits of its __half and
// __nv_bfloat16 roundings and the float32 those convert back to (uint16, uint16, float, float).
int convert(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  FILE* out = std::fopen(out_path, "wb");
  if (in == nullptr || out == nullptr) return 2;
  float x;
  while (std::fread(&x, sizeof x, 1, in) == 1) {
    const __half h = __float2half_rn(x);
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    const float back[2] = {__half2float(h), __bfloat162float(b)};
    std::fwrite(&h.bits, 2, 1, out);
    std::fwrite(&b.bits, 2, 1, out);
    std::fwrite(back, sizeof(float), 2, out);
  }
  std::fclose(in);
  std::fclose(out);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "convert") == 0) return convert(argv[2], argv[3]);
  if (argc == 2) {
    void (*kernel)(Params) = nullptr;
    if (std::strcmp(argv[1], kBrokenKernels[0]) == 0) kernel = exited_lane_kernel;
    if (std::strcmp(argv[1], kBrokenKernels[1]) == 0) kernel = divergent_barrier_kernel;
    if (std::strcmp(argv[1], kBrokenKernels[2]) == 0) kernel = foreign_mask_kernel;
    if (kernel == nullptr) return 2;
    launch(kernel, 1, 32, 1);
    return 0;  // not reached: the emulation stops the program
  }
  check_warp_intrinsics();
  check_block_primitives();
  if (failures == 0) std::printf("all emulation checks passed\n");
  return failures == 0 ? 0 : 1;
}
