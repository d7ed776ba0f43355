// The launch plan of the CUDA kernels (score_attention_kernels.cu): how N is split, and
// the grid, block size and dynamic shared memory of every launch, as pure functions of
// the problem sizes. Plain C++17, free of CUDA and torch headers: the launcher uses it,
// and the static GPU cost model (bench/cost_model) compiles it with a host compiler to
// read the same plan without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

namespace casa {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Problem sizes; D % 8 == 0 and k odd (checked by the binding).
struct Problem {
  int64_t batch, n_vars, d_model, kernel;
};

// How N is split across blocks. head_splits: blocks sharing the N reduction of the
// encoder head (each at least 32 variates, about two blocks per SM when B is small);
// tail_splits: the tail's 128-row tiles, ⌈N/128⌉ (launch_fused_score_attention rejects
// another value).
struct Plan {
  int head_splits, tail_splits;
};

// ---------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------

constexpr int kTailThreads = 256;       // 8 warps, 4 x 2 over the tile
constexpr int kTailRows = 128;          // variates per tail CTA (BLOCK_N)
constexpr int kTailCols = 128;          // contiguous output columns per tail CTA (BLOCK_D)
constexpr int kTailLd = kTailCols + 4;  // fp32 row stride of the score/probability tile
constexpr int kValueStages = 3;         // cp.async pipeline depth of the value projection
constexpr int kHeadThreads = 256;       // head: 128 (channels) x 128 (positions) tiles
constexpr int kHeadRows = 128;
constexpr int kHeadCols = 128;
constexpr int kConvThreads = 128;  // bottleneck: 64 x 64 tiles, 4 warps (2 x 2)
constexpr int kConvRows = 64;
constexpr int kConvCols = 64;
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxHeadSplits = 32;

constexpr int dtype_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Operand tiles of elements of `elem_bytes`: 16-byte vectors, a K step of 4 vectors (64
// bytes), shared rows padded by one vector (rows stay 16-byte aligned for cp.async and
// shift banks between rows).
constexpr int operand_vec(int elem_bytes) { return 16 / elem_bytes; }
constexpr int operand_bk(int elem_bytes) { return 4 * operand_vec(elem_bytes); }
constexpr int operand_ld(int elem_bytes) {
  return operand_bk(elem_bytes) + operand_vec(elem_bytes);
}

// Bytes of shared operand stages: `stages` x (rows_a + rows_b) rows of operand_ld elements.
constexpr int operand_bytes(int elem_bytes, int rows_a, int rows_b, int stages) {
  return stages * (rows_a + rows_b) * operand_ld(elem_bytes) * elem_bytes;
}

// Shared memory of the tail kernels: the fp32 tile P [kTailRows][kTailLd], the column
// statistics [kTailCols], then the operand stages.
constexpr int kTailPBytes = kTailRows * kTailLd * 4 + kTailCols * 8;
constexpr int tail_smem_bytes(int elem_bytes, bool with_value) {
  const int scores = operand_bytes(elem_bytes, kTailRows, kTailCols / 2, 2);
  const int value = operand_bytes(elem_bytes, kTailRows, kTailCols, kValueStages);
  return kTailPBytes + (with_value && value > scores ? value : scores);
}

// ---------------------------------------------------------------------------------
// Splits
// ---------------------------------------------------------------------------------

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per split of N for `splits` splits: equal chunks, a multiple of `multiple`.
inline int chunk_rows(int64_t N, int64_t splits, int64_t multiple) {
  return static_cast<int>(ceil_div(ceil_div(N, splits), multiple) * multiple);
}

inline int64_t tail_tiles(int64_t N) { return ceil_div(N, kTailRows); }

// Blocks of the head's grid for `splits`.
inline int64_t head_blocks(const Problem& p, int64_t splits) {
  return ceil_div(p.d_model / 2, kHeadCols) * ceil_div(p.d_model / 4, kHeadRows) * splits * p.batch;
}

// Blocks of a tail launch.
inline int64_t tail_blocks(const Problem& p) {
  return ceil_div(p.d_model, kTailCols) * tail_tiles(p.n_vars) * p.batch;
}

// Splits of N giving about `target` blocks (per_split blocks each), at least
// `min_rows` rows per split, at most `most` splits, and no empty split.
inline int64_t choose_splits(int64_t N, int64_t per_split, int64_t target, int64_t min_rows,
                             int64_t most) {
  const int64_t wanted = ceil_div(target, per_split);
  const int64_t splits = std::max<int64_t>(1, std::min({wanted, most, N / min_rows}));
  return ceil_div(N, chunk_rows(N, splits, 1));
}

inline Plan make_plan(const Problem& p, int sm_count) {
  const int64_t target = 2 * static_cast<int64_t>(std::max(sm_count, 1));
  Plan plan;
  plan.head_splits =
      static_cast<int>(choose_splits(p.n_vars, head_blocks(p, 1), target, 32, kMaxHeadSplits));
  plan.tail_splits = static_cast<int>(tail_tiles(p.n_vars));
  return plan;
}

// ---------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------

// One launch: its kernel's name, blocks (one-dimensional grid), threads per block and
// dynamic shared memory bytes per block.
struct Launch {
  const char* kernel;
  int64_t blocks;
  int threads;
  int smem_bytes;
};

// Every launch of one call, in launch order (kLaunches of them).
struct LaunchPlan {
  Launch head, head_reduce, enc1, enc2, dec0, dec1, tail_stats, tail_merge, tail_output;
};
constexpr int kLaunches = 9;

// Blocks of a grid-stride elementwise launch over `total` elements.
inline int64_t elementwise_blocks(int64_t total) {
  return std::min<int64_t>(ceil_div(total, kReduceThreads), 65536);
}

inline LaunchPlan plan_launches(const Problem& p, const Plan& plan, DType dtype) {
  const int64_t B = p.batch, D = p.d_model, C1 = D / 4, C2 = D / 2;
  const int e = dtype_bytes(dtype);
  const int conv_smem = operand_bytes(e, kConvRows, kConvCols, 2);
  // A bottleneck conv: column tiles over `cols` output positions (a transposed conv's per
  // output parity, i.e. its input length), row tiles over `cout` channels, per parity and
  // batch element.
  auto conv = [&](const char* name, int64_t cols, int64_t cout, int64_t parities) {
    return Launch{name, ceil_div(cols, kConvCols) * ceil_div(cout, kConvRows) * parities * B,
                  kConvThreads, conv_smem};
  };
  const int64_t tail = tail_blocks(p);
  LaunchPlan lp;
  lp.head = {"head_kernel", head_blocks(p, plan.head_splits), kHeadThreads,
             operand_bytes(e, kHeadRows, kHeadCols, 2)};
  lp.head_reduce = {"head_reduce_kernel", elementwise_blocks(B * D * D / 8), kReduceThreads, 0};
  lp.enc1 = conv("conv_s2_relu_kernel", D / 4, C2, 1);
  lp.enc2 = conv("conv_s2_relu_kernel", D / 8, D, 1);
  lp.dec0 = conv("conv_transpose_s2_relu_kernel", D / 8, C2, 2);
  lp.dec1 = conv("conv_transpose_s2_relu_kernel", D / 4, C1, 2);
  lp.tail_stats = {"tail_stats_kernel", tail, kTailThreads, tail_smem_bytes(e, false)};
  lp.tail_merge = {"tail_merge_kernel", elementwise_blocks(B * D), kReduceThreads, 0};
  lp.tail_output = {"tail_output_kernel", tail, kTailThreads, tail_smem_bytes(e, true)};
  return lp;
}

}  // namespace gpu
}  // namespace casa
