// A hint for the large outputs of the CPU kernels (the gradients and [T, ...] outputs): back them
// with transparent huge pages.
//
// A fresh output of tens of MiB comes straight from mmap (glibc serves allocations over 32 MiB,
// and smaller ones until its threshold adapts, that way), and the kernel's first write to each
// 4 KiB page then takes a page fault: 8192 faults for 32 MiB, which on the machines we measured
// cost more than the kernel itself. With the 2 MiB-aligned interior of the buffer advised
// MADV_HUGEPAGE, the kernel takes one fault per 2 MiB instead. This is only advice: it changes no
// value, the memory stays the allocator's, and where transparent huge pages are off (or on other
// systems) nothing happens. PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every allocation.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace htakl {

inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  // A failure leaves ordinary pages, which is correct too: the result is deliberately ignored.
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty_like(like), advised as huge pages before anything writes it.
inline at::Tensor empty_like_huge_pages(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  return out;
}

}  // namespace htakl
