// Runs the CUDA HTA-KL launcher and kernels of csrc/cuda on the host, through tests/cuda/host's
// emulation of CUDA: tests/test_cuda_emulated.py compiles this file with csrc/cuda/hta_kl_cuda.cu
// and the per-type .cu files as C++ and runs it on one problem at a time.
//
//   hta_kl_emulated DTYPE STEPS ROWS CLASSES TAU DELTA LOGIT_MEAN DETACH ROW_SCALE GRAD_STUDENT
//                   GRAD_TEACHER OFFSET STUDENT_FILE TEACHER_FILE OUT_PREFIX
//
// DTYPE is htakl::Storage's value. The inputs are raw little-endian arrays of the storage type
// ([STEPS, ROWS, CLASSES] and [ROWS, CLASSES]); each is placed OFFSET elements past the start of
// an allocation of exactly its size plus OFFSET (16-byte aligned), so OFFSET > 0 gives rows
// that are not 16-byte aligned and a sanitizer build catches any access past an end. Writes
// OUT_PREFIX.loss (ROWS values of acc_t) and, when asked, OUT_PREFIX.grad_student and
// OUT_PREFIX.grad_teacher. Exits with the launcher's cudaError_t (0: success).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda/hta_kl_cuda.h"
#include "host/emulated_io.h"

int main(int argc, char** argv) {
  using emulated_io::Buffer;
  if (argc != 16) {
    std::fprintf(stderr, "usage: see the head of tests/cuda/hta_kl_emulated.cpp\n");
    return 100;
  }
  const auto dtype = static_cast<htakl::Storage>(std::atoi(argv[1]));
  htakl::HtaKlCudaProblem problem{};
  problem.steps = std::atoll(argv[2]);
  problem.rows = std::atoll(argv[3]);
  problem.classes = std::atoll(argv[4]);
  problem.options.temperature = std::atof(argv[5]);
  problem.options.delta = std::atof(argv[6]);
  problem.options.logit_mean = std::atoi(argv[7]) != 0;
  problem.options.detach_weights = std::atoi(argv[8]) != 0;
  problem.options.row_scale = std::atof(argv[9]);
  const bool grad_student = std::atoi(argv[10]) != 0, grad_teacher = std::atoi(argv[11]) != 0;
  const size_t offset = static_cast<size_t>(std::atoll(argv[12]));
  const std::string out = argv[15];

  const size_t element = emulated_io::storage_bytes(dtype);
  const size_t acc_bytes = dtype == htakl::Storage::kFloat64 ? 8 : 4;
  const size_t teacher_count = static_cast<size_t>(problem.rows * problem.classes);
  const size_t student_count = static_cast<size_t>(problem.steps) * teacher_count;
  Buffer student(student_count, element, offset), teacher(teacher_count, element, offset);
  Buffer loss(static_cast<size_t>(problem.rows), acc_bytes, 0);
  Buffer d_student(student_count, element, offset), d_teacher(teacher_count, element, offset);
  emulated_io::read_file(argv[13], student.data, student_count * element);
  emulated_io::read_file(argv[14], teacher.data, teacher_count * element);
  problem.student = student.data;
  problem.teacher = teacher.data;
  problem.loss_rows = loss.data;
  problem.grad_student = grad_student ? d_student.data : nullptr;
  problem.grad_teacher = grad_teacher ? d_teacher.data : nullptr;

  const cudaError_t error = htakl::hta_kl_fused_cuda(dtype, problem, nullptr);
  if (error != cudaSuccess) return static_cast<int>(error);
  using emulated_io::write_file;
  write_file(out + ".loss", loss.data, static_cast<size_t>(problem.rows) * acc_bytes);
  if (grad_student) write_file(out + ".grad_student", d_student.data, student_count * element);
  if (grad_teacher) write_file(out + ".grad_teacher", d_teacher.data, teacher_count * element);
  return 0;
}
