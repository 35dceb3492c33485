// Runs the CUDA LIF launchers and kernels of csrc/cuda on the host, through tests/cuda/host's
// emulation of CUDA: tests/cuda_emulated.py compiles this file with csrc/cuda/lif_cuda.cu and
// the per-type .cu files as C++ and runs it on one call at a time.
//
//   lif_emulated DTYPE PASS STEPS NEURONS TAU V_THRESHOLD V_RESET SOFT_RESET DECAY_INPUT
//                DETACH_RESET SURROGATE ALPHA OFFSET DIR
//
// DTYPE is htakl::Storage's value, PASS `forward` or `backward`, SURROGATE a name of
// lif_math.h's kLifSurrogateNames.
// Tensors are raw little-endian files of the storage type in DIR, each placed OFFSET elements
// past the start of an allocation of exactly its size plus OFFSET (16-byte aligned): forward
// reads x [STEPS, NEURONS] and v_init [NEURONS] and writes spikes, v_last and, if DIR holds a
// file `want_v_seq`, v_seq; backward reads x, v_init and those of grad_spikes, grad_v_last and
// grad_v_seq that DIR holds (a missing one is a zero gradient) and writes grad_x and grad_v_init.
// Exits with the launcher's cudaError_t (0: success).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "cuda/lif_cuda.h"
#include "host/emulated_io.h"

int main(int argc, char** argv) {
  using emulated_io::Buffer;
  if (argc != 15) {
    std::fprintf(stderr, "usage: see the head of tests/cuda/lif_emulated.cpp\n");
    return 100;
  }
  const auto dtype = static_cast<htakl::Storage>(std::atoi(argv[1]));
  const bool forward = std::strcmp(argv[2], "forward") == 0;
  const int64_t steps = std::atoll(argv[3]), neurons = std::atoll(argv[4]);
  htakl::LifParams<double> params{};
  params.tau = std::atof(argv[5]);
  params.v_threshold = std::atof(argv[6]);
  params.soft_reset = std::atoi(argv[8]) != 0;
  params.v_reset = params.soft_reset ? 0.0 : std::atof(argv[7]);  // SPEC 3: Vr = 0 when soft
  params.decay_input = std::atoi(argv[9]) != 0;
  params.detach_reset = std::atoi(argv[10]) != 0;
  // The surrogate by name, from the kernels' own table of names (lif_math.h).
  int32_t surrogate = 0;
  while (surrogate < htakl::kLifSurrogateCount &&
         std::strcmp(argv[11], htakl::kLifSurrogateNames[surrogate]) != 0) {
    ++surrogate;
  }
  if (surrogate == htakl::kLifSurrogateCount) {
    std::fprintf(stderr, "unknown surrogate %s\n", argv[11]);
    return 100;
  }
  params.surrogate = static_cast<htakl::LifSurrogate>(surrogate);
  params.alpha = std::atof(argv[12]);
  params = htakl::with_lif_constants(params);
  const size_t offset = static_cast<size_t>(std::atoll(argv[13]));
  const std::string dir = std::string(argv[14]) + "/";

  const size_t element = emulated_io::storage_bytes(dtype);
  const size_t state = dtype == htakl::Storage::kFloat64 ? 8 : 4;
  const size_t sequence = static_cast<size_t>(steps * neurons), step = static_cast<size_t>(neurons);
  Buffer x(sequence, element, offset), v_init(step, element, offset);
  emulated_io::read_file(dir + "x", x.data, sequence * element);
  emulated_io::read_file(dir + "v_init", v_init.data, step * element);
  using emulated_io::write_file;
  if (forward) {
    const bool want_v_seq = emulated_io::file_exists(dir + "want_v_seq");
    Buffer spikes(sequence, element, offset), v_last(step, element, offset),
        v_seq(sequence, element, offset);
    const htakl::LifForwardArgs args{x.data, v_init.data, spikes.data, v_last.data,
                                     want_v_seq ? v_seq.data : nullptr, steps, neurons};
    const cudaError_t error = htakl::lif_forward_cuda(dtype, args, params, nullptr);
    if (error != cudaSuccess) return static_cast<int>(error);
    write_file(dir + "spikes", spikes.data, sequence * element);
    write_file(dir + "v_last", v_last.data, step * element);
    if (want_v_seq) write_file(dir + "v_seq", v_seq.data, sequence * element);
    return 0;
  }
  // A gradient the directory holds, or none (nullptr: zero).
  const auto gradient = [&](const char* name, size_t count) -> std::unique_ptr<Buffer> {
    if (!emulated_io::file_exists(dir + name)) return nullptr;
    auto buffer = std::make_unique<Buffer>(count, element, offset);
    emulated_io::read_file(dir + name, buffer->data, count * element);
    return buffer;
  };
  const auto grad_spikes = gradient("grad_spikes", sequence);
  const auto grad_v_last = gradient("grad_v_last", step);
  const auto grad_v_seq = gradient("grad_v_seq", sequence);
  Buffer grad_x(sequence, element, offset), grad_v_init(step, element, offset);
  htakl::LifBackwardArgs args{grad_spikes ? grad_spikes->data : nullptr,
                              grad_v_last ? grad_v_last->data : nullptr,
                              grad_v_seq ? grad_v_seq->data : nullptr,
                              x.data, v_init.data, grad_x.data, grad_v_init.data, nullptr, steps,
                              neurons};
  const int64_t rows = htakl::lif_backward_checkpoint_rows(dtype, args);
  Buffer checkpoints(static_cast<size_t>(rows) * step, state, 0);
  if (rows > 0) args.checkpoints = checkpoints.data;
  const cudaError_t error = htakl::lif_backward_cuda(dtype, args, params, nullptr);
  if (error != cudaSuccess) return static_cast<int>(error);
  write_file(dir + "grad_x", grad_x.data, sequence * element);
  write_file(dir + "grad_v_init", grad_v_init.data, step * element);
  return 0;
}
