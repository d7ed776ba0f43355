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
// (parity_rhs) and the backward's gather and its adjoint.
struct ParityWindow {
  int64_t first, u0, u1;
};
inline ParityWindow parity_window(int64_t o0, int64_t q, int64_t padding, int64_t tap, int64_t half,
                                  int64_t L) {
  const int64_t first = o0 / 2 + (q + padding - tap) / 2;
  const int64_t u0 = std::clamp<int64_t>(-first, 0, half);
  return {first, u0, std::clamp<int64_t>(L - first, u0, half)};
}

}  // namespace cpu
}  // namespace casa
