// The column tiles of the CPU kernel's tail (docs/design.md §5.3), shared by the forward
// (score_attention_cpu.cpp) and the backward (backward.cpp): how wide a tile is and the
// order of its columns in the tile's buffers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace casa {
namespace cpu {

// Tail tile width T (even, at most D): the whole width when the batch alone keeps the
// threads evenly busy, as each tile reads all of x[b] for its value GEMM; otherwise
// the widest that splits the D columns into enough tiles, with at most 1/8 of the
// threads' time idle. A worker's scores, N·T values, stay within one [N, D] buffer.
inline int64_t tail_tile_width(int64_t B, int64_t D, int64_t threads) {
  for (int64_t tiles = 1;; ++tiles) {
    const int64_t T = ((D + tiles - 1) / tiles + 1) / 2 * 2;
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
