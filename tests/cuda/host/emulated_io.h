// What the emulated kernels' host programs (tests/cuda/*_emulated.cpp) share: buffers placed as
// the tests ask, and raw little-endian arrays in and out of files.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common.h"

namespace emulated_io {

inline size_t storage_bytes(htakl::Storage dtype) {
  switch (dtype) {
    case htakl::Storage::kFloat32: return 4;
    case htakl::Storage::kFloat64: return 8;
    default: return 2;
  }
}

// `count` elements of `element` bytes at `offset` elements into a 16-byte aligned allocation of
// exactly (offset + count) elements: a sanitizer build sees any access past either end.
struct Buffer {
  unsigned char* base = nullptr;
  unsigned char* data = nullptr;
  Buffer(size_t count, size_t element, size_t offset) {
    void* allocation = nullptr;
    if (posix_memalign(&allocation, 16, std::max<size_t>((offset + count) * element, 1)) != 0) {
      std::fprintf(stderr, "out of memory\n");
      std::exit(100);
    }
    base = static_cast<unsigned char*>(allocation);
    data = base + offset * element;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(base); }
};

inline bool file_exists(const std::string& path) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (file != nullptr) std::fclose(file);
  return file != nullptr;
}

inline void read_file(const std::string& path, void* data, size_t bytes) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr || std::fread(data, 1, bytes, file) != bytes) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(100);
  }
  std::fclose(file);
}

inline void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr || std::fwrite(data, 1, bytes, file) != bytes) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(100);
  }
  std::fclose(file);
}

}  // namespace emulated_io
