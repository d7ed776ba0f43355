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

}  // namespace cpu
}  // namespace casa
