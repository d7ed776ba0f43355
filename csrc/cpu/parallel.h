// The CPU kernel's parallel loops: how many threads a piece of work is worth, and
// at::parallel_for for bodies that call ATen or the BLAS.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

#include "sequential_blas.h"

namespace casa {
namespace cpu {

constexpr int64_t kMinMacsPerThread = 1 << 18;  // threads_for: work worth a thread

// The threads a piece of work of `macs` multiply-adds is worth: one per kMinMacsPerThread,
// at most all of them. Below that a parallel region costs more than it saves
// (docs/design.md §5.3).
inline int64_t threads_for(int64_t macs) {
  return std::clamp<int64_t>(macs / kMinMacsPerThread, 1, at::get_num_threads());
}

// The row blocks of `rows` rows for `threads` workers: at most `max_rows` rows each, their
// count a multiple of the workers, so that each worker gets as many blocks of nearly equal
// rows (137 rows on 2 threads, at most 64 a block: 4 blocks of 35 or 32, where 64-row
// blocks gave one worker 128 rows and the other 9). A block has ceil(rows / count) rows,
// so the last ones of a rounded-up count can be empty.
inline int64_t row_blocks(int64_t rows, int64_t max_rows, int64_t threads) {
  const int64_t blocks = (rows + max_rows - 1) / max_rows;
  return std::min(rows, (blocks + threads - 1) / threads * threads);
}

// at::parallel_for for bodies that call ATen ops: each worker takes the caller's
// thread-local state (below-autograd dispatch, inference mode — OpenMP workers do not
// inherit it) and keeps the BLAS single-threaded (sequential_blas.h).
template <typename F>
void parallel_for_aten(int64_t end, int64_t grain, const F& body) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, end, grain, [&](int64_t begin, int64_t stop) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const SequentialBlasGuard sequential_blas;
    body(begin, stop);
  });
}

}  // namespace cpu
}  // namespace casa
