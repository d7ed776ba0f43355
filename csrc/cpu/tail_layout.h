// The column tiles of the CPU kernel's tail (docs/design.md §5.3), shared by the forward
// (score_attention_cpu.cpp) and the backward (backward.cpp): how wide a tile is, the
// order of its columns in the tile's buffers, and the tail's weights in that layout
// (PreparedIndex).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "channels_last.h"  // parity_taps
#include "vectorised.h"     // transpose

namespace casa {

// The weights re-laid out for the kernel's GEMMs (cpu_prepare_weights, cpu_prepare_tail),
// prepared once per weight version (the Python backend caches them,
// casa_kernels/ops/weight_cache.py), as a list of tensors in this order; the backward
// (backward.cpp) takes the tail's from the forward's list:
enum PreparedIndex : int {
  kDec2Even,
  kDec2Odd,           // [N, |taps[q]|·D/4]: (n, (jj, c)) = dec2_weight[c, n, taps[q][jj]]
  kValueWeightT,      // [D, D]: Wv^T, columns in tile_parity_order; with bf16_gemm,
                      // packed (cpu::pack_bf16) tile by tile
  kValueBiasOrdered,  // [D]: bv in tile_parity_order (acc_t)
  kEnc1Gemm,
  kEnc2Gemm,  // [Cout, Cin·k]: the bottleneck convs' weights as left operands (acc_t);
              // on AMX, cpu::pack_conv_s2_weight
  kDec0Gemm,
  kDec1Gemm,     // [Cout·k, Cin]: the transposed convs' weights, transposed (acc_t);
                 // on AMX, cpu::pack_conv_transpose_s2_weight
  kNumPrepared,  // then, for bfloat16 input, the 14 weights in fp32
};
// The tail's GEMM operands (dec2 by parity, Wv^T) are bfloat16 with bf16_gemm, acc_t
// otherwise, all contiguous; kEnc1Gemm and kEnc2Gemm are views of the caller's weights
// where no cast is due.

namespace cpu {

// The widest tile of a tail that splits the D columns (docs/design.md §5.3). A worker's
// [N, T] buffers (one in the forward, three in the backward) shrink with T; on the AVX2
// Zen 3, 128 columns ran about as fast as 256 up to N = 3000, forward and backward. From
// kWideSplitRows variates on, a forward whose layouts no backward takes splits into
// tiles of up to kWideSplitTileMax columns (N = 4096 to 16384: 1.06–1.12× faster than
// 128), each tile reading all of x[b] for its value GEMM; the backward's layouts keep 128.
constexpr int64_t kSplitTileMax = 128;
constexpr int64_t kWideSplitTileMax = 256;
constexpr int64_t kWideSplitRows = 4096;
// From this many variates on, a backward's tiles are split (at most kSplitTileMax columns)
// whatever the batch: below it a worker's three [N, D] buffers (under 3 MiB at D = 512)
// weigh little against the backward's peak (ECL, B = 16, bf16: 33.4 MiB whole, 31.9 split),
// and the narrower tiles cost 3-4% in bf16 (Weather and ECL, B = 16).
constexpr int64_t kNarrowBackwardRows = 512;

// Tail tile width T (even, at most D) for B batch elements of N variates: for a forward
// alone, the whole width when the batch alone keeps the threads evenly busy, as each tile
// reads all of x[b] for its value GEMM; otherwise the widest of at most kSplitTileMax
// columns (kWideSplitTileMax for a forward alone from N = kWideSplitRows on) that splits
// the D columns into enough tiles, with at most 1/8 of the threads' time idle.
// for_backward: a backward will take the layouts prepared for T (the training forward, the
// backward, the stages), which from N = kNarrowBackwardRows on never exceed kSplitTileMax
// columns: the backward's three [N, T] buffers per worker at T = D were its peak
// (docs/design.md §5.3).
inline int64_t tail_tile_width(int64_t B, int64_t N, int64_t D, int64_t threads,
                               bool for_backward) {
  const int64_t split_max =
      !for_backward && N >= kWideSplitRows ? kWideSplitTileMax : kSplitTileMax;
  const bool narrow_backward = for_backward && N >= kNarrowBackwardRows;
  for (int64_t tiles = 1;; ++tiles) {
    const int64_t T = ((D + tiles - 1) / tiles + 1) / 2 * 2;
    if ((tiles > 1 || narrow_backward) && T > split_max) continue;
    const int64_t items = B * ((D + T - 1) / T);
    const int64_t slots = (items + threads - 1) / threads * threads;
    if (T == 2 || 8 * (slots - items) <= slots) return T;
  }
}

// For each tail tile [o0, o0 + T) of the D output columns: o0 + 2c at position o0 + c
// and o0 + 2c + 1 at position o0 + T/2 + c (c < T/2), the order of the tail's GEMMs.
inline std::vector<int64_t> tile_parity_order(int64_t D, int64_t tile) {
  std::vector<int64_t> order(D);
  for (int64_t o0 = 0; o0 < D; o0 += tile) {
    const int64_t half = std::min(tile, D - o0) / 2;
    for (int64_t c = 0; c < half; ++c) {
      order[o0 + c] = o0 + 2 * c;
      order[o0 + half + c] = o0 + 2 * c + 1;
    }
  }
  return order;
}

// The transpose [cols, rows] of a [rows, cols] matrix, contiguous: fp32 by the blocked
// cpu::transpose (ATen's strided copy is several times slower), other dtypes by ATen. For
// weights re-laid out as GEMM operands, once per weight version or on every call.
inline at::Tensor transposed(const at::Tensor& m) {
  if (m.scalar_type() != at::kFloat) return m.t().contiguous();
  const at::Tensor src = m.contiguous();
  const int64_t rows = src.size(0), cols = src.size(1);
  at::Tensor out = at::empty({cols, rows}, src.options());
  transpose(src.data_ptr<float>(), cols, rows, cols, out.data_ptr<float>(), rows);
  return out;
}

// out[r, c] = src[row_of[c]·ld + column_of[r]] for r < column_of.size(), c < row_of.size():
// selected columns of src become rows of out (a gather and a transpose in one pass),
// in blocks of out rows whose lines stay in cache while a block is filled.
template <typename T>
at::Tensor transpose_gather(const at::Tensor& src, int64_t ld, const std::vector<int64_t>& row_of,
                            const std::vector<int64_t>& column_of) {
  constexpr int64_t kBlock = 16;
  const int64_t R = static_cast<int64_t>(column_of.size()), C = static_cast<int64_t>(row_of.size());
  at::Tensor out = at::empty({R, C}, src.options());
  const T* in = src.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, (R + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = b0 * kBlock; r0 < std::min(R, b1 * kBlock); r0 += kBlock) {
      const int64_t r1 = std::min(R, r0 + kBlock);
      for (int64_t c = 0; c < C; ++c) {
        const T* row = in + row_of[c] * ld;
        for (int64_t r = r0; r < r1; ++r) o[r * C + c] = row[column_of[r]];
      }
    }
  });
  return out;
}

// The columns of dec2_weight [C1, N, k] viewed as [C1, N·k] that output parity q's GEMM
// takes, in the order (n, jj): with transpose_gather over all C1 rows, dec2 by parity
// [N, |taps_q|·C1], (n, (jj, c)) = dec2_weight[c, n, taps_q[jj]].
inline std::vector<int64_t> dec2_parity_columns(int64_t N, int64_t k, int64_t q) {
  std::vector<int64_t> columns;
  for (int64_t n = 0; n < N; ++n) {
    for (const int64_t j : parity_taps(k, q)) columns.push_back(n * k + j);
  }
  return columns;
}

// The h5 columns that output parity q's tap `tap` reads for the tile at o0: output
// o0 + 2u + q reads input first + u, and only u in [u0, u1) lie inside [0, L) (L = D/2);
// the rest are the transposed conv's zero padding. Shared by the forward's right operand
// (gather_parity_window) and the backward's adjoint of it.
struct ParityWindow {
  int64_t first, u0, u1;
};
inline ParityWindow parity_window(int64_t o0, int64_t q, int64_t padding, int64_t tap, int64_t half,
                                  int64_t L) {
  const int64_t first = o0 / 2 + (q + padding - tap) / 2;
  const int64_t u0 = std::clamp<int64_t>(-first, 0, half);
  return {first, u0, std::clamp<int64_t>(L - first, u0, half)};
}

// The right operand of the last transposed conv for the tile's outputs of parity q,
// o0 + 2u + q for u < half: rhs[(jj, c), u] = h5_b[c, first + u] (first from
// parity_window for tap taps_q[jj]), zero outside [0, L); rows of rhs ld apart, rows of
// h5_b ([C1, L]) h5_ld apart. Returns K = taps_q.size() · C1, the rows written.
template <typename T>
int64_t gather_parity_window(const T* h5_b, int64_t h5_ld, const std::vector<int64_t>& taps_q,
                             int64_t q, int64_t o0, int64_t half, int64_t padding, int64_t C1,
                             int64_t L, T* rhs, int64_t ld) {
  for (size_t jj = 0; jj < taps_q.size(); ++jj) {
    const auto [first, u0, u1] = parity_window(o0, q, padding, taps_q[jj], half, L);
    for (int64_t c = 0; c < C1; ++c) {
      T* row = rhs + (static_cast<int64_t>(jj) * C1 + c) * ld;
      std::fill(row, row + u0, T(0));
      std::copy(h5_b + c * h5_ld + first + u0, h5_b + c * h5_ld + first + u1, row + u0);
      std::fill(row + u1, row + half, T(0));
    }
  }
  return static_cast<int64_t>(taps_q.size()) * C1;
}

}  // namespace cpu
}  // namespace casa
