// Branch-free exp of non-positive arguments for the CPU kernels.
//
// No include guard and no includes, on purpose: a kernel file includes it (through its per-ISA
// kernel header) once inside each instruction-set namespace, under that namespace's target
// options, so the loops calling it vectorize for that instruction set. The including file
// provides <bit>, <cmath> and <cstdint>.

// exp(x) for x <= 0 (also -inf -> 0 and NaN -> NaN), the only arguments a max-shifted softmax
// produces. Written branch-free so the loops calling it vectorize: x = n ln2 + r with |r| <= ln2/2,
// e^r by its degree-7 Taylor polynomial (truncation 5e-9 relative), 2^n assembled from two normal
// halves so results in the subnormal range round correctly.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 9 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440054690583e-4f;
  constexpr float kRoundToInt = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLowest = -104.0f;          // below it e^x rounds to 0 in float
  const float clamped = x < kLowest ? kLowest : x;
  const float shifted = clamped * kLog2e + kRoundToInt;
  const float n = shifted - kRoundToInt;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  // n in [-150, 0] sits in the low mantissa bits of `shifted`; split it into two halves >= -75.
  const int32_t n_int = static_cast<int32_t>(std::bit_cast<uint32_t>(shifted) -
                                             std::bit_cast<uint32_t>(kRoundToInt));
  const int32_t n_high = n_int >> 1;
  const float scale_high = std::bit_cast<float>(static_cast<uint32_t>(n_high + 127) << 23);
  const float scale_low = std::bit_cast<float>(static_cast<uint32_t>(n_int - n_high + 127) << 23);
  const float result = poly * scale_high * scale_low;
  return x < kLowest ? 0.0f : result;
}

inline double exp_nonpositive(double x) { return std::exp(x); }
