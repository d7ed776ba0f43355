// The elementwise loops of the CPU kernel, vectorised by the compiler: every inner
// loop runs over contiguous (or stride-2) columns through restrict pointers. The float
// versions are built for AVX-512, AVX2 + FMA and baseline x86-64, and every call runs the
// tier vector_isa() names: the best this CPU has, capped by ATEN_CPU_CAPABILITY as
// PyTorch's own kernels are (so that a lower tier is measured and tested on any machine).

#include "vectorised.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CASA_X86_TIERS 1
#endif

#define CASA_INLINE __attribute__((always_inline)) inline
#define CASA_LAMBDA_INLINE __attribute__((always_inline))

namespace casa {
namespace cpu {
namespace {

// exp for float in a form the compiler vectorises: 2^n · p(r) with x = n·ln2 + r,
// |r| <= ln2/2 and p a degree-5 polynomial fitted for relative error (7.5e-8 before
// rounding, below half an ulp). n is rounded by adding 1.5·2^23 + 127 (the float then
// holds n + 127 in its low mantissa bits, which shifted into the exponent field give
// 2^n). Below -87 the result is 0 and above 88 it is inf (so exp(-inf) = 0 and
// exp(inf) = inf exactly, as the reference's softmax and sigmoid need); NaN stays NaN:
// every comparison is written so that a NaN takes the arithmetic path.
CASA_INLINE float exp_vectorisable(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kRoundBiased = 12582912.0f + 127.0f;
  const float biased = clamped * 1.44269504088896341f + kRoundBiased;
  const float n = biased - kRoundBiased;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 8.297654800117016e-3f;
  p = p * r + 4.191538318991661e-2f;
  p = p * r + 1.6667574644088745e-1f;
  p = p * r + 4.9998894333839417e-1f;
  p = p * r + 9.999997019767761e-1f;
  p = p * r + 1.0000001192092896f;
  uint32_t bits;
  std::memcpy(&bits, &biased, sizeof(bits));
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : p * scale);
}

// max(v, 0) that keeps NaN, as torch.relu does (v > 0 ? v : 0 would turn NaN into 0).
template <typename acc_t>
CASA_INLINE acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

CASA_INLINE double exp_vectorisable(double x) { return std::exp(x); }

// Element loads and stores by bit manipulation, which the vectoriser understands
// (c10::BFloat16's constructors are opaque to it). Stores round to nearest even.
CASA_INLINE float load(const float* p, int64_t i) { return p[i]; }
CASA_INLINE double load(const double* p, int64_t i) { return p[i]; }
CASA_INLINE float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
// Elements 2c and 2c + 1 at once. For bfloat16 the pair is one 32-bit word, which the
// vectoriser turns into contiguous loads (two interleaved 16-bit streams defeat it).
template <typename T>
CASA_INLINE void load_pair(const T* p, int64_t c, T& even, T& odd) {
  even = p[2 * c];
  odd = p[2 * c + 1];
}
CASA_INLINE void load_pair(const c10::BFloat16* p, int64_t c, float& even, float& odd) {
  uint32_t word;
  std::memcpy(&word, reinterpret_cast<const char*>(p) + 4 * c, sizeof(word));
  const uint32_t even_bits = word << 16, odd_bits = word & 0xFFFF0000u;
  std::memcpy(&even, &even_bits, sizeof(even));
  std::memcpy(&odd, &odd_bits, sizeof(odd));
}
template <typename T>
CASA_INLINE void store_pair(T* p, int64_t c, T even, T odd) {
  p[2 * c] = even;
  p[2 * c + 1] = odd;
}
CASA_INLINE uint32_t rounded_bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}
CASA_INLINE void store_pair(c10::BFloat16* p, int64_t c, float even, float odd) {
  const uint32_t word = rounded_bf16_bits(even) | (rounded_bf16_bits(odd) << 16);
  std::memcpy(reinterpret_cast<char*>(p) + 4 * c, &word, sizeof(word));
}

// The first t with 2t + shift >= 0, and one past the last with 2t + shift < L.
CASA_INLINE int64_t first_inside(int64_t shift) { return shift >= 0 ? 0 : (1 - shift) / 2; }
CASA_INLINE int64_t end_inside(int64_t shift, int64_t L) { return (L - shift + 1) / 2; }

// One tap of a stride-2 conv's columns: out[t] = src[2t + shift] for t < L/2, zero where
// 2t + shift falls outside [0, L).
template <typename acc_t, typename scalar_t>
CASA_INLINE void gather_tap_s2(const scalar_t* __restrict src, int64_t L, int64_t shift,
                               acc_t* __restrict out) {
  const int64_t half = L / 2;
  const int64_t lo = std::clamp<int64_t>(first_inside(shift), 0, half);
  const int64_t hi = std::clamp(end_inside(shift, L), lo, half);
  for (int64_t t = 0; t < lo; ++t) out[t] = acc_t(0);
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    for (int64_t t = lo; t < hi; ++t) out[t] = src[2 * t + shift];
  } else {
    for (int64_t t = lo; t < hi; ++t) out[t] = load(src, 2 * t + shift);
  }
  for (int64_t t = hi; t < half; ++t) out[t] = acc_t(0);
}

template <typename acc_t, typename scalar_t>
CASA_INLINE void im2col_impl(const scalar_t* __restrict src, int64_t ld, int64_t rows, int64_t L,
                             int64_t k, acc_t* __restrict dst, int64_t dst_ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      gather_tap_s2(src + i * ld, L, j - k / 2, dst + (i * k + j) * dst_ld);
    }
  }
}

// Sums each output parity in its own contiguous buffer (even, odd: L entries each), so
// every tap is a contiguous vector add, then interleaves them with the ReLU.
template <typename acc_t>
CASA_INLINE void col2im_relu_impl(const acc_t* __restrict cols, int64_t ldc, int64_t rows,
                                  int64_t k, int64_t L, const acc_t* __restrict bias,
                                  acc_t* __restrict out, int64_t ldo) {
  const int64_t p = k / 2;
  std::vector<acc_t> sums(2 * L);
  acc_t* __restrict even = sums.data();
  acc_t* __restrict odd = even + L;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t u = 0; u < L; ++u) even[u] = odd[u] = bias[n];
    for (int64_t j = 0; j < k; ++j) {
      const acc_t* __restrict in = cols + (n * k + j) * ldc;
      // Input column i lands on output 2i + j - p = 2(i + d) + q.
      const int64_t q = (j - p) & 1, d = (j - p - q) / 2;
      acc_t* __restrict sum = q == 0 ? even : odd;
      const int64_t i0 = std::max<int64_t>(0, -d), i1 = std::min(L, L - d);
      for (int64_t i = i0; i < i1; ++i) sum[i + d] += in[i];
    }
    acc_t* __restrict o = out + n * ldo;
    for (int64_t u = 0; u < L; ++u) {
      store_pair(o, u, relu(even[u]), relu(odd[u]));
    }
  }
}

template <typename acc_t>
CASA_INLINE void add_bias_relu_impl(acc_t* __restrict out, int64_t ld, int64_t rows, int64_t cols,
                                    const acc_t* __restrict bias) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* __restrict o = out + r * ld;
    const acc_t b = bias[r];
    for (int64_t c = 0; c < cols; ++c) {
      o[c] = relu(o[c] + b);
    }
  }
}

template <typename acc_t, typename scalar_t>
CASA_INLINE void softmax_numerators_impl(acc_t* __restrict scores, int64_t ld,
                                         const acc_t* __restrict score_bias, int64_t rows,
                                         int64_t T, const scalar_t* __restrict x, int64_t D,
                                         acc_t* __restrict shift, acc_t* __restrict sum) {
  const int64_t half = T / 2;
  for (int64_t c = 0; c < T; ++c) shift[c] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* __restrict xr = x + n * D;
    for (int64_t c = 0; c < half; ++c) {
      acc_t even, odd;
      load_pair(xr, c, even, odd);
      shift[c] = even > shift[c] ? even : shift[c];
      shift[half + c] = odd > shift[half + c] ? odd : shift[half + c];
    }
  }
  for (int64_t c = 0; c < T; ++c) {
    // A column of -inf (every score -inf, every numerator 0) takes any finite shift.
    shift[c] = shift[c] == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : shift[c] + acc_t(1);
    sum[c] = acc_t(0);
  }
  for (int64_t n = 0; n < rows; ++n) {
    acc_t* __restrict s = scores + n * ld;
    const acc_t b = score_bias[n];
    const scalar_t* __restrict xr = x + n * D;
    for (int64_t c = 0; c < half; ++c) {
      acc_t x_even, x_odd;
      load_pair(xr, c, x_even, x_odd);
      const acc_t even = exp_vectorisable(acc_t(1) / (acc_t(1) + exp_vectorisable(-(s[c] + b))) +
                                          x_even - shift[c]);
      const acc_t odd = exp_vectorisable(
          acc_t(1) / (acc_t(1) + exp_vectorisable(-(s[half + c] + b))) + x_odd - shift[half + c]);
      s[c] = even;
      s[half + c] = odd;
      sum[c] += even;
      sum[half + c] += odd;
    }
  }
}

template <typename acc_t>
CASA_INLINE void softmax_merge_blocks_impl(const acc_t* __restrict shift,
                                           const acc_t* __restrict sum, int64_t blocks, int64_t T,
                                           acc_t* __restrict top, acc_t* __restrict total) {
  for (int64_t c = 0; c < T; ++c) {
    top[c] = shift[c];
    total[c] = acc_t(0);
  }
  for (int64_t i = 1; i < blocks; ++i) {
    for (int64_t c = 0; c < T; ++c) top[c] = shift[i * T + c] > top[c] ? shift[i * T + c] : top[c];
  }
  for (int64_t i = 0; i < blocks; ++i) {
    for (int64_t c = 0; c < T; ++c)
      total[c] += sum[i * T + c] * exp_vectorisable(shift[i * T + c] - top[c]);
  }
}

template <typename acc_t>
CASA_INLINE void softmax_scales_impl(acc_t* __restrict shift, int64_t blocks, int64_t T,
                                     const acc_t* __restrict top, const acc_t* __restrict total) {
  for (int64_t i = 0; i < blocks; ++i) {
    for (int64_t c = 0; c < T; ++c)
      shift[i * T + c] = exp_vectorisable(shift[i * T + c] - top[c]) / total[c];
  }
}

template <typename acc_t, typename scalar_t>
CASA_INLINE void softmax_output_impl(const acc_t* __restrict numerators, int64_t ld,
                                     const acc_t* __restrict values, int64_t ldv,
                                     const acc_t* __restrict value_bias,
                                     const acc_t* __restrict scale, int64_t rows, int64_t T,
                                     const scalar_t* __restrict x, scalar_t* __restrict y,
                                     int64_t D) {
  const int64_t half = T / 2;
  for (int64_t n = 0; n < rows; ++n) {
    const acc_t* __restrict e = numerators + n * ld;
    const acc_t* __restrict v = values + n * ldv;
    const scalar_t* __restrict xr = x + n * D;
    scalar_t* __restrict yr = y + n * D;
    for (int64_t c = 0; c < half; ++c) {
      acc_t x_even, x_odd;
      load_pair(xr, c, x_even, x_odd);
      store_pair(yr, c, e[c] * scale[c] * (v[c] + value_bias[c]) + x_even,
                 e[half + c] * scale[half + c] * (v[half + c] + value_bias[half + c]) + x_odd);
    }
  }
}

// The loops below take their optional outputs as template flags, so that each inner loop
// is free of branches and vectorises (a null check inside it stops the compiler).
template <bool kWithValues, typename acc_t, typename scalar_t>
CASA_INLINE void softmax_backward_weights_loop(
    acc_t* __restrict scores, int64_t ld, const acc_t* __restrict score_bias, int64_t rows,
    int64_t T, const scalar_t* __restrict x, const scalar_t* __restrict g, int64_t D,
    const acc_t* __restrict col_max, const acc_t* __restrict col_sum,
    const acc_t* __restrict values, const acc_t* __restrict value_bias, acc_t* __restrict dp,
    acc_t* __restrict sigma_prime, acc_t* __restrict colsum) {
  const int64_t half = T / 2;
  for (int64_t n = 0; n < rows; ++n) {
    acc_t* __restrict s = scores + n * ld;
    const acc_t b = score_bias[n];
    const scalar_t* __restrict xr = x + n * D;
    const scalar_t* __restrict gr = g + n * D;
    // Column i of the tile, its x and g: P, and with values dP, σ' and colsum.
    const auto column = [&](int64_t i, acc_t x_i, acc_t g_i) CASA_LAMBDA_INLINE {
      const acc_t sigma = acc_t(1) / (acc_t(1) + exp_vectorisable(-(s[i] + b)));
      const acc_t p = exp_vectorisable(sigma + x_i - col_max[i]) / col_sum[i];
      s[i] = p;
      if constexpr (kWithValues) {
        const acc_t d = (values[n * ld + i] + value_bias[i]) * g_i;
        dp[n * ld + i] = d;
        sigma_prime[n * ld + i] = sigma * (acc_t(1) - sigma);
        colsum[i] += p * d;
      }
    };
    for (int64_t c = 0; c < half; ++c) {
      acc_t x_even, x_odd, g_even = 0, g_odd = 0;
      load_pair(xr, c, x_even, x_odd);
      if constexpr (kWithValues) load_pair(gr, c, g_even, g_odd);
      column(c, x_even, g_even);
      column(half + c, x_odd, g_odd);
    }
  }
}

template <typename acc_t, typename scalar_t>
CASA_INLINE void softmax_backward_weights_impl(acc_t* scores, int64_t ld, const acc_t* score_bias,
                                               int64_t rows, int64_t T, const scalar_t* x,
                                               const scalar_t* g, int64_t D, const acc_t* col_max,
                                               const acc_t* col_sum, const acc_t* values,
                                               const acc_t* value_bias, acc_t* dp,
                                               acc_t* sigma_prime, acc_t* colsum) {
  if (values != nullptr) {
    softmax_backward_weights_loop<true>(scores, ld, score_bias, rows, T, x, g, D, col_max, col_sum,
                                        values, value_bias, dp, sigma_prime, colsum);
  } else {
    softmax_backward_weights_loop<false>(scores, ld, score_bias, rows, T, x, g, D, col_max, col_sum,
                                         values, value_bias, dp, sigma_prime, colsum);
  }
}

template <bool kDv, bool kDs, bool kDx, typename acc_t, typename scalar_t>
CASA_INLINE void softmax_backward_grads_loop(const acc_t* __restrict P, int64_t ld, int64_t rows,
                                             int64_t T, const scalar_t* __restrict g, int64_t D,
                                             const acc_t* __restrict colsum,
                                             const acc_t* __restrict sigma_prime,
                                             acc_t* __restrict dp, acc_t* __restrict dv,
                                             acc_t* __restrict dx) {
  const int64_t half = T / 2;
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* __restrict gr = g + n * D;
    // Column j of the tile and its g.
    const auto column = [&](int64_t j, acc_t g_j) CASA_LAMBDA_INLINE {
      const int64_t i = n * ld + j;
      const acc_t p = P[i];
      if constexpr (kDv) dv[i] = p * g_j;
      if constexpr (kDs) {
        const acc_t ds = p * (dp[i] - colsum[j]);
        if constexpr (kDx) dx[i] = g_j + ds;
        dp[i] = ds * sigma_prime[i];
      }
    };
    for (int64_t c = 0; c < half; ++c) {
      acc_t g_even, g_odd;
      load_pair(gr, c, g_even, g_odd);
      column(c, g_even);
      column(half + c, g_odd);
    }
  }
}

template <typename acc_t, typename scalar_t>
CASA_INLINE void softmax_backward_grads_impl(const acc_t* P, int64_t ld, int64_t rows, int64_t T,
                                             const scalar_t* g, int64_t D, const acc_t* colsum,
                                             const acc_t* sigma_prime, acc_t* dp, acc_t* dv,
                                             acc_t* dx) {
  const auto run = [&](auto with_dv, auto with_ds, auto with_dx) CASA_LAMBDA_INLINE {
    softmax_backward_grads_loop<decltype(with_dv)::value, decltype(with_ds)::value,
                                decltype(with_dx)::value>(P, ld, rows, T, g, D, colsum, sigma_prime,
                                                          dp, dv, dx);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (dp == nullptr) {
    if (dv != nullptr) run(Yes{}, No{}, No{});
  } else if (dx == nullptr) {
    dv != nullptr ? run(Yes{}, Yes{}, No{}) : run(No{}, Yes{}, No{});
  } else {
    dv != nullptr ? run(Yes{}, Yes{}, Yes{}) : run(No{}, Yes{}, Yes{});
  }
}

// Σ v[c] for c < D, in kLanes independent partial sums so that the compiler vectorises
// the loop (a single running sum is a serial dependency it may not reorder).
constexpr int64_t kLanes = 16;
CASA_INLINE float lane_sum(const float* __restrict lanes) {
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename scalar_t>
CASA_INLINE void layer_norm_rows_impl(const scalar_t* __restrict in, int64_t rows, int64_t D,
                                      const float* __restrict weight, const float* __restrict bias,
                                      float eps, float* __restrict out) {
  const int64_t body = D / kLanes * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict x = in + r * D;
    float* __restrict o = out + r * D;
    float lanes[kLanes] = {};
    for (int64_t c = 0; c < body; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        o[c + l] = load(x, c + l);
        lanes[l] += o[c + l];
      }
    }
    float sum = lane_sum(lanes);
    for (int64_t c = body; c < D; ++c) {
      o[c] = load(x, c);
      sum += o[c];
    }
    const float mean = sum / static_cast<float>(D);
    float square_lanes[kLanes] = {};
    for (int64_t c = 0; c < body; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        o[c + l] -= mean;
        square_lanes[l] += o[c + l] * o[c + l];
      }
    }
    float squares = lane_sum(square_lanes);
    for (int64_t c = body; c < D; ++c) {
      o[c] -= mean;
      squares += o[c] * o[c];
    }
    const float inv_std = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
    for (int64_t c = 0; c < D; ++c) o[c] = o[c] * inv_std * weight[c] + bias[c];
  }
}

CASA_INLINE uint16_t bf16_bits(float v) { return static_cast<uint16_t>(rounded_bf16_bits(v)); }

CASA_INLINE uint16_t bf16_bits_of(uint16_t v) { return v; }
CASA_INLINE uint16_t bf16_bits_of(float v) { return bf16_bits(v); }

CASA_INLINE float stored_as(float v, float*) { return v; }
CASA_INLINE uint16_t stored_as(float v, c10::BFloat16*) { return bf16_bits(v); }

// transpose's body: 16 x 16 blocks through a tile on the stack, filled row by row
// (converted as it is read, which vectorises) and written out column by column.
template <typename out_t>
CASA_INLINE void transpose_impl(const float* __restrict src, int64_t lds, int64_t rows,
                                int64_t cols, out_t* dst, int64_t ldd) {
  constexpr int64_t kTile = 16;
  using bits_t = std::conditional_t<std::is_same_v<out_t, float>, float, uint16_t>;
  bits_t* __restrict out = reinterpret_cast<bits_t*>(dst);
  const auto converted = [](float v) { return stored_as(v, static_cast<out_t*>(nullptr)); };
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      if (r0 + kTile > rows || c0 + kTile > cols) {  // a partial tile at the edge
        for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) {
          for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) {
            out[c * ldd + r] = converted(src[r * lds + c]);
          }
        }
        continue;
      }
      bits_t tile[kTile][kTile];  // [row][column]
      for (int64_t r = 0; r < kTile; ++r) {
        for (int64_t c = 0; c < kTile; ++c) tile[r][c] = converted(src[(r0 + r) * lds + c0 + c]);
      }
      for (int64_t c = 0; c < kTile; ++c) {
        for (int64_t r = 0; r < kTile; ++r) out[(c0 + c) * ldd + r0 + r] = tile[r][c];
      }
    }
  }
}

// One pair of rows of a packed block: out[2c + r] = row_r[c] in bfloat16 for c < width,
// zero up to 2·block.
template <typename src_t>
CASA_INLINE void interleave_row_pair(const src_t* __restrict row0, const src_t* __restrict row1,
                                     int64_t width, int64_t block, uint16_t* __restrict out) {
  for (int64_t c = 0; c < width; ++c) {  // one 32-bit word per pair: this vectorises
    const uint32_t word = bf16_bits_of(row0[c]) | (uint32_t{bf16_bits_of(row1[c])} << 16);
    std::memcpy(out + 2 * c, &word, sizeof(word));
  }
  for (int64_t c = 2 * width; c < 2 * block; ++c) out[c] = 0;
}

template <typename src_t>
CASA_INLINE void interleave_pairs_impl(int64_t K, int64_t N, const src_t* __restrict src,
                                       int64_t ldb, int64_t block, uint16_t* __restrict dst) {
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t width = std::min(block, N - n0);
    for (int64_t k = 0; k < K; k += 2) {
      const src_t* row0 = src + k * ldb + n0;
      interleave_row_pair(row0, row0 + ldb, width, block, dst + n0 * K + k * block);
    }
  }
}

CASA_INLINE void interleave_pairs_bf16_impl(int64_t K, int64_t N, const c10::BFloat16* B,
                                            int64_t ldb, int64_t block, c10::BFloat16* packed) {
  interleave_pairs_impl(K, N, reinterpret_cast<const uint16_t*>(B), ldb, block,
                        reinterpret_cast<uint16_t*>(packed));
}
CASA_INLINE void interleave_pairs_bf16_impl(int64_t K, int64_t N, const float* B, int64_t ldb,
                                            int64_t block, c10::BFloat16* packed) {
  interleave_pairs_impl(K, N, B, ldb, block, reinterpret_cast<uint16_t*>(packed));
}

CASA_INLINE void add_bias_relu_rows_impl(float* io, int64_t rows, int64_t D, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict o = io + r * D;
    for (int64_t c = 0; c < D; ++c) o[c] = relu(o[c] + bias[c]);
  }
}

CASA_INLINE void add_bias_residual_rows_impl(float* io, int64_t rows, int64_t D, const float* bias,
                                             const float* residual) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict o = io + r * D;
    const float* __restrict z = residual + r * D;
    for (int64_t c = 0; c < D; ++c) o[c] += bias[c] + z[c];
  }
}

CASA_INLINE void to_bf16_impl(const float* in, int64_t n, c10::BFloat16* out) {
  uint16_t* __restrict o = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(in[i]);
}

CASA_INLINE void store_rows_impl(const float* in, int64_t n, bool relu_out, float* out) {
  if (relu_out) {
    for (int64_t i = 0; i < n; ++i) out[i] = relu(in[i]);
  } else {
    std::memcpy(out, in, n * sizeof(float));
  }
}

CASA_INLINE void store_rows_impl(const float* in, int64_t n, bool relu_out, c10::BFloat16* out) {
  uint16_t* __restrict o = reinterpret_cast<uint16_t*>(out);
  if (relu_out) {
    for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(relu(in[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(in[i]);
  }
}

template <typename acc_t>
CASA_INLINE void add_parity_rows_impl(acc_t* dst, int64_t ldd, const acc_t* full, int64_t D,
                                      const acc_t* tile, int64_t ld, int64_t o0, int64_t T,
                                      int64_t rows) {
  const int64_t half = T / 2;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* __restrict d = dst + r * ldd;
    if (full != nullptr) {
      const acc_t* __restrict f = full + r * D;
      for (int64_t c = 0; c < D; ++c) d[c] += f[c];
    }
    const acc_t* __restrict t = tile + r * ld;
    acc_t* __restrict out = d + o0;
    for (int64_t c = 0; c < half; ++c) {
      acc_t even, odd;
      load_pair(out, c, even, odd);
      store_pair(out, c, even + t[c], odd + t[half + c]);
    }
  }
}

CASA_INLINE void add_rounded_impl(const float* in, int64_t n, c10::BFloat16* out) {
  uint16_t* __restrict o = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(load(out, i) + in[i]);
}

// bfloat16 dst: the tile added into `full` first, so each element is rounded once.
CASA_INLINE void add_parity_rows_impl(c10::BFloat16* dst, int64_t ldd, float* full, int64_t D,
                                      const float* tile, int64_t ld, int64_t o0, int64_t T,
                                      int64_t rows) {
  add_parity_rows_impl<float>(full, D, nullptr, D, tile, ld, o0, T, rows);
  for (int64_t r = 0; r < rows; ++r) add_rounded_impl(full + r * D, D, dst + r * ldd);
}

template <typename acc_t>
CASA_INLINE void relu_backward_impl(acc_t* io, const acc_t* output, int64_t n) {
  acc_t* __restrict d = io;
  const acc_t* __restrict o = output;
  for (int64_t i = 0; i < n; ++i) d[i] = o[i] <= acc_t(0) ? acc_t(0) : d[i];
}

template <typename acc_t>
CASA_INLINE void add_row_sums_impl(const acc_t* a, int64_t ld, int64_t rows, int64_t cols,
                                   acc_t* out) {
  const int64_t body = cols / kLanes * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* __restrict row = a + r * ld;
    acc_t lanes[kLanes] = {};
    for (int64_t c = 0; c < body; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += row[c + l];
    }
    acc_t total = 0;
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
    for (int64_t c = body; c < cols; ++c) total += row[c];
    out[r] += total;
  }
}

// The tier of this CPU, capped by ATEN_CPU_CAPABILITY ("default", "avx2", "avx512"; any
// other value, like PyTorch, caps nothing).
VectorIsa detect_vector_isa() {
#ifdef CASA_X86_TIERS
  __builtin_cpu_init();
  VectorIsa hardware = VectorIsa::baseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    hardware = VectorIsa::avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      hardware = VectorIsa::avx512;
    }
  }
  VectorIsa cap = VectorIsa::avx512;
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    std::string name(env);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (name == "default") cap = VectorIsa::baseline;
    if (name == "avx2") cap = VectorIsa::avx2;
  }
  return std::min(hardware, cap);
#else
  return VectorIsa::baseline;
#endif
}

}  // namespace

VectorIsa vector_isa() {
  static const VectorIsa isa = detect_vector_isa();
  return isa;
}

const char* vector_isa_name(VectorIsa isa) {
  switch (isa) {
    case VectorIsa::avx512: return "avx512";
    case VectorIsa::avx2: return "avx2";
    default: return "baseline";
  }
}

// One public overload `name params`, its body `impl args`: CASA_ONE_TIER compiles it once
// (the double versions: their exp is std::exp, which does not vectorise); CASA_THREE_TIERS
// compiles it for AVX-512, AVX2 + FMA and baseline x86-64 and runs the one vector_isa() names.
#define CASA_ONE_TIER(name, impl, params, args) \
  void name params { impl args; }
#ifdef CASA_X86_TIERS
#define CASA_THREE_TIERS(name, impl, params, args)                                             \
  __attribute__((target(                                                                       \
      "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))) static void name##_avx512 params { \
    impl args;                                                                                 \
  }                                                                                            \
  __attribute__((target("avx2,fma,f16c"))) static void name##_avx2 params { impl args; }       \
  static void name##_baseline params { impl args; }                                            \
  void name params {                                                                           \
    switch (vector_isa()) {                                                                    \
      case VectorIsa::avx512: return name##_avx512 args;                                       \
      case VectorIsa::avx2: return name##_avx2 args;                                           \
      default: return name##_baseline args;                                                    \
    }                                                                                          \
  }
#else
#define CASA_THREE_TIERS CASA_ONE_TIER
#endif

#define CASA_LAYER_NORM(scalar_t)                                                     \
  CASA_THREE_TIERS(layer_norm_rows, layer_norm_rows_impl,                             \
                   (const scalar_t* in, int64_t rows, int64_t D, const float* weight, \
                    const float* bias, float eps, float* out),                        \
                   (in, rows, D, weight, bias, eps, out))
CASA_LAYER_NORM(float)
CASA_LAYER_NORM(c10::BFloat16)

#define CASA_TRANSPOSE(out_t)                                                               \
  CASA_THREE_TIERS(                                                                         \
      transpose, transpose_impl,                                                            \
      (const float* src, int64_t lds, int64_t rows, int64_t cols, out_t* dst, int64_t ldd), \
      (src, lds, rows, cols, dst, ldd))
CASA_TRANSPOSE(float)
CASA_TRANSPOSE(c10::BFloat16)

#define CASA_INTERLEAVE(src_t)                                                                   \
  CASA_THREE_TIERS(                                                                              \
      interleave_pairs_bf16, interleave_pairs_bf16_impl,                                         \
      (int64_t K, int64_t N, const src_t* B, int64_t ldb, int64_t block, c10::BFloat16* packed), \
      (K, N, B, ldb, block, packed))
CASA_INTERLEAVE(c10::BFloat16)
CASA_INTERLEAVE(float)

CASA_THREE_TIERS(add_bias_relu_rows, add_bias_relu_rows_impl,
                 (float* io, int64_t rows, int64_t D, const float* bias), (io, rows, D, bias))
CASA_THREE_TIERS(add_bias_residual_rows, add_bias_residual_rows_impl,
                 (float* io, int64_t rows, int64_t D, const float* bias, const float* residual),
                 (io, rows, D, bias, residual))
CASA_THREE_TIERS(to_bf16, to_bf16_impl, (const float* in, int64_t n, c10::BFloat16* out),
                 (in, n, out))

#define CASA_STORE_ROWS(out_t)                                              \
  CASA_THREE_TIERS(store_rows, store_rows_impl,                             \
                   (const float* in, int64_t n, bool relu_out, out_t* out), \
                   (in, n, relu_out, out))
CASA_STORE_ROWS(float)
CASA_STORE_ROWS(c10::BFloat16)

#define CASA_IM2COL(TIERS, acc_t, scalar_t)                                               \
  TIERS(im2col_s2, im2col_impl,                                                           \
        (const scalar_t* src, int64_t ld, int64_t rows, int64_t L, int64_t k, acc_t* dst, \
         int64_t dst_ld),                                                                 \
        (src, ld, rows, L, k, dst, dst_ld))
CASA_IM2COL(CASA_THREE_TIERS, float, float)
CASA_IM2COL(CASA_THREE_TIERS, float, c10::BFloat16)
CASA_IM2COL(CASA_ONE_TIER, c10::BFloat16, c10::BFloat16)
CASA_IM2COL(CASA_ONE_TIER, double, double)

#define CASA_COL2IM(TIERS, acc_t)                                                               \
  TIERS(col2im_relu_s2, col2im_relu_impl,                                                       \
        (const acc_t* cols, int64_t ldc, int64_t rows, int64_t k, int64_t L, const acc_t* bias, \
         acc_t* out, int64_t ldo),                                                              \
        (cols, ldc, rows, k, L, bias, out, ldo))
CASA_COL2IM(CASA_THREE_TIERS, float)
CASA_COL2IM(CASA_ONE_TIER, double)

#define CASA_ADD_BIAS_RELU(TIERS, acc_t)                                          \
  TIERS(add_bias_relu, add_bias_relu_impl,                                        \
        (acc_t * out, int64_t ld, int64_t rows, int64_t cols, const acc_t* bias), \
        (out, ld, rows, cols, bias))
CASA_ADD_BIAS_RELU(CASA_THREE_TIERS, float)
CASA_ADD_BIAS_RELU(CASA_ONE_TIER, double)

#define CASA_SOFTMAX(TIERS, acc_t, scalar_t)                                                      \
  TIERS(softmax_numerators, softmax_numerators_impl,                                              \
        (acc_t * scores, int64_t ld, const acc_t* score_bias, int64_t rows, int64_t T,            \
         const scalar_t* x, int64_t D, acc_t* shift, acc_t* sum),                                 \
        (scores, ld, score_bias, rows, T, x, D, shift, sum))                                      \
  TIERS(softmax_output, softmax_output_impl,                                                      \
        (const acc_t* numerators, int64_t ld, const acc_t* values, int64_t ldv,                   \
         const acc_t* value_bias, const acc_t* scale, int64_t rows, int64_t T, const scalar_t* x, \
         scalar_t* y, int64_t D),                                                                 \
        (numerators, ld, values, ldv, value_bias, scale, rows, T, x, y, D))
CASA_SOFTMAX(CASA_THREE_TIERS, float, float)
CASA_SOFTMAX(CASA_THREE_TIERS, float, c10::BFloat16)
CASA_SOFTMAX(CASA_ONE_TIER, double, double)

#define CASA_SOFTMAX_BACKWARD(TIERS, acc_t, scalar_t)                                        \
  TIERS(softmax_backward_weights, softmax_backward_weights_impl,                             \
        (acc_t * scores, int64_t ld, const acc_t* score_bias, int64_t rows, int64_t T,       \
         const scalar_t* x, const scalar_t* g, int64_t D, const acc_t* col_max,              \
         const acc_t* col_sum, const acc_t* values, const acc_t* value_bias, acc_t* dp,      \
         acc_t* sigma_prime, acc_t* colsum),                                                 \
        (scores, ld, score_bias, rows, T, x, g, D, col_max, col_sum, values, value_bias, dp, \
         sigma_prime, colsum))                                                               \
  TIERS(softmax_backward_grads, softmax_backward_grads_impl,                                 \
        (const acc_t* P, int64_t ld, int64_t rows, int64_t T, const scalar_t* g, int64_t D,  \
         const acc_t* colsum, const acc_t* sigma_prime, acc_t* dp, acc_t* dv, acc_t* dx),    \
        (P, ld, rows, T, g, D, colsum, sigma_prime, dp, dv, dx))
CASA_SOFTMAX_BACKWARD(CASA_THREE_TIERS, float, float)
CASA_SOFTMAX_BACKWARD(CASA_THREE_TIERS, float, c10::BFloat16)
CASA_SOFTMAX_BACKWARD(CASA_ONE_TIER, double, double)

#define CASA_BLOCK_SCALES(TIERS, acc_t)                                                            \
  TIERS(                                                                                           \
      softmax_merge_blocks, softmax_merge_blocks_impl,                                             \
      (const acc_t* shift, const acc_t* sum, int64_t blocks, int64_t T, acc_t* top, acc_t* total), \
      (shift, sum, blocks, T, top, total))                                                         \
  TIERS(softmax_scales, softmax_scales_impl,                                                       \
        (acc_t * shift, int64_t blocks, int64_t T, const acc_t* top, const acc_t* total),          \
        (shift, blocks, T, top, total))
CASA_BLOCK_SCALES(CASA_THREE_TIERS, float)
CASA_BLOCK_SCALES(CASA_ONE_TIER, double)

#define CASA_BACKWARD_ROWS(TIERS, acc_t)                                                        \
  TIERS(add_parity_rows, add_parity_rows_impl,                                                  \
        (acc_t * dst, int64_t ldd, const acc_t* full, int64_t D, const acc_t* tile, int64_t ld, \
         int64_t o0, int64_t T, int64_t rows),                                                  \
        (dst, ldd, full, D, tile, ld, o0, T, rows))                                             \
  TIERS(add_row_sums, add_row_sums_impl,                                                        \
        (const acc_t* a, int64_t ld, int64_t rows, int64_t cols, acc_t* out),                   \
        (a, ld, rows, cols, out))                                                               \
  TIERS(relu_backward, relu_backward_impl, (acc_t * io, const acc_t* output, int64_t n),        \
        (io, output, n))
CASA_BACKWARD_ROWS(CASA_THREE_TIERS, float)
CASA_THREE_TIERS(add_rounded, add_rounded_impl, (const float* in, int64_t n, c10::BFloat16* out),
                 (in, n, out))
CASA_THREE_TIERS(add_parity_rows, add_parity_rows_impl,
                 (c10::BFloat16 * dst, int64_t ldd, float* full, int64_t D, const float* tile,
                  int64_t ld, int64_t o0, int64_t T, int64_t rows),
                 (dst, ldd, full, D, tile, ld, o0, T, rows))
CASA_BACKWARD_ROWS(CASA_ONE_TIER, double)

}  // namespace cpu
}  // namespace casa
