// Per-row HTA-KL CPU kernel (see hta_kl_cpu.cpp, which includes this file once per instruction
// set inside its own namespace). The only include is the other per-ISA header; the including file
// provides the standard ones.

#include "exp_nonpositive.h"

constexpr int kLanes = 16;

// Interleaved partial sums: element i goes to lane i % kLanes, lanes are combined pairwise.
template <typename T, int kStats>
struct LaneSums {
  T lane[kStats][kLanes] = {};
  T total(int stat) const {
    T partial[kLanes];
    std::copy_n(lane[stat], kLanes, partial);
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int l = 0; l < width; ++l) partial[l] += partial[l + width];
    return partial[0];
  }
};

// Calls body(i, lane) for i in [0, n) in blocks of kLanes; the lanes of a block are independent
// (each writes only its own lane), so the block is one SIMD loop.
template <typename Body>
inline void for_each_lane(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) body(i + l, l);
  }
  for (int l = 0; i + l < n; ++l) body(i + l, l);
}

// Calls body(i) for i in [0, n), iterations independent (elementwise passes).
template <typename Body>
inline void for_each_element(int64_t n, Body&& body) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) body(i);
}

// Radix-select key and mass types: probabilities are >= 0, so their bit patterns order like the
// values. Masses for the selection are summed in a wider type than the probabilities (SPEC 1,
// "Rounding at the head boundary").
template <typename acc_t>
struct SelectTypes;
template <>
struct SelectTypes<float> {
  using key_t = uint32_t;
  using mass_t = double;
};
template <>
struct SelectTypes<double> {
  using key_t = uint64_t;
  using mass_t = long double;
};

// SPEC 1.3 membership: head = { p > value } plus the tied p == value with class index < cut.
// value = -1 puts every class in the head (the row's mass never reaches delta).
template <typename acc_t>
struct HeadBoundary {
  acc_t value;
  int64_t cut;
  // 1 for a head class, else 0 (branch-free: it runs inside the SIMD loop of the row sums).
  acc_t mask(acc_t p, int64_t i) const {
    return ((p > value) | ((p == value) & (i < cut))) ? acc_t(1) : acc_t(0);
  }
};

// Buckets of find_head_boundary's digits: their masses, and a 256-bit set of the buckets a round
// filled. Between rounds every mass is zero, so a round adds into its buckets and resets only
// those it marked.
template <typename mass_t>
struct DigitBuckets {
  static constexpr int kCount = 256;
  mass_t mass[kCount] = {};
  uint64_t occupied[kCount / 64] = {};
  void mark(int digit) { occupied[digit / 64] |= uint64_t(1) << (digit % 64); }
  // Calls visit(digit) for the marked buckets from the highest digit down, until it returns true.
  template <typename Visit>
  void visit_from_top(Visit&& visit) const {
    for (int word = kCount / 64 - 1; word >= 0; --word) {
      for (uint64_t bits = occupied[word]; bits != 0;) {
        const int top = 63 - std::countl_zero(bits);
        bits &= ~(uint64_t(1) << top);
        if (visit(64 * word + top)) return;
      }
    }
  }
  void clear() {
    for (int word = 0; word < kCount / 64; ++word) {
      for (uint64_t bits = occupied[word]; bits != 0; bits &= bits - 1)
        mass[64 * word + std::countr_zero(bits)] = mass_t(0);
      occupied[word] = 0;
    }
  }
};

// Calls visit(i) for every i in [0, n) where hit(i) holds, in ascending order. hit runs in a SIMD
// loop over blocks of 64 classes whose results become one 64-bit set, so a sweep that keeps few
// classes pays a scalar step for each kept class only.
template <typename Hit, typename Visit>
inline void for_each_hit(int64_t n, Hit&& hit, Visit&& visit) {
  constexpr int kBlock = 64;
  static_assert(std::endian::native == std::endian::little, "the byte gather below");
  uint8_t flags[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t width = std::min<int64_t>(kBlock, n - start);
    if (width == kBlock) {
#pragma omp simd
      for (int l = 0; l < kBlock; ++l) flags[l] = hit(start + l) ? 1 : 0;
    } else {
      for (int l = 0; l < kBlock; ++l) flags[l] = l < width && hit(start + l) ? 1 : 0;
    }
    uint64_t bits = 0;
    for (int word = 0; word < kBlock / 8; ++word) {
      uint64_t bytes;
      std::memcpy(&bytes, flags + 8 * word, 8);
      // Eight 0 / 1 bytes to eight bits: the product adds byte k's bit into bit 56 + k, and
      // nothing else reaches bits 56-63.
      bits |= ((bytes * 0x0102040810204080ull) >> 56) << (8 * word);
    }
    for (; bits != 0; bits &= bits - 1) visit(start + std::countr_zero(bits));
  }
}

// The float selection's first digit is the whole exponent field, so the values in one bucket
// (finite: a NaN row skips the selection) are integers below 2^24 times one power of two: their
// sum is the integer sum of those significands times that power, exact in uint64_t (up to 2^40
// classes). Summed in double they are exact too (up to 2^29 classes), so these are the bits any
// order of double additions gives, with one-cycle integer additions in the chains of a crowded
// bucket, the slowest part of the selection. kHistogramWays histograms, element j adding into
// histogram j % kHistogramWays and the histograms added in a fixed order, cut each chain that many
// times. Fills the buckets of the keys key_at(0), ..., key_at(count - 1) and marks those with mass.
constexpr int kHistogramWays = 4;

template <typename mass_t, typename KeyAt>
void exponent_masses(int64_t count, KeyAt&& key_at, DigitBuckets<mass_t>& buckets) {
  constexpr int kBuckets = DigitBuckets<mass_t>::kCount;
  uint64_t partial[kHistogramWays][kBuckets] = {};
  // The bucket and significand of kLanes elements at a time in one SIMD loop; only the additions
  // into the histograms stay scalar.
  uint32_t exponent[kLanes], significand[kLanes];
  auto split = [&](int64_t j, int l) {
    const uint32_t key = key_at(j);
    exponent[l] = (key >> 23) & (kBuckets - 1);
    significand[l] = (key & 0x7fffffu) | (exponent[l] != 0 ? 0x800000u : 0u);
  };
  static_assert(kLanes % kHistogramWays == 0, "element j adds into histogram j % kHistogramWays");
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) split(j + l, l);
    for (int l = 0; l < kLanes; ++l) partial[l % kHistogramWays][exponent[l]] += significand[l];
  }
  for (int l = 0; j + l < count; ++l) {
    split(j + l, l);
    partial[l % kHistogramWays][exponent[l]] += significand[l];
  }
  for (int bucket = 0; bucket < kBuckets; ++bucket) {
    uint64_t sum = 0;
    for (int way = 0; way < kHistogramWays; ++way) sum += partial[way][bucket];
    if (sum == 0) continue;
    // One unit of the significand of a value with this exponent field: 2^(max(e, 1) - 150).
    const uint64_t unit_exponent = std::max(bucket, 1) - 150 + 1023;
    const double unit = std::bit_cast<double>(unit_exponent << 52);
    // The sum is below 2^63: converted as a signed integer (one instruction).
    buckets.mass[bucket] = mass_t(double(static_cast<int64_t>(sum)) * unit);
    buckets.mark(bucket);
  }
}

// The first round of find_head_boundary over the whole row: for every digit d in bits
// [shift, shift + 8) of the keys, the sum of the p_i with that digit, exactly as the mass type adds
// them; the buckets with mass are marked (one without is never chosen in this round).
template <typename acc_t, typename mass_t>
void first_digit_masses(const acc_t* p, int64_t classes, int shift, DigitBuckets<mass_t>& buckets) {
  using key_t = typename SelectTypes<acc_t>::key_t;
  constexpr int kBuckets = DigitBuckets<mass_t>::kCount;
  if constexpr (std::is_same_v<acc_t, float>) {
    static_assert(sizeof(key_t) == 4);
    exponent_masses(classes, [&](int64_t i) { return std::bit_cast<key_t>(p[i]); }, buckets);
  } else {
    // Even and odd classes fill separate histograms, added in a fixed order: half the chain of
    // dependent additions to a crowded bucket.
    mass_t* mass = buckets.mass;
    mass_t odd[kBuckets] = {};
    auto digit_of = [&](int64_t k) {
      return static_cast<int>((std::bit_cast<key_t>(p[k]) >> shift) & (kBuckets - 1));
    };
    int64_t i = 0;
    for (; i + 2 <= classes; i += 2) {
      mass[digit_of(i)] += mass_t(p[i]);
      odd[digit_of(i + 1)] += mass_t(p[i + 1]);
    }
    if (i < classes) mass[digit_of(i)] += mass_t(p[i]);
    for (int digit = 0; digit < kBuckets; ++digit) {
      mass[digit] += odd[digit];
      if (mass[digit] != mass_t(0)) buckets.mark(digit);
    }
  }
}

// SPEC 1.3 without a sort: radix select (8-bit digits, most significant first) for the boundary w,
// the largest probability whose "mass at or above" reaches delta, with mass_above = mass of p > w;
// then tied_head_count (hta_kl_math.h) gives how many of the n_w classes tied at w (taken in
// ascending class index, as a stable sort does) are in the head. `candidates` holds C indices.
//
// exponent_hint (float only; 0 = none) is an exponent field the boundary probably has or exceeds,
// from the previous row of the same thread: the first round then histograms only the classes at
// or above it, usually a small part of a peaked row. Their buckets hold the full round's exact
// masses (the sums are exact, so the subset changes no bit); when the boundary turns out lower,
// the round is redone over the whole row. The result never depends on the hint, which the call
// sets for the next row.
template <typename acc_t>
HeadBoundary<acc_t> find_head_boundary(const acc_t* p, int64_t classes, double delta,
                                       int64_t* candidates, uint32_t& exponent_hint) {
  using key_t = typename SelectTypes<acc_t>::key_t;
  using mass_t = typename SelectTypes<acc_t>::mass_t;
  constexpr int kDigitBits = 8;
  constexpr int kKeyBits = 8 * sizeof(key_t) - 1;  // the sign bit is 0 for p >= 0
  constexpr bool kExponentFirst = std::is_same_v<acc_t, float>;
  DigitBuckets<mass_t> buckets;
  mass_t mass_above = 0;
  key_t prefix = 0;
  int64_t n_candidates = -1;  // < 0: every class is still a candidate
  auto key_of = [&](int64_t i) { return std::bit_cast<key_t>(p[i]); };
  // A first round over the classes at or above the hint (their indices in candidates).
  bool hinted = kExponentFirst && exponent_hint > 0;
  if (hinted) {
    const key_t lowest = key_t(exponent_hint) << (kKeyBits - kDigitBits);
    n_candidates = 0;
    for_each_hit(
        classes, [&](int64_t i) { return key_of(i) >= lowest; },
        [&](int64_t i) { candidates[n_candidates++] = i; });
  }
  for (int remaining = kKeyBits; remaining > 0;) {
    const int width = std::min(kDigitBits, remaining);
    const int shift = remaining - width;
    const key_t digit_mask = (key_t(1) << width) - 1;
    const bool whole_row = n_candidates < 0;
    const bool first_round = remaining == kKeyBits;
    if (whole_row) {
      first_digit_masses(p, classes, shift, buckets);
    } else if (first_round) {
      if constexpr (kExponentFirst) {
        exponent_masses(
            n_candidates, [&](int64_t j) { return key_of(candidates[j]); }, buckets);
      }
    } else {
      for (int64_t j = 0; j < n_candidates; ++j) {
        const int digit = static_cast<int>((key_of(candidates[j]) >> shift) & digit_mask);
        buckets.mark(digit);
        buckets.mass[digit] += mass_t(p[candidates[j]]);
      }
    }
    // The highest digit whose bucket brings the mass at or above it to delta, visiting the marked
    // buckets from the top. running stays below delta, so an empty bucket (mass 0) would not
    // change it: skipping those leaves every sum's bits as they are.
    int chosen = -1, lowest_marked = -1;
    mass_t running = mass_above, above_lowest = mass_above;
    buckets.visit_from_top([&](int digit) {
      lowest_marked = digit;
      if (running + buckets.mass[digit] >= mass_t(delta)) {
        chosen = digit;
        return true;
      }
      above_lowest = running;
      running += buckets.mass[digit];
      return false;
    });
    buckets.clear();
    if (chosen < 0 && first_round && hinted) {  // the boundary lies below the hint
      hinted = false;
      n_candidates = -1;
      continue;
    }
    if (chosen < 0) {
      // The whole row's mass stays below delta: every class is in the head. On a finer digit this
      // only happens through rounding of a bucket that reached delta before: its smallest values
      // are then the boundary.
      if (first_round) {
        exponent_hint = 0;
        return {acc_t(-1), 0};
      }
      chosen = lowest_marked;
      running = above_lowest;
    }
    // One bucket of margin below this row's boundary for the next row.
    if (kExponentFirst && first_round)
      exponent_hint = static_cast<uint32_t>(std::max(chosen, 1) - 1);
    // running is now the mass above the chosen bucket, added bucket by bucket from the top.
    mass_above = running;
    prefix = static_cast<key_t>((prefix << width) | key_t(chosen));
    // Keep the candidates with the chosen digit, in ascending class index.
    int64_t kept = 0;
    if (whole_row) {
      for_each_hit(
          classes, [&](int64_t i) { return (key_of(i) >> shift) == prefix; },
          [&](int64_t i) { candidates[kept++] = i; });
    } else {
      // Branch-free: kept never passes the read position, so the writes stay in bounds.
      for (int64_t j = 0; j < n_candidates; ++j) {
        const int64_t i = candidates[j];
        candidates[kept] = i;
        kept += (key_of(i) >> shift) == prefix;
      }
    }
    n_candidates = kept;
    remaining = shift;
  }
  const acc_t boundary = std::bit_cast<acc_t>(prefix);
  const int64_t tied_in_head =
      tied_head_count<mass_t>(mass_above, mass_t(boundary), n_candidates, mass_t(delta));
  return {boundary, tied_in_head == 0 ? 0 : candidates[tied_in_head - 1] + 1};
}

template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* x, int64_t n) {
  acc_t lane[kLanes];
  std::fill_n(lane, kLanes, -std::numeric_limits<acc_t>::infinity());
  for_each_lane(n, [&](int64_t i, int l) {
    const acc_t v = to_acc(x[i]);
    lane[l] = v > lane[l] ? v : lane[l];
  });
  acc_t result = lane[0];
  for (int l = 1; l < kLanes; ++l) result = lane[l] > result ? lane[l] : result;
  return result;
}

// SPEC 1.1/1.2 for one softmax, given max = row_max(x): shifted[i] = (x_i - max) / tau and e[i] = exp(shifted[i]); returns
// log(sum_i e[i]), summed in double (long double for double) so the probabilities e / sum that
// the head selection adds up carry no systematic error. log softmax = shifted - returned value.
template <typename scalar_t, typename acc_t>
acc_t shifted_exp(const scalar_t* x, int64_t n, acc_t max, acc_t inv_tau, acc_t* shifted,
                  acc_t* e) {
  using mass_t = typename SelectTypes<acc_t>::mass_t;
  using lane_t = std::conditional_t<std::is_same_v<acc_t, float>, double, acc_t>;
  LaneSums<lane_t, 1> sums;
  for_each_lane(n, [&](int64_t i, int l) {
    const acc_t s = (to_acc(x[i]) - max) * inv_tau;
    const acc_t v = exp_nonpositive(s);
    shifted[i] = s;
    e[i] = v;
    sums.lane[0][l] += lane_t(v);
  });
  return acc_t(std::log(mass_t(sums.total(0))));
}

// Scratch for the rows one thread runs, sized for the largest mode. Up to kKeptWorkspaceBytes
// the storage persists per thread across calls: long rows would otherwise pay for fresh pages
// (faults, zeroing) every call. A larger one (C in the millions, or a long T) lives for the call
// only, so that one such call does not pin its scratch on every thread for the process's life.
constexpr size_t kKeptWorkspaceBytes = size_t(32) << 20;

template <typename acc_t>
struct Workspace {
  acc_t *log_p, *p, *log_q, *q, *head;  // [C] each; head: SPEC 1.3 membership as 1 / 0
  acc_t *ratio, *step_max, *step_log_sum;  // [T, C], [T], [T]: prob_mean only
  int64_t* candidates;                     // [C]
  uint32_t exponent_hint = 0;              // find_head_boundary's, from row to row
  std::vector<acc_t> call_values;          // the storage when it is too large to keep
  std::vector<int64_t> call_indices;
  Workspace(int64_t steps, int64_t classes, bool prob_mean) {
    thread_local std::vector<acc_t> kept_values;
    thread_local std::vector<int64_t> kept_indices;
    const int64_t steps_used = prob_mean ? steps : 0;
    const auto value_count = static_cast<size_t>(5 * classes + steps_used * (classes + 2));
    const size_t bytes =
        value_count * sizeof(acc_t) + static_cast<size_t>(classes) * sizeof(int64_t);
    const bool keep = bytes <= kKeptWorkspaceBytes;
    std::vector<acc_t>& values = keep ? kept_values : call_values;
    std::vector<int64_t>& indices = keep ? kept_indices : call_indices;
    if (values.size() < value_count) values.resize(value_count);
    if (indices.size() < static_cast<size_t>(classes)) indices.resize(classes);
    acc_t* next = values.data();
    for (acc_t** buffer : {&log_p, &p, &log_q, &q, &head}) {
      *buffer = next;
      next += classes;
    }
    ratio = next;
    step_max = ratio + steps_used * classes;
    step_log_sum = step_max + steps_used;
    candidates = indices.data();
  }
};

template <typename scalar_t>
struct RowKernel {
  using acc_t = htakl::acc_t<scalar_t>;
  const scalar_t* student;  // [T, R, C]
  const scalar_t* teacher;  // [R, C]
  acc_t* loss;              // [R]
  scalar_t* grad_student;   // [T, R, C] or null
  scalar_t* grad_teacher;   // [R, C] or null
  int64_t steps, rows, classes;
  HtaKlOptions options;

  bool prob_mean() const { return steps > 1 && !options.logit_mean; }

  // SPEC 1.2, prob_mean: log q = logsumexp_t(log q_t) - log T and the ratios q_tk / q_k in
  // [0, T]. Normally q_k = mean_t q_tk and the ratio is a division; where q_k is too small for
  // that to be exact (logits far apart), both come from the max-shifted log form instead.
  void prob_mean_student(int64_t row, Workspace<acc_t>& ws, acc_t inv_tau) const {
    const int64_t C = classes;
    const acc_t inv_steps = acc_t(1) / acc_t(steps);
    acc_t* shifted = ws.log_q;  // scratch until log q is written
    acc_t* q = ws.q;
    std::fill_n(q, C, acc_t(0));
    for (int64_t t = 0; t < steps; ++t) {
      acc_t* q_t = ws.ratio + t * C;
      const scalar_t* z = student + (t * rows + row) * C;
      ws.step_max[t] = row_max<scalar_t, acc_t>(z, C);
      ws.step_log_sum[t] = shifted_exp<scalar_t, acc_t>(z, C, ws.step_max[t], inv_tau, shifted, q_t);
      const acc_t inv_sum = std::exp(-ws.step_log_sum[t]);
      for_each_element(C, [&](int64_t i) {
        q_t[i] *= inv_sum;
        q[i] += q_t[i];
      });
    }
    constexpr acc_t kSmallest = std::is_same_v<acc_t, float> ? acc_t(1e-30) : acc_t(1e-290);
    const acc_t log_steps = std::log(acc_t(steps));
    acc_t* inv_q = ws.head;  // scratch: the head mask is written later
    for_each_element(C, [&](int64_t i) {
      q[i] *= inv_steps;
      inv_q[i] = q[i] >= kSmallest ? acc_t(1) / q[i] : acc_t(0);
    });
    for (int64_t i = 0; i < C; ++i) ws.log_q[i] = std::log(q[i]);
    for (int64_t t = 0; t < steps; ++t)
      for_each_element(C, [&, ratio = ws.ratio + t * C](int64_t i) { ratio[i] *= inv_q[i]; });
    // The rest: q_k tiny, zero or NaN.
    for (int64_t i = 0; i < C; ++i) {
      if (q[i] >= kSmallest) continue;
      if (std::isnan(q[i])) {  // NaN logits: NaN everywhere (log q is NaN already), as in the reference
        for (int64_t t = 0; t < steps; ++t) ws.ratio[t * C + i] = q[i];
        continue;
      }
      // log q_tk = (z_tk - max_t) / tau - log_sum_t; shift by their max M over t.
      acc_t top = -std::numeric_limits<acc_t>::infinity();
      for (int64_t t = 0; t < steps; ++t) {
        const acc_t log_q_t = log_q_step(ws, row, t, i, inv_tau);
        top = log_q_t > top ? log_q_t : top;
      }
      if (top == -std::numeric_limits<acc_t>::infinity()) {  // masked at every step
        ws.q[i] = acc_t(0);
        ws.log_q[i] = top;
        for (int64_t t = 0; t < steps; ++t) ws.ratio[t * C + i] = acc_t(0);
        continue;
      }
      acc_t sum = 0;
      for (int64_t t = 0; t < steps; ++t) {
        const acc_t c = std::exp(log_q_step(ws, row, t, i, inv_tau) - top);
        ws.ratio[t * C + i] = c;
        sum += c;
      }
      ws.log_q[i] = top + std::log(sum) - log_steps;
      ws.q[i] = std::exp(ws.log_q[i]);
      const acc_t scale = acc_t(steps) / sum;
      for (int64_t t = 0; t < steps; ++t) ws.ratio[t * C + i] *= scale;
    }
  }

  // log q_tk = (z_tk - max_t) / tau - log sum_t, as SPEC 1.2's log_softmax(z_t / tau).
  acc_t log_q_step(const Workspace<acc_t>& ws, int64_t row, int64_t t, int64_t i,
                   acc_t inv_tau) const {
    const acc_t z = to_acc(student[(t * rows + row) * classes + i]);
    return (z - ws.step_max[t]) * inv_tau - ws.step_log_sum[t];
  }

  void operator()(int64_t row, Workspace<acc_t>& ws) const {
    const int64_t C = classes;
    const acc_t inv_tau = acc_t(1) / acc_t(options.temperature);
    const acc_t inv_steps = acc_t(1) / acc_t(steps);
    const scalar_t* a = teacher + row * C;

    // ---- Pass 1 (docs/ARCHITECTURE.md): softmax statistics. ----
    // SPEC 1.1: log p = shifted - log_sum_p, p = e / sum.
    const acc_t log_sum_p = shifted_exp<scalar_t, acc_t>(a, C, row_max<scalar_t, acc_t>(a, C),
                                                         inv_tau, ws.log_p, ws.p);
    const acc_t inv_sum_p = std::exp(-log_sum_p);
    for_each_element(C, [&, p = ws.p, log_p = ws.log_p](int64_t i) {
      p[i] *= inv_sum_p;
      log_p[i] -= log_sum_p;
    });

    // SPEC 1.2: q and log q. A single softmax (2-D, logit_mean) leaves its exponentials and
    // shifted logits in q and log q, and pass 3 normalises them as it reads them, one sweep less;
    // prob_mean writes them final (then scaling by 1 and subtracting 0 change no bit).
    acc_t inv_sum_q = 1, log_sum_q = 0;
    if (prob_mean()) {
      prob_mean_student(row, ws, inv_tau);
    } else {
      if (steps == 1) {
        const scalar_t* z = student + row * C;
        log_sum_q = shifted_exp<scalar_t, acc_t>(z, C, row_max<scalar_t, acc_t>(z, C), inv_tau,
                                                 ws.log_q, ws.q);
      } else {  // logit_mean: softmax of the mean logits (the mean goes to the ratio-free q buffer)
        acc_t* mean = ws.q;
        std::fill_n(mean, C, acc_t(0));
        for (int64_t t = 0; t < steps; ++t) {
          const scalar_t* z = student + (t * rows + row) * C;
          for (int64_t i = 0; i < C; ++i) mean[i] += to_acc(z[i]);
        }
        for (int64_t i = 0; i < C; ++i) mean[i] /= acc_t(steps);
        log_sum_q = shifted_exp<acc_t, acc_t>(mean, C, row_max<acc_t, acc_t>(mean, C), inv_tau,
                                              ws.log_q, ws.q);
      }
      inv_sum_q = std::exp(-log_sum_q);
    }

    // ---- Pass 2: head selection. ----
    // SPEC 1.3. A NaN teacher row (NaN everywhere) skips the selection: its loss is NaN anyway.
    const acc_t* p = ws.p;
    const acc_t* log_p = ws.log_p;
    const HeadBoundary<acc_t> boundary =
        std::isnan(log_sum_p)
            ? HeadBoundary<acc_t>{std::numeric_limits<acc_t>::infinity(), 0}
            : find_head_boundary<acc_t>(p, C, options.delta, ws.candidates, ws.exponent_hint);

    // ---- Pass 3: row sums. ----
    // SPEC 1.4-1.6 and the signed sums of SPEC 2's sum_j q_j dl_j and sum_j p_j dl_j. The sweep
    // also finishes q and log q and writes the head mask for pass 4.
    enum { kHeadDistance, kTailDistance, kFkl, kRkl, kQHead, kQTail, kPHead, kPTail, kStats };
    LaneSums<acc_t, kStats> sums;
    for_each_lane(C, [&, q = ws.q, log_q = ws.log_q, head = ws.head](int64_t i, int l) {
      q[i] *= inv_sum_q;
      log_q[i] -= log_sum_q;
      head[i] = boundary.mask(p[i], i);
      // Head / tail split by multiplying with the 0 / 1 mask: x - mask * x is exactly x or 0.
      const acc_t distance = std::abs(p[i] - q[i]);
      const acc_t sign = sign_of_difference(q[i], p[i]);
      const acc_t head_distance = head[i] * distance;
      const acc_t signed_q = q[i] * sign, head_signed_q = head[i] * signed_q;
      const acc_t signed_p = p[i] * sign, head_signed_p = head[i] * signed_p;
      sums.lane[kHeadDistance][l] += head_distance;
      sums.lane[kTailDistance][l] += distance - head_distance;
      sums.lane[kFkl][l] += fkl_term(p[i], log_p[i], log_q[i]);
      sums.lane[kRkl][l] += rkl_term(q[i], log_q[i], log_p[i]);
      sums.lane[kQHead][l] += head_signed_q;
      sums.lane[kQTail][l] += signed_q - head_signed_q;
      sums.lane[kPHead][l] += head_signed_p;
      sums.lane[kPTail][l] += signed_p - head_signed_p;
    });
    const RowStats<acc_t> st =
        make_row_stats(sums.total(kHeadDistance), sums.total(kTailDistance), sums.total(kFkl),
                       sums.total(kRkl), options.detach_weights, inv_tau,
                       acc_t(options.row_scale));
    loss[row] = row_loss(st);
    const acc_t* q = ws.q;
    const acc_t* log_q = ws.log_q;
    const acc_t* head = ws.head;
    auto dl_of = [&](int64_t i) {
      return dlam_h_dq(st, sign_of_difference(q[i], p[i]), head[i] != acc_t(0));
    };

    // ---- Pass 4: gradients. ----
    // SPEC 2, teacher.
    if (grad_teacher != nullptr) {
      const acc_t sum_p_dl = weighted_dl_sum(st, sums.total(kPHead), sums.total(kPTail));
      scalar_t* out = grad_teacher + row * C;
      for_each_element(C, [&](int64_t i) {
        out[i] = from_acc<scalar_t>(
            htakl::grad_teacher(st, p[i], log_p[i], q[i], log_q[i], dl_of(i), sum_p_dl));
      });
    }
    if (grad_student == nullptr) return;

    // SPEC 2, student: one softmax (2-D), or logit_mean (divided by T, broadcast over t).
    if (!prob_mean()) {
      const acc_t sum_q_dl = weighted_dl_sum(st, sums.total(kQHead), sums.total(kQTail));
      const acc_t scale = steps == 1 ? acc_t(1) : inv_steps;
      scalar_t* out0 = grad_student + row * C;
      for_each_element(C, [&](int64_t i) {
        out0[i] = from_acc<scalar_t>(scale * grad_student_softmax(st, p[i], log_p[i], q[i], log_q[i],
                                                                   dl_of(i), sum_q_dl));
      });
      for (int64_t t = 1; t < steps; ++t)
        std::copy_n(out0, C, grad_student + (t * rows + row) * C);
      return;
    }

    // SPEC 2, student, prob_mean: per step t, G_t = sum_j q_tj g_j from four class sums, then
    // dL/dz_tk = (q_tk g_k - q_tk G_t) / (T tau), with q_tk = ratio_tk * q_k.
    for (int64_t t = 0; t < steps; ++t) {
      const acc_t* ratio = ws.ratio + t * C;
      enum { kPRatio, kLogRatio, kQtHead, kQtTail, kStepStats };
      LaneSums<acc_t, kStepStats> step;
      for_each_lane(C, [&](int64_t i, int l) {
        const acc_t q_t = ratio[i] * q[i];
        const acc_t signed_q_t = q_t * sign_of_difference(q[i], p[i]);
        const acc_t head_signed_q_t = head[i] * signed_q_t;
        step.lane[kPRatio][l] += p[i] * ratio[i];
        step.lane[kLogRatio][l] += q_t_log_ratio(q_t, log_q[i], log_p[i]);
        step.lane[kQtHead][l] += head_signed_q_t;
        step.lane[kQtTail][l] += signed_q_t - head_signed_q_t;
      });
      const acc_t g_sum = time_step_g_sum(st, step.total(kPRatio), step.total(kLogRatio),
                                          step.total(kQtHead), step.total(kQtTail));
      scalar_t* out = grad_student + (t * rows + row) * C;
      for_each_element(C, [&](int64_t i) {
        const acc_t q_t = ratio[i] * q[i];
        const acc_t q_t_g = q_t_times_g(st, p[i], ratio[i], q_t,
                                        q_t_log_ratio(q_t, log_q[i], log_p[i]), dl_of(i));
        out[i] = from_acc<scalar_t>(grad_student_prob_mean(st, q_t_g, q_t, g_sum, inv_steps));
      });
    }
  }
};

// Runs every row of one call: rows in parallel, one workspace per task.
template <typename scalar_t>
void run_rows(const RowKernel<scalar_t>& kernel) {
  using acc_t = htakl::acc_t<scalar_t>;
  // Enough rows per task to amortise the workspace (about 64k elements of work).
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 16) / (kernel.classes * (kernel.steps + 1)));
  at::parallel_for(0, kernel.rows, grain, [&](int64_t begin, int64_t end) {
    Workspace<acc_t> workspace(kernel.steps, kernel.classes, kernel.prob_mean());
    for (int64_t row = begin; row < end; ++row) kernel(row, workspace);
  });
}
