// CPU kernel of the ByTheWay attention-map op (docs/DESIGN.md sections 1-2).
//
// Schema split: the public op `torch.ops.bytheway.attention_probs` is declared once, in Python
// (bytheway_kernels/ops/attention_probs/op.py, torch.library.custom_op), and that declaration is the only source of
// truth for its schema. This extension is a Python module with one function, `attention_probs`
// (pybind11: a call costs ~0.4 us of binding, against ~4 us through a torch.ops dispatcher entry),
// which writes into the outputs it is given or allocates the probs itself; the Python op's CPU
// branch (bytheway_kernels/ops/attention_probs/cpp.py) calls it.
// Argument validation (ValueErrors naming the argument) happens in Python before this runs; the
// checks here only guard memory safety.
//
// Per row of a (F x F) map: softmax -> blend with the upsampled guide row (A2; a row whose
// guided sum is <= 0 or not finite keeps A) -> high band A2 @ P with P the real circulant matrix
// of the band, given by Python (bytheway_kernels/band.py) -> A3 = A2 + (beta - 1) A2 P -> divide
// by rowsum(A2) (= rowsum(A3): DC is outside the band) -> store in the scores' dtype (float16
// saturates). Accumulation is in float (double for double input).
// Adaptive beta needs global sums first, so it runs a pass over the entries in scope (which, for
// float32/float64 outputs, also leaves A2 / rowsum(A2) in the output to finish in place) and then
// the pass that writes the rest; fixed beta is a single pass (which also gathers the stats if asked).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bytheway_cpu {
namespace {

// The per-map steps below are separate functions for reading; forcing them inline keeps the
// code the compiler sees (and its alias analysis across steps) that of one loop body.
#define BYTHEWAY_INLINE inline __attribute__((always_inline))

// Maps per unit of parallel work. Stats partial sums are kept per block and reduced in block
// order, so the result does not depend on the number of threads.
constexpr int64_t kBlockMaps = 64;
// How many maps ahead the scores are prefetched.
constexpr int64_t kPrefetchMaps = 2;

inline void prefetch_bytes(const void* data, int64_t bytes) {
  constexpr int64_t kCacheLine = 64;
  const char* begin = static_cast<const char*>(data);
  for (int64_t byte = 0; byte < bytes; byte += kCacheLine) {
    __builtin_prefetch(begin + byte);
  }
}

// Asks Linux for transparent huge pages on the 2 MiB-aligned interior of an output that has not
// been written yet. Outputs above glibc's mmap threshold (32 MiB at most) are fresh mappings on
// every call, and faulting them in 4 KiB pages costs more than the kernel itself (~0.4 ms per MiB
// here, against ~0.1 ms with 2 MiB pages). Advice only: where THP is off ("never") or the call
// fails, nothing changes. Small outputs are skipped (their memory is usually reused, and the
// call would cost more than it saves).
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr int64_t kSmallest = 8 * int64_t(kHugePage);
  if (bytes < kSmallest) {
    return;
  }
  const uintptr_t address = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (address + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (address + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

template <typename scalar_t>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};

// exp(x) for x <= 0 (a logit minus its row max), branch-free so that row loops vectorise
// (std::exp is a library call that blocks vectorisation). x = n ln2 + r with |r| <= ln2 / 2,
// then a degree-6 polynomial fitted for relative error on that interval (1.9e-9 in exact
// arithmetic, ~1.3 ulp as evaluated in float; softmax outputs match torch.softmax's error), and
// 2^n added into the exponent bits (one integer add instead of building 2^n and multiplying).
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693145751953125f;  // ln 2 split so that n * kLn2High is exact
  constexpr float kLn2Low = 1.42860682030941723e-6f;
  constexpr float kRoundToInteger = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLowest = -87.0f;               // exp(-87) is still a normal float
  constexpr float c1 = 1.0f, c2 = 4.999999106e-01f, c3 = 1.666641682e-01f, c4 = 4.166824371e-02f,
                  c5 = 8.375054225e-03f, c6 = 1.383654308e-03f;
  const float clamped = x < kLowest ? kLowest : x;
  const float shifted = clamped * kLog2e + kRoundToInteger;  // n sits in the low mantissa bits
  const float n = shifted - kRoundToInteger;
  const float r = (clamped - n * kLn2High) - n * kLn2Low;
  float poly = c6;
  poly = poly * r + c5;
  poly = poly * r + c4;
  poly = poly * r + c3;
  poly = poly * r + c2;
  poly = poly * r + c1;
  poly = poly * r + 1.0f;
  uint32_t poly_bits, shifted_bits;
  std::memcpy(&poly_bits, &poly, sizeof(poly));
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted));
  // poly * 2^n, exact: the result stays a normal float for x >= kLowest.
  const uint32_t bits = poly_bits + (shifted_bits << 23);
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return x < kLowest ? 0.0f : result;
}

inline double exp_nonpositive(double x) {
  return std::exp(x);
}

// Row reductions with a fixed pairwise order: 16 partial lanes, then a halving tree. Without
// -ffast-math the compiler keeps `for (j) s += v[j]` as a serial chain of scalar adds; written
// this way the lanes and the tree steps are vector operations, and the order (hence the result)
// never depends on the thread count. The lanes start as copies of the first values, not as
// zeros: 0 + x cannot be folded to x (signed zeros), which would keep the adds scalar.
constexpr int kReductionLanes = 16;  // the tree steps below are written out for 16

template <typename acc_t, typename value_t, typename Combine>
BYTHEWAY_INLINE acc_t reduce_row(const value_t* values, int64_t n, acc_t identity, Combine combine) {
  acc_t lanes[kReductionLanes];
  for (int l = 0; l < kReductionLanes; ++l) {
    lanes[l] = l < n ? static_cast<acc_t>(values[l]) : identity;
  }
  for (int64_t j = kReductionLanes; j < n; j += kReductionLanes) {
    for (int l = 0; l < kReductionLanes && j + l < n; ++l) {
      lanes[l] = combine(lanes[l], static_cast<acc_t>(values[j + l]));
    }
  }
  for (int l = 0; l < 8; ++l) lanes[l] = combine(lanes[l], lanes[l + 8]);
  for (int l = 0; l < 4; ++l) lanes[l] = combine(lanes[l], lanes[l + 4]);
  for (int l = 0; l < 2; ++l) lanes[l] = combine(lanes[l], lanes[l + 2]);
  return combine(lanes[0], lanes[1]);
}

template <typename acc_t>
BYTHEWAY_INLINE acc_t row_sum(const acc_t* values, int64_t n) {
  return reduce_row(values, n, acc_t(0), [](acc_t a, acc_t b) { return a + b; });
}

template <typename acc_t, typename value_t>
inline acc_t row_max(const value_t* values, int64_t n) {
  return reduce_row(values, n, -std::numeric_limits<acc_t>::infinity(),
                    [](acc_t a, acc_t b) { return b > a ? b : a; });
}

// Source indices and weights of one spatial axis of the guide upsampling, with the index rules
// of torch.nn.functional.interpolate (nearest: float arithmetic; bilinear, align_corners=False:
// arithmetic in the accumulation type, as torch does in its op-math type).
template <typename acc_t>
struct AxisTaps {
  std::vector<int64_t> first, second;
  std::vector<acc_t> first_weight, second_weight;

  AxisTaps(int64_t in_size, int64_t out_size, bool bilinear)
      : first(out_size), second(out_size), first_weight(out_size), second_weight(out_size) {
    for (int64_t dst = 0; dst < out_size; ++dst) {
      if (!bilinear) {
        const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
        const int64_t src = static_cast<int64_t>(std::floor(static_cast<float>(dst) * scale));
        first[dst] = second[dst] = std::min(src, in_size - 1);
        first_weight[dst] = acc_t(1);
        second_weight[dst] = acc_t(0);
        continue;
      }
      const acc_t scale = static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
      const acc_t src = std::max(scale * (static_cast<acc_t>(dst) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
      const int64_t index = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
      const acc_t lambda = std::min(std::max(src - static_cast<acc_t>(index), acc_t(0)), acc_t(1));
      first[dst] = index;
      second[dst] = index + (index < in_size - 1 ? 1 : 0);
      first_weight[dst] = acc_t(1) - lambda;
      second_weight[dst] = lambda;
    }
  }
};

// The folded band product (`folded_band_product`, F divisible by 4) splits each row into kParts
// parts of F/4 values, one per sign pair of the reversal s -> F-1-s and the half shift s -> s+F/2.
constexpr int kParts = 4;

// Frame counts that take the folded product when F is a compile-time constant. Below 24 it
// measured no faster than `band_product` (F = 16: equal; F = 8: 2.5x slower, parts of 2 values).
constexpr bool folds_band_product(int64_t frames) {
  return frames >= 24 && frames % 4 == 0;
}

// Lanes per part: F/4 rounded up to a power of two, so that each part is whole vectors.
constexpr int64_t folded_lanes(int64_t frames) {
  int64_t lanes = 1;
  while (lanes < frames / 4) lanes *= 2;
  return lanes;
}

// P's blocks for `folded_band_product`, from P in double (row-major F x F, F divisible by 4):
// for q < F/4 and part (sign_r, sign_t) = (+,+), (-,+), (+,-), (-,-), the row (q * kParts + part)
// of `folded_lanes(F)` values holds (P[q][j] + sign_r P[F-1-q][j] + sign_t P[q+F/2][j]
// + sign_r sign_t P[F/2-1-q][j]) / 4 for j < F/4, then zeros.
template <typename acc_t>
std::vector<acc_t> fold_band_matrix(const double* p, int64_t frames) {
  const int64_t half = frames / 2;
  const int64_t quarter = frames / 4;
  const int64_t lanes = folded_lanes(frames);
  std::vector<acc_t> folded(quarter * kParts * lanes, acc_t(0));
  for (int64_t q = 0; q < quarter; ++q) {
    const double* rows[kParts] = {p + q * frames, p + (frames - 1 - q) * frames, p + (q + half) * frames,
                                  p + (half - 1 - q) * frames};
    for (int part = 0; part < kParts; ++part) {
      const double sign_r = part & 1 ? -1.0 : 1.0;
      const double sign_t = part & 2 ? -1.0 : 1.0;
      for (int64_t j = 0; j < quarter; ++j) {
        const double value = rows[0][j] + sign_r * rows[1][j] + sign_t * rows[2][j] + sign_r * sign_t * rows[3][j];
        folded[(q * kParts + part) * lanes + j] = static_cast<acc_t>(0.25 * value);
      }
    }
  }
  return folded;
}

// Everything about one call that does not depend on the row.
template <typename acc_t>
struct Plan {
  int64_t batch, height, width, heads, frames;
  int64_t maps_per_entry;  // height * width * heads
  int64_t guide_height, guide_width;
  bool has_guide, bilinear;
  bool full_band;  // band = every k != 0, so A2 P = A2 - rowsum(A2) / F (bytheway_kernels/band.py)
  acc_t alpha;
  std::vector<acc_t> circulant;  // P, row-major F x F, from bytheway_kernels/band.py (empty when full_band)
  std::vector<acc_t> folded;     // P's blocks for `folded_band_product` (empty unless folds_band_product(F))
  AxisTaps<acc_t> taps_y, taps_x;

  Plan(const at::Tensor& scores, const at::Tensor* guide, const at::Tensor& band_matrix, bool full_band_,
       double alpha_, bool bilinear_)
      : batch(scores.size(0)),
        height(scores.size(1)),
        width(scores.size(2)),
        heads(scores.size(3)),
        frames(scores.size(4)),
        maps_per_entry(height * width * heads),
        guide_height(guide ? guide->size(1) : height),
        guide_width(guide ? guide->size(2) : width),
        has_guide(guide != nullptr),
        bilinear(bilinear_),
        full_band(full_band_),
        alpha(static_cast<acc_t>(alpha_)),
        taps_y(guide_height, height, bilinear_),
        taps_x(guide_width, width, bilinear_) {
    if (!full_band) {
      const at::Tensor p = band_matrix.to(at::kDouble).contiguous();
      const double* values = p.data_ptr<double>();
      circulant.assign(values, values + frames * frames);
      if (folds_band_product(frames)) {
        folded = fold_band_matrix<acc_t>(values, frames);
      }
    }
  }
};

// Per-row sums the adaptive beta and the stats need, accumulated over the rows in scope.
// E3 is the energy of A3 after the division by its row sum t = rowsum(A2) (DC is outside the
// band), and t is not 1 when guide rows are not exactly stochastic (e.g. rounded to bf16), so E3
// needs ||A2||^2, <A2, A2 P> and ||A2 P||^2 weighted per row by 1 / t^2.
struct EnergySums {
  double softmax_sq = 0;       // S1 = sum ||A||^2
  double guided_sq = 0;        // S2 = sum ||A2||^2
  double guided_dot_high = 0;  // S2h = sum <A2, A2 P>
  double guided_sq_normalised = 0;        // sum ||A2||^2 / t^2
  double guided_dot_high_normalised = 0;  // sum <A2, A2 P> / t^2
  double high_sq_normalised = 0;          // sum ||A2 P||^2 / t^2 (differs from S2h when P is no projector)

  void add(const EnergySums& other) {
    softmax_sq += other.softmax_sq;
    guided_sq += other.guided_sq;
    guided_dot_high += other.guided_dot_high;
    guided_sq_normalised += other.guided_sq_normalised;
    guided_dot_high_normalised += other.guided_dot_high_normalised;
    high_sq_normalised += other.high_sq_normalised;
  }
};

// Scratch storage of kSize values: a fixed-size array when the size is a compile-time constant
// (the compiler then unrolls the loops over it), else heap storage of a runtime size.
template <typename T, int kSize>
struct Scratch {
  alignas(64) std::array<T, kSize> values;  // cache-line aligned, also inside a struct
  explicit Scratch(int64_t) {}
  T* data() { return values.data(); }
  const T* data() const { return values.data(); }
};
template <typename T>
struct Scratch<T, 0> {
  std::vector<T> values;
  explicit Scratch(int64_t size) : values(size) {}
  T* data() { return values.data(); }
  const T* data() const { return values.data(); }
};

// The six energy sums of EnergySums kept per column j, so rows add to them with vertical
// (elementwise) operations: one horizontal reduction per block instead of several per row.
constexpr int kEnergySums = 6;

template <typename T, int kFrames>
struct EnergyLanes {
  Scratch<T, kEnergySums * kFrames> lanes;
  const int64_t frames;
  explicit EnergyLanes(int64_t frames_) : lanes(kEnergySums * frames_), frames(frames_) { clear(); }
  T* lane(int k) { return lanes.data() + k * frames; }
  void clear() { std::fill(lanes.data(), lanes.data() + kEnergySums * frames, T(0)); }
  template <typename U>
  void add_to(EnergyLanes<U, kFrames>& total) const {
    const T* from = lanes.data();
    U* to = total.lanes.data();
#pragma omp simd
    for (int64_t j = 0; j < kEnergySums * frames; ++j) {
      to[j] += static_cast<U>(from[j]);
    }
  }
  EnergySums sum() const {
    double s[kEnergySums];
    for (int k = 0; k < kEnergySums; ++k) {
      s[k] = 0;
      for (int64_t j = 0; j < frames; ++j) {
        s[k] += static_cast<double>(lanes.data()[k * frames + j]);
      }
    }
    return EnergySums{s[0], s[1], s[2], s[3], s[4], s[5]};
  }
};

// Rows of one F x F map multiplied by P together: a divisor of F with rows x F <= 128 values, so
// the block's partial products fit in vector registers and stay there while each row of P is
// loaded once per block instead of once per row.
template <int kFrames>
constexpr int band_row_block() {
  static_assert(kFrames > 0, "a compile-time frame count");
  int rows = std::max(128 / kFrames, 1);
  while (kFrames % rows != 0) --rows;
  return rows;
}

// high = guided @ circulant for one F x F map (row-major).
template <typename acc_t, int kFrames>
inline void band_product(const acc_t* __restrict__ guided, const acc_t* __restrict__ circulant,
                         acc_t* __restrict__ high, int64_t frames) {
  if constexpr (kFrames > 0) {
    constexpr int kRows = band_row_block<kFrames>();
    for (int i = 0; i < kFrames; i += kRows) {
      acc_t block[kRows][kFrames];
      for (int r = 0; r < kRows; ++r) {
        const acc_t a = guided[(i + r) * kFrames];
#pragma omp simd
        for (int j = 0; j < kFrames; ++j) {
          block[r][j] = a * circulant[j];
        }
      }
      for (int s = 1; s < kFrames; ++s) {
        const acc_t* p_row = circulant + s * kFrames;
        for (int r = 0; r < kRows; ++r) {
          const acc_t a = guided[(i + r) * kFrames + s];
#pragma omp simd
          for (int j = 0; j < kFrames; ++j) {
            block[r][j] += a * p_row[j];
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
#pragma omp simd
        for (int j = 0; j < kFrames; ++j) {
          high[(i + r) * kFrames + j] = block[r][j];
        }
      }
    }
  } else {
    const int64_t F = frames;
    for (int64_t i = 0; i < F; ++i) {
      acc_t* high_row = high + i * F;
      // Starts from the s = 0 term rather than zeros (a zero fill in narrower stores than the
      // accumulating loads stalls store forwarding).
      const acc_t first = guided[i * F];
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        high_row[j] = first * circulant[j];
      }
      for (int64_t s = 1; s < F; ++s) {
        const acc_t a = guided[i * F + s];
        const acc_t* p_row = circulant + s * F;
#pragma omp simd
        for (int64_t j = 0; j < F; ++j) {
          high_row[j] += a * p_row[j];
        }
      }
    }
  }
}

// high = guided @ P for one F x F map at a compile-time F divisible by 4, with a quarter of the
// multiply-adds of `band_product`. The reversal R: s -> F-1-s and the half shift T: s -> s+F/2
// commute with each other and with P (a symmetric circulant: P[s][j] = c[j-s] with c even), so a
// row splits into parts of sign (sign_r, sign_t) under (R, T) that P maps to parts of the same signs.
// A part is known from its F/4 values at q < F/4: a[q] + sign_r a[F-1-q] + sign_t a[q+F/2]
// + sign_r sign_t a[F/2-1-q], times 1/4 (folded into the blocks). Its image is those values times
// the part's (F/4 x F/4) block of `fold_band_matrix`, and (a P) at j, F-1-j, j+F/2 and F/2-1-j
// (j < F/4) is the sum of the four images with the signs of R, T and RT at that index.
template <typename acc_t, int kFrames>
inline void folded_band_product(const acc_t* __restrict__ guided, const acc_t* __restrict__ folded,
                                acc_t* __restrict__ high) {
  static_assert(kFrames > 0 && kFrames % 4 == 0, "a compile-time frame count divisible by 4");
  constexpr int kHalf = kFrames / 2;
  constexpr int kQuarter = kFrames / 4;
  constexpr int kLanes = static_cast<int>(folded_lanes(kFrames));
  // Parts are formed over whole vectors of kLanes values (F = 24: 8 for 6); the extra ones, never
  // used, read values inside the row (q < kLanes <= F/2 keeps all four indices in [0, F)).
  static_assert(kLanes <= kHalf, "folding padding lanes stays inside the row");
  constexpr int kRows = 4;  // rows x parts x lanes partial products stay in vector registers (measured best)
  for (int i = 0; i < kFrames; i += kRows) {
    acc_t parts[kRows][kParts][kLanes];
    for (int r = 0; r < kRows; ++r) {
      const acc_t* row = guided + (i + r) * kFrames;
#pragma omp simd
      for (int q = 0; q < kLanes; ++q) {
        const acc_t shift_even = row[q] + row[q + kHalf];
        const acc_t shift_odd = row[q] - row[q + kHalf];
        const acc_t mirror_even = row[kFrames - 1 - q] + row[kHalf - 1 - q];
        const acc_t mirror_odd = row[kFrames - 1 - q] - row[kHalf - 1 - q];
        parts[r][0][q] = shift_even + mirror_even;
        parts[r][1][q] = shift_even - mirror_even;
        parts[r][2][q] = shift_odd + mirror_odd;
        parts[r][3][q] = shift_odd - mirror_odd;
      }
    }
    acc_t images[kRows][kParts][kLanes];
    for (int r = 0; r < kRows; ++r) {
      for (int part = 0; part < kParts; ++part) {
        const acc_t x = parts[r][part][0];
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          images[r][part][j] = x * folded[part * kLanes + j];
        }
      }
    }
    for (int q = 1; q < kQuarter; ++q) {
      const acc_t* block_rows = folded + q * kParts * kLanes;
      for (int r = 0; r < kRows; ++r) {
        for (int part = 0; part < kParts; ++part) {
          const acc_t x = parts[r][part][q];
#pragma omp simd
          for (int j = 0; j < kLanes; ++j) {
            images[r][part][j] += x * block_rows[part * kLanes + j];
          }
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      acc_t* row = high + (i + r) * kFrames;
#pragma omp simd
      for (int j = 0; j < kQuarter; ++j) {
        const acc_t mirror_even = images[r][0][j] + images[r][2][j];  // sign_r = +
        const acc_t mirror_odd = images[r][1][j] + images[r][3][j];   // sign_r = -
        const acc_t shift_even = images[r][0][j] - images[r][2][j];   // sign_r = +, times sign_t
        const acc_t shift_odd = images[r][1][j] - images[r][3][j];    // sign_r = -, times sign_t
        row[j] = mirror_even + mirror_odd;
        row[kFrames - 1 - j] = mirror_even - mirror_odd;
        row[j + kHalf] = shift_even + shift_odd;
        row[kHalf - 1 - j] = shift_even - shift_odd;
      }
    }
  }
}

// high = guided @ P for one map of the plan's F: `folded_band_product` at a compile-time F that
// `folds_band_product`, else `band_product`.
template <typename acc_t, int kFrames>
BYTHEWAY_INLINE void plan_band_product(const Plan<acc_t>& plan, const acc_t* __restrict__ guided,
                                       acc_t* __restrict__ high) {
  if constexpr (kFrames > 0 && folds_band_product(kFrames)) {
    folded_band_product<acc_t, kFrames>(guided, plan.folded.data(), high);
  } else {
    band_product<acc_t, kFrames>(guided, plan.circulant.data(), high, plan.frames);
  }
}

// The steps of one F x F map, in order. Each runs over all F rows of the map before the next
// starts: the rows' horizontal reductions are independent, so they overlap instead of forming one
// long dependency chain. The buffers are separate locals of `process_maps` passed as __restrict__
// parameters: GCC honours restrict on parameters, and its alias analysis does not tell apart the
// fields of one struct, so scratch kept in a struct costs the vectoriser ~25% at F = 16.

// softmax numerators exp(s - max), their row sums and 1 / the sums. Reductions get loops of their own
// instead of being fused into the elementwise loops: the compiler then emits vector code for
// them, and the F rows' reductions overlap. The logits are read in place.
template <typename scalar_t, typename acc_t>
BYTHEWAY_INLINE void softmax_numerators(const scalar_t* __restrict__ logits, int64_t rows, int64_t F,
                                        acc_t* __restrict__ numerators, acc_t* __restrict__ row_maxima,
                                        acc_t* __restrict__ row_denominator, acc_t* __restrict__ row_inv_denominator) {
  for (int64_t i = 0; i < rows; ++i) {
    row_maxima[i] = row_max<acc_t>(logits + i * F, F);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t m = row_maxima[i];
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      numerators[i * F + j] = exp_nonpositive(static_cast<acc_t>(logits[i * F + j]) - m);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    row_denominator[i] = row_sum(numerators + i * F, F);
  }
  for (int64_t i = 0; i < rows; ++i) {
    row_inv_denominator[i] = acc_t(1) / row_denominator[i];
  }
}

// Without a guide: A = numerators / row sum, in place; A2 is A itself (the caller reads the same
// buffer for both), with row sums 1.
template <typename acc_t>
BYTHEWAY_INLINE void normalise_without_guide(int64_t rows, int64_t F, const acc_t* __restrict__ row_inv_denominator,
                                             acc_t* __restrict__ softmax, acc_t* __restrict__ row_guided_sum) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t inv_denominator = row_inv_denominator[i];
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      softmax[i * F + j] *= inv_denominator;
    }
    row_guided_sum[i] = acc_t(1);
  }
}

// The guide maps and weights of one output position: 1 map (nearest) or 4 (bilinear, w_yx).
template <typename acc_t, typename guide_t>
struct GuideTaps {
  const guide_t* u00;
  const guide_t* u01;
  const guide_t* u10;
  const guide_t* u11;
  acc_t w00, w01, w10, w11;

  GuideTaps(const Plan<acc_t>& plan, const guide_t* guide, int64_t entry, int64_t y, int64_t x, int64_t head) {
    const auto& ty = plan.taps_y;
    const auto& tx = plan.taps_x;
    const int64_t map_size = plan.frames * plan.frames;
    auto guide_map = [&](int64_t gy, int64_t gx) {
      return guide + (((entry * plan.guide_height + gy) * plan.guide_width + gx) * plan.heads + head) * map_size;
    };
    u00 = guide_map(ty.first[y], tx.first[x]);
    u01 = guide_map(ty.first[y], tx.second[x]);
    u10 = guide_map(ty.second[y], tx.first[x]);
    u11 = guide_map(ty.second[y], tx.second[x]);
    w00 = ty.first_weight[y] * tx.first_weight[x];
    w01 = ty.first_weight[y] * tx.second_weight[x];
    w10 = ty.second_weight[y] * tx.first_weight[x];
    w11 = ty.second_weight[y] * tx.second_weight[x];
  }

  // The taps of map `map` (row-major over H, W, heads) of batch entry `entry`.
  static GuideTaps of_map(const Plan<acc_t>& plan, const guide_t* guide, int64_t entry, int64_t map) {
    const int64_t head = map % plan.heads;
    const int64_t x = (map / plan.heads) % plan.width;
    const int64_t y = map / (plan.heads * plan.width);
    return GuideTaps(plan, guide, entry, y, x, head);
  }

  void prefetch(int64_t bytes) const {
    prefetch_bytes(u00, bytes);
    if (w01 != acc_t(0) || w10 != acc_t(0) || w11 != acc_t(0)) {
      prefetch_bytes(u01, bytes);
      prefetch_bytes(u10, bytes);
      prefetch_bytes(u11, bytes);
    }
  }
};

// A2 = (1 - alpha) A + alpha U for the F rows of one map, A = numerators / row sum (exact at
// alpha = 1, as in every backend: bytheway_kernels/ops/attention_probs/reference.py, guided_map).
// With `keep_softmax` (the energies need A) A is also stored, in place of the numerators;
// without, the numerators stay and A2 = (1 - alpha) / rowsum * numerators + alpha U, one store
// and one operation less per element.
template <typename acc_t, typename guide_t>
BYTHEWAY_INLINE void normalise_and_blend(int64_t F, const Plan<acc_t>& plan, const GuideTaps<acc_t, guide_t>& taps,
                                         bool keep_softmax, const acc_t* __restrict__ row_inv_denominator,
                                         acc_t* __restrict__ softmax, acc_t* __restrict__ guided) {
  const acc_t alpha = plan.alpha;
  const guide_t* __restrict__ u00 = taps.u00;
  const guide_t* __restrict__ u01 = taps.u01;
  const guide_t* __restrict__ u10 = taps.u10;
  const guide_t* __restrict__ u11 = taps.u11;
  // The upsampled guide U at element k of the map.
  auto upsampled = [&](int64_t k) {
    if (!plan.bilinear) {
      return static_cast<acc_t>(u00[k]);
    }
    return taps.w00 * static_cast<acc_t>(u00[k]) + taps.w01 * static_cast<acc_t>(u01[k]) +
        taps.w10 * static_cast<acc_t>(u10[k]) + taps.w11 * static_cast<acc_t>(u11[k]);
  };
  for (int64_t i = 0; i < F; ++i) {
    const acc_t inv_denominator = row_inv_denominator[i];
    const acc_t softmax_weight = (acc_t(1) - alpha) * inv_denominator;
    if (keep_softmax) {
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        const int64_t k = i * F + j;
        const acc_t a = softmax[k] * inv_denominator;
        softmax[k] = a;
        guided[k] = (acc_t(1) - alpha) * a + alpha * upsampled(k);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        const int64_t k = i * F + j;
        guided[k] = softmax[k] * softmax_weight + alpha * upsampled(k);
      }
    }
  }
}

// rowsum(A2) for `rows` rows. A row whose guided sum is <= 0 or not finite (e.g. an all-zero guide
// row with alpha = 1) keeps A2 = A: the op's rule. `softmax` holds A, or the numerators when
// `row_inv_denominator` is given (then A = numerators * row_inv_denominator, as stored above).
template <typename acc_t>
BYTHEWAY_INLINE void guided_row_sums(int64_t rows, int64_t F, const acc_t* __restrict__ softmax,
                                     const acc_t* __restrict__ row_inv_denominator, acc_t* __restrict__ guided,
                                     acc_t* __restrict__ row_guided_sum) {
  for (int64_t i = 0; i < rows; ++i) {
    row_guided_sum[i] = row_sum(guided + i * F, F);
  }
  // 0 < t <= max is false for t <= 0, inf and NaN. The per-row fallback below practically never
  // runs, so all rows are checked at once: the smallest sum is > 0 and the total (which an inf or
  // NaN row makes non-finite) is finite.
  constexpr acc_t kLargest = std::numeric_limits<acc_t>::max();
  const acc_t smallest = reduce_row(row_guided_sum, rows, kLargest, [](acc_t a, acc_t b) { return b < a ? b : a; });
  if (smallest > acc_t(0) && row_sum(row_guided_sum, rows) <= kLargest) {
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (!(row_guided_sum[i] > acc_t(0) && row_guided_sum[i] <= kLargest)) {
      const acc_t scale = row_inv_denominator != nullptr ? row_inv_denominator[i] : acc_t(1);
      for (int64_t j = 0; j < F; ++j) {
        guided[i * F + j] = row_inv_denominator != nullptr ? softmax[i * F + j] * scale : softmax[i * F + j];
      }
      row_guided_sum[i] = row_sum(guided + i * F, F);
    }
  }
}

// high = A2 P: the closed form A2 - rowsum(A2) / F for the full band, else the band product.
template <typename acc_t, int kFrames>
BYTHEWAY_INLINE void high_band_rows(int64_t rows, int64_t F, const Plan<acc_t>& plan, const acc_t* __restrict__ guided,
                                    const acc_t* __restrict__ row_guided_sum, acc_t* __restrict__ high) {
  if (!plan.full_band) {
    for (int64_t map = 0; map < rows / F; ++map) {
      plan_band_product<acc_t, kFrames>(plan, guided + map * F * F, high + map * F * F);
    }
    return;
  }
  const acc_t inv_frames = acc_t(1) / static_cast<acc_t>(F);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t mean = row_guided_sum[i] * inv_frames;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      high[i * F + j] = guided[i * F + j] - mean;
    }
  }
}

// Adds the map's energy terms to per-column lanes (see EnergySums).
template <typename acc_t, int kFrames>
BYTHEWAY_INLINE void add_energies(int64_t rows, int64_t F, const acc_t* __restrict__ softmax, const acc_t* __restrict__ guided,
                                  const acc_t* __restrict__ high, const acc_t* __restrict__ row_guided_sum,
                                  EnergyLanes<acc_t, kFrames>& lanes) {
  acc_t* __restrict__ softmax_sq = lanes.lane(0);
  acc_t* __restrict__ guided_sq = lanes.lane(1);
  acc_t* __restrict__ guided_dot_high = lanes.lane(2);
  acc_t* __restrict__ guided_sq_normalised = lanes.lane(3);
  acc_t* __restrict__ guided_dot_high_normalised = lanes.lane(4);
  acc_t* __restrict__ high_sq_normalised = lanes.lane(5);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t t = row_guided_sum[i];
    const acc_t weight = acc_t(1) / (t * t);
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const int64_t k = i * F + j;
      const acc_t gg = guided[k] * guided[k];
      const acc_t gh = guided[k] * high[k];
      softmax_sq[j] += softmax[k] * softmax[k];
      guided_sq[j] += gg;
      guided_dot_high[j] += gh;
      guided_sq_normalised[j] += gg * weight;
      guided_dot_high_normalised[j] += gh * weight;
      high_sq_normalised[j] += high[k] * high[k] * weight;
    }
  }
}

// Rounds to the output dtype; float16 saturates at its largest finite value (reachable only for
// beta above ~7e4), NaN stays NaN. The op's rule, as in the reference.
template <typename scalar_t, typename acc_t>
inline scalar_t to_output(acc_t value) {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    constexpr acc_t kHalfMax = acc_t(65504);
    value = value > kHalfMax ? kHalfMax : (value < -kHalfMax ? -kHalfMax : value);
  }
  return static_cast<scalar_t>(value);
}

// A3 = A2 + (beta - 1) A2 P, divided by its row sum rowsum(A2) (DC is outside the band).
template <typename scalar_t, typename acc_t>
BYTHEWAY_INLINE void store_enhanced(int64_t rows, int64_t F, const acc_t* __restrict__ guided, const acc_t* __restrict__ high,
                                    const acc_t* __restrict__ row_guided_sum, acc_t band_gain,
                                    scalar_t* __restrict__ out) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t inv_sum = acc_t(1) / row_guided_sum[i];
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const int64_t k = i * F + j;
      out[k] = to_output<scalar_t>((guided[k] + band_gain * high[k]) * inv_sum);
    }
  }
}

// The normalised guided map X = A2 / rowsum(A2), the value both full-band stores start from.
template <typename acc_t>
BYTHEWAY_INLINE acc_t normalised(acc_t guided, acc_t inv_sum) {
  return guided * inv_sum;
}

// The full band without the product: A3 / t = X + (beta - 1)(X - 1/F) = beta X - (beta - 1) / F.
template <typename scalar_t, typename acc_t>
BYTHEWAY_INLINE void store_enhanced_full_band(int64_t rows, int64_t F, const acc_t* __restrict__ guided,
                                              const acc_t* __restrict__ row_guided_sum, acc_t beta,
                                              scalar_t* __restrict__ out) {
  const acc_t offset = (beta - acc_t(1)) / static_cast<acc_t>(F);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t inv_sum = acc_t(1) / row_guided_sum[i];
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const int64_t k = i * F + j;
      out[k] = to_output<scalar_t>(beta * normalised(guided[k], inv_sum) - offset);
    }
  }
}

// X = A2 / rowsum(A2), kept in a float32/float64 output until beta is known (adaptive beta).
template <typename acc_t>
BYTHEWAY_INLINE void store_normalised(int64_t rows, int64_t F, const acc_t* __restrict__ guided,
                                      const acc_t* __restrict__ row_guided_sum, acc_t* __restrict__ out) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t inv_sum = acc_t(1) / row_guided_sum[i];
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      out[i * F + j] = normalised(guided[i * F + j], inv_sum);
    }
  }
}

// The full band with a nearest guide and no energies, without forming A2: with the guide's row
// sums (taken before the softmax, so that the two overlap) rowsum(A2) is
// (1 - alpha) / den * rowsum(numerators) + alpha rowsum(U), and beta A2 / rowsum(A2) - (beta - 1) / F
// is formed from the numerators and U directly, for the F rows of one map. Returns false, having
// written nothing, when a row's guided sum is <= 0 or not finite; the caller then takes the
// general path, which applies the op's rule to such rows.
template <typename scalar_t, typename acc_t, typename guide_t>
BYTHEWAY_INLINE bool store_blended_full_band(int64_t F, acc_t alpha, const guide_t* __restrict__ u,
                                             const acc_t* __restrict__ numerators,
                                             const acc_t* __restrict__ row_denominator,
                                             const acc_t* __restrict__ row_inv_denominator, acc_t beta,
                                             acc_t* __restrict__ row_guided_sum, scalar_t* __restrict__ out) {
  const acc_t softmax_share = acc_t(1) - alpha;
  for (int64_t i = 0; i < F; ++i) {  // row_guided_sum holds rowsum(U) on entry
    row_guided_sum[i] = softmax_share * row_inv_denominator[i] * row_denominator[i] + alpha * row_guided_sum[i];
  }
  constexpr acc_t kLargest = std::numeric_limits<acc_t>::max();  // as in guided_row_sums
  const acc_t smallest = reduce_row(row_guided_sum, F, kLargest, [](acc_t a, acc_t b) { return b < a ? b : a; });
  if (!(smallest > acc_t(0) && row_sum(row_guided_sum, F) <= kLargest)) {
    return false;
  }
  const acc_t offset = (beta - acc_t(1)) / static_cast<acc_t>(F);
  for (int64_t i = 0; i < F; ++i) {
    const acc_t scale = beta / row_guided_sum[i];
    const acc_t numerator_weight = softmax_share * row_inv_denominator[i] * scale;
    const acc_t guide_weight = alpha * scale;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const int64_t k = i * F + j;
      out[k] = to_output<scalar_t>(numerators[k] * numerator_weight + static_cast<acc_t>(u[k]) * guide_weight - offset);
    }
  }
  return true;
}

// What `process_maps` writes into `probs`: the probabilities, or (adaptive beta, float32/float64
// outputs) the normalised guided map X that `finish_normalised` turns into them in place.
enum class Output { kNothing, kProbabilities, kNormalisedGuided };

// Maps processed together by one step of `process_maps` at a compile-time F: each step runs
// over all their rows before the next step starts, so a short map (F = 16: one vector per row)
// still gives the out-of-order core enough independent rows to overlap each step's latency.
template <int kFrames>
constexpr int maps_per_step() {
  return kFrames > 0 && kFrames <= 16 ? 32 / kFrames : 1;
}

// Scratch of `process_maps`: A (softmax), A2 (guided), A2 P (high) and per-row values, for the
// maps of one step.
template <typename acc_t, int kFrames>
struct StepScratch {
  static constexpr int kMaps = maps_per_step<kFrames>();
  Scratch<acc_t, kMaps * kFrames * kFrames> softmax, guided, high;
  Scratch<acc_t, kMaps * kFrames> row_maxima, row_denominator, row_inv_denominator, row_guided_sum;
  explicit StepScratch(int64_t frames)
      : softmax(kMaps * frames * frames),
        guided(kMaps * frames * frames),
        high(kMaps * frames * frames),
        row_maxima(kMaps * frames),
        row_denominator(kMaps * frames),
        row_inv_denominator(kMaps * frames),
        row_guided_sum(kMaps * frames) {}
};

// One step: kMaps consecutive maps of entry `entry` starting at `first_map`.
template <int kMaps, typename scalar_t, typename guide_t, int kFrames>
BYTHEWAY_INLINE void process_step(
    const Plan<typename AccumulateType<scalar_t>::type>& plan,
    const scalar_t* __restrict__ logits,
    const guide_t* guide,
    scalar_t* __restrict__ out,
    Output output,
    bool with_sums,
    bool needs_high,
    typename AccumulateType<scalar_t>::type beta,
    int64_t entry,
    int64_t first_map,
    StepScratch<typename AccumulateType<scalar_t>::type, kFrames>& scratch,
    EnergyLanes<typename AccumulateType<scalar_t>::type, kFrames>& lanes) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const int64_t F = kFrames > 0 ? kFrames : plan.frames;
  const int64_t map_size = F * F;
  const int64_t rows = kMaps * F;
  acc_t* __restrict__ softmax = scratch.softmax.data();
  acc_t* __restrict__ guided = scratch.guided.data();
  acc_t* __restrict__ high = scratch.high.data();
  acc_t* __restrict__ row_inv_denominator = scratch.row_inv_denominator.data();
  acc_t* __restrict__ row_guided_sum = scratch.row_guided_sum.data();
  if (plan.has_guide && !plan.bilinear && plan.full_band && !with_sums && output == Output::kProbabilities) {
    const guide_t* u[kMaps];
    for (int m = 0; m < kMaps; ++m) {
      u[m] = GuideTaps<acc_t, guide_t>::of_map(plan, guide, entry, first_map + m).u00;
      for (int64_t i = 0; i < F; ++i) {
        row_guided_sum[m * F + i] = reduce_row(u[m] + i * F, F, acc_t(0), [](acc_t a, acc_t b) { return a + b; });
      }
    }
    softmax_numerators(logits, rows, F, softmax, scratch.row_maxima.data(), scratch.row_denominator.data(),
                       row_inv_denominator);
    for (int m = 0; m < kMaps; ++m) {
      if (!store_blended_full_band(F, plan.alpha, u[m], softmax + m * map_size,
                                   scratch.row_denominator.data() + m * F, row_inv_denominator + m * F, beta,
                                   row_guided_sum + m * F, out + m * map_size)) {
        normalise_and_blend(F, plan, GuideTaps<acc_t, guide_t>::of_map(plan, guide, entry, first_map + m), false,
                            row_inv_denominator + m * F, softmax + m * map_size, guided + m * map_size);
        guided_row_sums(F, F, softmax + m * map_size, row_inv_denominator + m * F, guided + m * map_size,
                        row_guided_sum + m * F);
        store_enhanced_full_band(F, F, guided + m * map_size, row_guided_sum + m * F, beta, out + m * map_size);
      }
    }
    return;
  }
  softmax_numerators(logits, rows, F, softmax, scratch.row_maxima.data(), scratch.row_denominator.data(),
                     row_inv_denominator);
  const acc_t* guided_map = guided;          // A2
  const acc_t* guided_sums = row_guided_sum;  // rowsum(A2)
  if (plan.has_guide) {
    for (int m = 0; m < kMaps; ++m) {
      normalise_and_blend(F, plan, GuideTaps<acc_t, guide_t>::of_map(plan, guide, entry, first_map + m),
                          with_sums, row_inv_denominator + m * F, softmax + m * map_size, guided + m * map_size);
    }
    guided_row_sums(rows, F, softmax, with_sums ? nullptr : row_inv_denominator, guided, row_guided_sum);
  } else if (with_sums) {
    normalise_without_guide(rows, F, row_inv_denominator, softmax, row_guided_sum);
    guided_map = softmax;
  } else {
    // Everything after this divides A2 by its row sums, so the numerators and their sums serve as
    // A2 and rowsum(A2) as they are (numerator / sum is A exactly as normalising computes it).
    guided_map = softmax;
    guided_sums = scratch.row_denominator.data();
  }
  if (needs_high) {
    high_band_rows<acc_t, kFrames>(rows, F, plan, guided_map, guided_sums, high);
  }
  if (with_sums) {
    add_energies(rows, F, softmax, guided_map, high, guided_sums, lanes);
  }
  if (output == Output::kProbabilities) {
    if (plan.full_band) {
      store_enhanced_full_band(rows, F, guided_map, guided_sums, beta, out);
    } else {
      store_enhanced(rows, F, guided_map, high, guided_sums, beta - acc_t(1), out);
    }
  } else if (output == Output::kNormalisedGuided) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      store_normalised(rows, F, guided_map, guided_sums, out);
    }
  }
}

// Processes maps [map_begin, map_end) of batch entry `entry`. Writes `output` into `probs` (the
// probabilities with gain beta - 1 on the band), stores the block's energy sums in `sums` when set.
template <typename scalar_t, typename guide_t, int kFrames>
void process_maps(
    const Plan<typename AccumulateType<scalar_t>::type>& plan,
    const scalar_t* scores,
    const guide_t* guide,
    scalar_t* probs,
    Output output,
    EnergySums* sums,
    typename AccumulateType<scalar_t>::type beta,
    int64_t entry,
    int64_t map_begin,
    int64_t map_end) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  constexpr int kMaps = maps_per_step<kFrames>();
  const int64_t F = kFrames > 0 ? kFrames : plan.frames;
  const int64_t map_size = F * F;
  // The band product A2 P is needed for the energies and for the probabilities of a partial band;
  // the full band's stores use its closed form instead.
  const bool needs_high = sums != nullptr || (output == Output::kProbabilities && !plan.full_band);
  StepScratch<acc_t, kFrames> scratch(F);
  // Per-step lanes in acc_t (F columns each), accumulated per block in double.
  EnergyLanes<acc_t, kFrames> step_lanes(sums ? F : 0);
  EnergyLanes<double, kFrames> block_lanes(sums ? F : 0);

  for (int64_t map = map_begin; map < map_end;) {
    const int64_t offset = (entry * plan.maps_per_entry + map) * map_size;
    const int64_t step = map_end - map >= kMaps ? kMaps : 1;
    // The hardware prefetcher alone leaves the first reads of each map waiting on memory.
    if (map + step + kPrefetchMaps <= map_end) {
      prefetch_bytes(scores + offset + step * map_size, kPrefetchMaps * map_size * sizeof(scalar_t));
      if (plan.has_guide) {
        for (int64_t ahead = map + step; ahead < map + step + kPrefetchMaps; ++ahead) {
          GuideTaps<acc_t, guide_t>::of_map(plan, guide, entry, ahead).prefetch(map_size * sizeof(guide_t));
        }
      }
    }
    if (step == kMaps) {
      process_step<kMaps, scalar_t, guide_t, kFrames>(plan, scores + offset, guide, probs + offset, output,
                                                      sums != nullptr, needs_high, beta, entry, map, scratch,
                                                      step_lanes);
    } else {
      process_step<1, scalar_t, guide_t, kFrames>(plan, scores + offset, guide, probs + offset, output,
                                                  sums != nullptr, needs_high, beta, entry, map, scratch,
                                                  step_lanes);
    }
    if (sums != nullptr) {
      step_lanes.add_to(block_lanes);
      step_lanes.clear();
    }
    map += step;
  }
  if (sums != nullptr) {
    *sums = block_lanes.sum();
  }
}

// Turns the normalised guided maps X of maps [map_begin, map_end) of one entry into the
// probabilities in place: X + (beta - 1) X P (beta X - (beta - 1) / F for the full band; the same
// values the one-pass stores compute from X).
template <typename acc_t, int kFrames>
void finish_normalised(const Plan<acc_t>& plan, acc_t* values, acc_t beta, int64_t map_begin, int64_t map_end) {
  constexpr int kMapSize = kFrames * kFrames;
  const int64_t F = kFrames > 0 ? kFrames : plan.frames;
  const int64_t map_size = F * F;
  const acc_t band_gain = beta - acc_t(1);
  if (plan.full_band) {
    const acc_t offset = band_gain / static_cast<acc_t>(F);
    acc_t* __restrict__ data = values + map_begin * map_size;
    const int64_t count = (map_end - map_begin) * map_size;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      data[k] = beta * data[k] - offset;
    }
    return;
  }
  Scratch<acc_t, kMapSize> high(map_size);
  for (int64_t map = map_begin; map < map_end; ++map) {
    acc_t* __restrict__ data = values + map * map_size;
    plan_band_product<acc_t, kFrames>(plan, data, high.data());
    const acc_t* __restrict__ band = high.data();
#pragma omp simd
    for (int64_t k = 0; k < map_size; ++k) {
      data[k] += band_gain * band[k];
    }
  }
}

// Map entries below which a call runs on the calling thread: waking torch's other threads costs
// about a microsecond, more than such a call's whole kernel (two 16 x 16 maps take ~0.3 us).
constexpr int64_t kInlineElements = 8192;

// Runs body(block) for blocks [0, blocks) on torch's threads, each thread taking the next block
// when it finishes one. A static split would leave a thread whose core is busy with another
// process holding its half of the work while the other waits. Each block writes only its own
// outputs (and its own EnergySums slot), so the result does not depend on who runs which block.
// `elements` (the map entries the blocks cover) below kInlineElements: all on this thread.
template <typename Body>
void for_each_block(int64_t blocks, int64_t elements, const Body& body) {
  if (elements < kInlineElements) {
    for (int64_t block = 0; block < blocks; ++block) {
      body(block);
    }
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), blocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t block = next.fetch_add(1); block < blocks; block = next.fetch_add(1)) {
      body(block);
    }
  });
}

// Runs `process_maps` on every block of entries [entry_begin, entry_end) in parallel, writing
// `output` with each entry's beta. Entries [sums_begin, sums_end) also gather energies: returns
// one EnergySums per block of theirs, ordered by entry, then map.
template <typename scalar_t, typename guide_t, int kFrames>
std::vector<EnergySums> run_blocks(
    const Plan<typename AccumulateType<scalar_t>::type>& plan,
    const scalar_t* scores,
    const guide_t* guide,
    scalar_t* probs,
    Output output,
    const std::vector<typename AccumulateType<scalar_t>::type>& entry_beta,
    int64_t entry_begin,
    int64_t entry_end,
    int64_t sums_begin,
    int64_t sums_end) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const int64_t blocks_per_entry = (plan.maps_per_entry + kBlockMaps - 1) / kBlockMaps;
  const int64_t blocks = (entry_end - entry_begin) * blocks_per_entry;
  std::vector<EnergySums> block_sums(std::max<int64_t>(sums_end - sums_begin, 0) * blocks_per_entry);
  const int64_t elements = (entry_end - entry_begin) * plan.maps_per_entry * plan.frames * plan.frames;
  for_each_block(blocks, elements, [&](int64_t block) {
    const int64_t entry = entry_begin + block / blocks_per_entry;
    const int64_t entry_block = block % blocks_per_entry;
    const int64_t map_begin = entry_block * kBlockMaps;
    const int64_t map_end = std::min(map_begin + kBlockMaps, plan.maps_per_entry);
    const bool with_sums = entry >= sums_begin && entry < sums_end;
    process_maps<scalar_t, guide_t, kFrames>(
        plan, scores, guide, probs, output,
        with_sums ? &block_sums[(entry - sums_begin) * blocks_per_entry + entry_block] : nullptr,
        entry_beta.empty() ? acc_t(1) : entry_beta[entry], entry, map_begin, map_end);
  });
  return block_sums;
}

// `finish_normalised` on every block of entries [entry_begin, entry_end), in parallel.
template <typename acc_t, int kFrames>
void finish_blocks(const Plan<acc_t>& plan, acc_t* probs, const std::vector<acc_t>& entry_beta, int64_t entry_begin,
                   int64_t entry_end) {
  const int64_t blocks_per_entry = (plan.maps_per_entry + kBlockMaps - 1) / kBlockMaps;
  const int64_t entry_size = plan.maps_per_entry * plan.frames * plan.frames;
  for_each_block((entry_end - entry_begin) * blocks_per_entry, (entry_end - entry_begin) * entry_size,
                 [&](int64_t block) {
    const int64_t entry = entry_begin + block / blocks_per_entry;
    const int64_t map_begin = (block % blocks_per_entry) * kBlockMaps;
    const int64_t map_end = std::min(map_begin + kBlockMaps, plan.maps_per_entry);
    finish_normalised<acc_t, kFrames>(plan, probs + entry * entry_size, entry_beta[entry], map_begin, map_end);
  });
}

struct EnergyScope {
  int64_t videos;       // V = B / parts; batch entry b belongs to video b % V
  int64_t first_entry;  // energy_part * V: entries [first_entry, first_entry + V) are in scope
  bool per_video;       // energy_scope == "sample"
  int64_t groups() const { return per_video ? videos : 1; }
};

// How beta follows from the energies (the constants come from bytheway_kernels/energy.py).
struct BetaRule {
  double beta0;
  bool adaptive;
  std::optional<double> beta_max;
  double high_energy_floor;  // below this fraction of E2 the high band counts as 0

  double operator()(double e1, double e2, double e2_high) const {
    double beta = beta0;
    if (!adaptive) {
      return beta;
    }
    if (e2_high > high_energy_floor * e2) {
      beta = std::max(beta0, std::sqrt(std::max(e1 - (e2 - e2_high), 0.0) / e2_high));
    }
    return beta_max.has_value() ? std::min(beta, *beta_max) : beta;
  }
};

// Columns of the stats output: len(bytheway_kernels.energy.STATS_FIELDS).
constexpr int64_t kStatsFields = 6;

// Per-group beta and stats row from the summed energies; fills `group_beta` and `stats`.
void finish_groups(
    const std::vector<EnergySums>& block_sums,
    int64_t blocks_per_entry,
    int64_t rows_per_entry,
    const EnergyScope& scope,
    const BetaRule& rule,
    std::vector<double>& group_beta,
    float* stats) {
  const int64_t groups = scope.groups();
  std::vector<EnergySums> group_sums(groups);
  for (int64_t v = 0; v < scope.videos; ++v) {
    for (int64_t b = 0; b < blocks_per_entry; ++b) {
      group_sums[scope.per_video ? v : 0].add(block_sums[v * blocks_per_entry + b]);
    }
  }
  const double rows = static_cast<double>(std::max<int64_t>(rows_per_entry * (scope.per_video ? 1 : scope.videos), 1));
  group_beta.assign(groups, rule.beta0);
  for (int64_t g = 0; g < groups; ++g) {
    const EnergySums& s = group_sums[g];
    const double e1 = s.softmax_sq / rows;
    const double e2 = s.guided_sq / rows;
    const double e2_high = s.guided_dot_high / rows;
    const double beta = rule(e1, e2, e2_high);
    group_beta[g] = beta;
    if (stats != nullptr) {
      const double gain = beta - 1.0;
      const double e3 = (s.guided_sq_normalised + 2.0 * gain * s.guided_dot_high_normalised +
                         gain * gain * s.high_sq_normalised) / rows;
      const double row[kStatsFields] = {beta, e1, e2, e2 - e2_high, e2_high, e3};
      for (int64_t k = 0; k < kStatsFields; ++k) {
        stats[g * kStatsFields + k] = static_cast<float>(row[k]);
      }
    }
  }
}

template <typename scalar_t, typename guide_t, int kFrames>
void run_op(
    const Plan<typename AccumulateType<scalar_t>::type>& plan,
    const scalar_t* scores,
    const guide_t* guide,
    scalar_t* probs,
    float* stats,
    const EnergyScope& scope,
    const BetaRule& rule) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const int64_t blocks_per_entry = (plan.maps_per_entry + kBlockMaps - 1) / kBlockMaps;
  const int64_t rows_per_entry = plan.maps_per_entry * plan.frames;
  const int64_t scope_end = scope.first_entry + scope.videos;
  std::vector<double> group_beta;
  auto betas_per_entry = [&]() {
    std::vector<acc_t> entry_beta(plan.batch);
    for (int64_t b = 0; b < plan.batch; ++b) {
      entry_beta[b] = static_cast<acc_t>(group_beta[scope.per_video ? b % scope.videos : 0]);
    }
    return entry_beta;
  };

  if (rule.adaptive) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // float32/float64: the pass over the entries in scope gathers their energies and keeps
      // X = A2 / rowsum(A2) in the output, which then becomes the probabilities in place; the
      // other entries are computed once, with beta known. Separate parallel loops, as a finish is
      // much cheaper than a map and the loops split their ranges evenly between threads.
      // Recomputing the maps in the apply pass instead (one pass less, as float16 does below)
      // measured 15-24% slower at up_blocks.2 on 2 threads: the second softmax costs more.
      const auto block_sums = run_blocks<scalar_t, guide_t, kFrames>(
          plan, scores, guide, probs, Output::kNormalisedGuided, {}, scope.first_entry, scope_end,
          scope.first_entry, scope_end);
      finish_groups(block_sums, blocks_per_entry, rows_per_entry, scope, rule, group_beta, stats);
      const auto entry_beta = betas_per_entry();
      finish_blocks<acc_t, kFrames>(plan, probs, entry_beta, scope.first_entry, scope_end);
      run_blocks<scalar_t, guide_t, kFrames>(plan, scores, guide, probs, Output::kProbabilities, entry_beta, 0,
                                             scope.first_entry, 0, 0);
      run_blocks<scalar_t, guide_t, kFrames>(plan, scores, guide, probs, Output::kProbabilities, entry_beta,
                                             scope_end, plan.batch, 0, 0);
    } else {
      // float16/bfloat16 outputs cannot hold X without a loss that grows with beta: a stats pass
      // over the entries in scope, then the apply pass recomputes the maps with each group's beta.
      const auto block_sums = run_blocks<scalar_t, guide_t, kFrames>(
          plan, scores, guide, probs, Output::kNothing, {}, scope.first_entry, scope_end, scope.first_entry,
          scope_end);
      finish_groups(block_sums, blocks_per_entry, rows_per_entry, scope, rule, group_beta, stats);
      run_blocks<scalar_t, guide_t, kFrames>(plan, scores, guide, probs, Output::kProbabilities, betas_per_entry(),
                                             0, plan.batch, 0, 0);
    }
    return;
  }
  // Fixed beta: one pass; the entries in scope also gather the energies when stats are wanted.
  group_beta.assign(scope.groups(), rule.beta0);
  const auto block_sums = run_blocks<scalar_t, guide_t, kFrames>(
      plan, scores, guide, probs, Output::kProbabilities, betas_per_entry(), 0, plan.batch,
      stats != nullptr ? scope.first_entry : 0, stats != nullptr ? scope_end : 0);
  if (stats != nullptr) {
    finish_groups(block_sums, blocks_per_entry, rows_per_entry, scope, rule, group_beta, stats);
  }
}

template <typename scalar_t, typename guide_t>
void dispatch_frames(
    const Plan<typename AccumulateType<scalar_t>::type>& plan,
    const at::Tensor& scores,
    const std::optional<at::Tensor>& guide,
    const at::Tensor& probs,
    float* stats,
    const EnergyScope& scope,
    const BetaRule& rule) {
  const guide_t* guide_data = guide ? guide->data_ptr<guide_t>() : nullptr;
  // Common frame counts get a compile-time F (constant trip counts: unrolled, vectorised loops
  // and register-resident blocks); 16 is the AnimateDiff / VideoCrafter2 count.
  auto run = &run_op<scalar_t, guide_t, 0>;
  switch (plan.frames) {
    case 8: run = &run_op<scalar_t, guide_t, 8>; break;
    case 16: run = &run_op<scalar_t, guide_t, 16>; break;
    case 24: run = &run_op<scalar_t, guide_t, 24>; break;
    case 32: run = &run_op<scalar_t, guide_t, 32>; break;
    default: break;
  }
  run(plan, scores.data_ptr<scalar_t>(), guide_data, probs.data_ptr<scalar_t>(), stats, scope, rule);
}

// The guide in the scores' dtype, or converted once to the accumulation dtype; contiguous.
std::optional<at::Tensor> checked_guide(const std::optional<at::Tensor>& guide_in, const at::Tensor& scores,
                                        at::ScalarType acc_type) {
  if (!guide_in.has_value()) {
    return std::nullopt;
  }
  const at::Tensor& g = *guide_in;
  const int64_t frames = scores.size(5);
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 6 && g.size(0) == scores.size(0) && g.size(3) == scores.size(3) &&
                  g.size(4) == frames && g.size(5) == frames && g.size(1) <= scores.size(1) &&
                  g.size(2) <= scores.size(2),
              "bytheway_cpu: guide shape ", g.sizes(), " does not fit scores ", scores.sizes());
  TORCH_CHECK(scores.size(1) * scores.size(2) == 0 || g.size(1) * g.size(2) > 0,
              "bytheway_cpu: empty guide for non-empty scores");
  return (g.scalar_type() == scores.scalar_type() ? g : g.to(acc_type)).contiguous();
}

// Memory-safety checks only: the ValueErrors naming arguments are raised in Python before this.
void check_arguments(const at::Tensor& scores_in, const at::Tensor& band_matrix, int64_t parts, int64_t energy_part,
                     c10::string_view energy_scope, c10::string_view guide_upsample,
                     const std::optional<at::Tensor>& probs) {
  TORCH_CHECK(scores_in.device().is_cpu(), "bytheway_cpu: scores must be a CPU tensor");
  TORCH_CHECK(scores_in.dim() == 6 && scores_in.size(4) == scores_in.size(5) && scores_in.size(5) >= 2,
              "bytheway_cpu: scores must be (B, H, W, heads, F, F) with F >= 2, got ", scores_in.sizes());
  const int64_t frames = scores_in.size(5);
  TORCH_CHECK(band_matrix.device().is_cpu() && band_matrix.is_floating_point() && band_matrix.dim() == 2 &&
                  band_matrix.size(0) == frames && band_matrix.size(1) == frames,
              "bytheway_cpu: band_matrix must be a floating (F, F) CPU tensor with F=", frames);
  TORCH_CHECK(parts >= 1 && energy_part >= 0 && energy_part < parts && scores_in.size(0) % parts == 0,
              "bytheway_cpu: bad batch split parts=", parts, ", energy_part=", energy_part);
  TORCH_CHECK(energy_scope == "batch" || energy_scope == "sample", "bytheway_cpu: bad energy_scope");
  TORCH_CHECK(guide_upsample == "nearest" || guide_upsample == "bilinear", "bytheway_cpu: bad guide_upsample");
  TORCH_CHECK(!probs || (probs->device().is_cpu() && probs->sizes() == scores_in.sizes() &&
                         probs->scalar_type() == scores_in.scalar_type()),
              "bytheway_cpu: probs must be a CPU tensor with the shape and dtype of scores");
}

// `band_matrix` is P (F x F, any floating dtype; read in double) from bytheway_kernels/band.py;
// with `full_band` (band.is_full_band) it is not read and A2 P = A2 - rowsum(A2) / F is used.
// Writes into `probs` and `stats` when given; a missing `probs` is allocated here (contiguous),
// which costs a tenth of what torch.empty_like costs from Python. Returns the probs written.
at::Tensor attention_probs(
    const at::Tensor& scores_in,
    const std::optional<at::Tensor>& guide_in,
    const at::Tensor& band_matrix,
    bool full_band,
    double alpha,
    double beta,
    bool adaptive_beta,
    int64_t parts,
    int64_t energy_part,
    c10::string_view energy_scope,
    c10::string_view guide_upsample,
    std::optional<double> beta_max,
    double high_energy_floor,
    const std::optional<at::Tensor>& probs,
    const std::optional<at::Tensor>& stats) {
  check_arguments(scores_in, band_matrix, parts, energy_part, energy_scope, guide_upsample, probs);
  const at::Tensor scores = scores_in.contiguous();
  const at::ScalarType acc_type = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::optional<at::Tensor> guide = checked_guide(guide_in, scores, acc_type);

  const int64_t batch = scores.size(0);
  const EnergyScope scope{batch / parts, energy_part * (batch / parts), energy_scope == "sample"};
  const BetaRule rule{beta, adaptive_beta, beta_max, high_energy_floor};
  float* stats_data = nullptr;
  at::Tensor stats_buffer;
  if (stats.has_value()) {
    TORCH_CHECK(stats->device().is_cpu() && stats->scalar_type() == at::kFloat && stats->dim() == 2 &&
                    stats->size(0) == scope.groups() && stats->size(1) == kStatsFields,
                "bytheway_cpu: stats must be float32 (", scope.groups(), ", ", kStatsFields, "), got ",
                stats->sizes());
    stats_buffer = stats->is_contiguous() ? *stats : at::empty({scope.groups(), kStatsFields}, stats->options());
    stats_data = stats_buffer.data_ptr<float>();
  }
  const at::Tensor probs_buffer = probs && probs->is_contiguous() ? *probs : at::empty(scores.sizes(), scores.options());
  advise_huge_pages(probs_buffer.data_ptr(), probs_buffer.nbytes());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "bytheway_cpu", [&] {
    using acc_t = typename AccumulateType<scalar_t>::type;
    const Plan<acc_t> plan(scores, guide ? &*guide : nullptr, band_matrix, full_band, alpha,
                           guide_upsample == "bilinear");
    if (!guide || guide->scalar_type() == scores.scalar_type()) {
      dispatch_frames<scalar_t, scalar_t>(plan, scores, guide, probs_buffer, stats_data, scope, rule);
    } else {
      dispatch_frames<scalar_t, acc_t>(plan, scores, guide, probs_buffer, stats_data, scope, rule);
    }
  });

  if (stats.has_value() && !stats->is_same(stats_buffer)) {
    stats->copy_(stats_buffer);
  }
  if (probs && !probs->is_same(probs_buffer)) {
    probs->copy_(probs_buffer);
    return *probs;
  }
  return probs_buffer;
}

}  // namespace

}  // namespace bytheway_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // Releases the GIL while the kernel runs: other Python threads go on meanwhile.
  module.def("attention_probs", &bytheway_cpu::attention_probs,
             pybind11::call_guard<pybind11::gil_scoped_release>(),
             "ByTheWay(scores) into probs (allocated when None) and stats; returns probs. "
             "See bytheway_kernels/ops/attention_probs/cpp.py.");
}
