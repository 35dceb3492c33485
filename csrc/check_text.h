// Numbers and shapes as text for the argument checks' error messages (hta_kl_op.h, lif_op.h, the
// CPU kernel files and the CUDA bindings), formatted without std::ostream.
//
// TORCH_CHECK streams its message arguments into a std::ostringstream compiled into this
// extension. Inserting a number there runs the C++ runtime's locale machinery (std::num_put) from
// code built against the compiler's own headers; where the process loaded a different C++ runtime
// than the one those headers describe, that is where a mismatch would surface, inside an error
// path. Formatting the numbers here first leaves the stream only character strings to copy, and
// the text stays what c10 printed before: integers in decimal, doubles as std::ostream's default
// ("%g"), shapes as c10's ArrayRef printer ("[2, 3, 5]").
//
// Torch-free: a shape is any range of integers (c10::IntArrayRef, std::vector<int64_t>, ...).
#pragma once

#include <locale.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <string>

namespace htakl {

// An integer in decimal: "100000", "-3". std::to_chars for integers is inline in <charconv>, so
// nothing of the C++ runtime library runs.
inline std::string integer_text(int64_t value) {
  char buffer[24];  // int64_t's 19 digits and a sign
  const std::to_chars_result end = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, end.ptr);
}

// A double as std::ostream prints it by default: printf's "%g" in the "C" locale (6 significant
// digits: "0.1", "-0.333333", "1e-07", "-1.23457e+06", "inf", "nan"), which is how libstdc++'s
// std::num_put formats one. Not std::to_chars's shortest round-trip form, which would change the
// messages ("-0.30000000000000004" where users read "-0.3") and whose floating-point overloads
// live in the C++ runtime library (GCC 11 or newer) rather than in libc. The "C" locale is set for
// this thread around the call so that a process locale with a decimal comma (Python's
// locale.setlocale) prints "0.1" as std::ostream's classic locale does.
inline std::string real_text(double value) {
  // newlocale cannot fail for "C"; were it to, uselocale(0) would keep the current locale.
  static const locale_t c_locale = newlocale(LC_ALL_MASK, "C", static_cast<locale_t>(0));
  const locale_t previous = uselocale(c_locale);
  char buffer[32];  // "%g" of a double is at most 13 characters: "-1.23457e+308"
  const int length = std::snprintf(buffer, sizeof buffer, "%g", value);
  uselocale(previous);
  return std::string(buffer, length > 0 ? static_cast<size_t>(length) : 0);
}

// A shape as c10 prints an IntArrayRef: "[2, 3, 5]", "[]" for a 0-d tensor.
template <typename Sizes>
std::string shape_text(const Sizes& sizes) {
  std::string text = "[";
  for (const int64_t size : sizes) {
    if (text.size() > 1) text += ", ";
    text += integer_text(size);
  }
  return text + "]";
}

}  // namespace htakl
