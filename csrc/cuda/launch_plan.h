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

// The four bottleneck convs, in launch order (enc1, enc2, dec0, dec1).
constexpr int kBottleneckLayers = 4;

// How the work is split across blocks. head_splits: blocks sharing the N reduction of the
// encoder head (each at least 32 variates, the grid capped at the resident CTAs);
// conv_splits: per bottleneck conv, blocks sharing its input channels (split-K, 1 when
// its tiles alone give every SM a block; conv_splits_for); tail_splits: the tail's
// kTailRows-row tiles, ⌈N/kTailRows⌉ (launch_fused_score_attention rejects another
// value); tail_cols: the output columns of a tail CTA, one of kTailColOptions
// (tail_cols_for).
struct Plan {
  int head_splits, conv_splits[kBottleneckLayers], tail_splits, tail_cols;
};

// ---------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------

// The tail: kTailRows x tail_cols tiles of 8 warps (4 x 2 over the tile), two CTAs per
// SM (shared memory at most about 87 KiB per CTA, kTailBlocksPerSm of them within an
// H100's 228 KiB, one within the 99 KiB of sm_86/sm_89 GPUs). The tile's column count is
// chosen per launch among kTailColOptions (tail_cols_for): narrower tiles cut the last,
// partial wave of CTAs where the wide tiles leave one.
constexpr int kTailThreads = 256;    // 8 warps, 4 x 2 over the tile
constexpr int kTailBlocksPerSm = 2;  // the tail kernels' __launch_bounds__ minimum
constexpr int kTailRows = 64;        // variates per tail CTA (BLOCK_N)
// Contiguous output columns per tail CTA (BLOCK_D), widest first; each instantiated.
constexpr int kTailColOptions[] = {128, 64};
constexpr int kTailMaxCols = kTailColOptions[0];
// fp32 row stride of the score/probability tile of a tile of `cols` columns.
constexpr int tail_ld(int cols) { return cols + 4; }
constexpr int kValueStages = 3;      // cp.async pipeline depth of the value projection
constexpr int kTailScoreStages = 2;  // cp.async pipeline depth of the tail's score GEMM
// The head and the four bottleneck convs share one conv kernel: 32 (output channels) x 64
// (output positions, per parity for a transposed conv) tiles, 4 warps (2 x 2), a
// kConvStages-deep cp.async pipeline over K steps of operand_bk input channels.
constexpr int kConvThreads = 128;
constexpr int kConvRows = 32;
constexpr int kConvCols = 64;
constexpr int kConvStages = 3;
// Head CTAs planned per SM: the CTAs of the conv kernel resident at once on every
// supported GPU (its shared memory, at most conv_smem_bytes for k = 7, fits twice in 164
// KiB), so the head's split-K grid runs in one wave.
constexpr int kHeadBlocksPerSm = 2;
constexpr int kReduceThreads = 256;
constexpr int kMergeBatch = 8;  // row tiles' statistics the tail's merge loads at once
constexpr int64_t kMaxHeadSplits = 32;
// Split-K of a bottleneck conv: at most kMaxConvSplits blocks share a tile's input
// channels (the last to finish sums their fp32 partials, all loaded at once).
constexpr int kMaxConvSplits = 4;
// Input channels (the head: variates) per split come in multiples of the 16-bit K step,
// 32 (a multiple of fp32's 16).
constexpr int kSplitChannels = 32;

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

// Conv kernel sizes. The kernel sizes k instantiated (others are rejected by
// problem_supported).
constexpr bool kernel_instantiated(int64_t k) { return k == 1 || k == 3 || k == 5 || k == 7; }

// Taps staged per K step: all k for a stride-2 conv; for a transposed conv the taps of one
// output parity, at most (k + 1) / 2.
constexpr int conv_staged_taps(int k, bool transposed) { return transposed ? (k + 1) / 2 : k; }

// Positions of the input halo tile of a CTA with `cols` output positions (per parity for
// a transposed conv): a stride-2 conv reads 2·cols inputs, a transposed conv cols; plus
// one 16-byte vector each side (the taps reach at most 3 positions beyond, k <= 7).
constexpr int conv_halo(int elem_bytes, bool transposed, int cols = kConvCols) {
  return (transposed ? cols : 2 * cols) + 2 * operand_vec(elem_bytes);
}
// Row stride (elements) of the halo tile in shared memory: padded by one vector.
constexpr int conv_halo_ld(int elem_bytes, bool transposed, int cols = kConvCols) {
  return conv_halo(elem_bytes, transposed, cols) + operand_vec(elem_bytes);
}
// Elements of one pipeline stage of a rows x cols tile: the staged taps' weight tiles
// [taps][rows][operand_ld] and the halo tile [operand_bk][conv_halo_ld].
constexpr int conv_stage_elems(int elem_bytes, int k, bool transposed, int rows = kConvRows,
                               int cols = kConvCols) {
  return conv_staged_taps(k, transposed) * rows * operand_ld(elem_bytes) +
         operand_bk(elem_bytes) * conv_halo_ld(elem_bytes, transposed, cols);
}
constexpr int conv_smem_bytes(int elem_bytes, int k, bool transposed, int rows = kConvRows,
                              int cols = kConvCols, int stages = kConvStages) {
  return stages * conv_stage_elems(elem_bytes, k, transposed, rows, cols) * elem_bytes;
}

// Shared memory of the tail kernels with tiles of `cols` columns: the fp32 tile P
// [kTailRows][tail_ld(cols)], the column statistics [cols], then the operand stages: the
// score GEMM's (the last transposed conv per output parity, a kTailRows x cols/2 conv
// tile, kTailScoreStages deep) or, in the output kernel, the larger of those and the
// value GEMM's.
constexpr int tail_p_bytes(int cols) { return kTailRows * tail_ld(cols) * 4 + cols * 8; }
constexpr int tail_smem_bytes(int elem_bytes, int k, bool with_value, int cols) {
  const int scores = conv_smem_bytes(elem_bytes, k, true, kTailRows, cols / 2, kTailScoreStages);
  const int value = operand_bytes(elem_bytes, kTailRows, cols, kValueStages);
  return tail_p_bytes(cols) + (with_value && value > scores ? value : scores);
}

// Layouts in device memory that the conv kernel's 16-byte copies read.
//
// Activations (h1..h5, [B, C, L] in the dtype of x): rows padded to padded_length(L)
// elements, the padding zero (written by the producing kernel), so every 16-byte vector
// of a row is aligned and reads as the conv's zero padding beyond L.
//
// Conv weights, packed per tap (the weight cache prepares them once per weight version,
// the binding otherwise): element (co, ci, j) of a conv weight [Cout, Cin, k], or (ci,
// co, j) of a transposed conv weight [Cin, Cout, k], at (j · Cout + co) · packed_row(Cin)
// + ci, the row padding zero: one [Cout, Cin] matrix per tap, rows 16-byte aligned.
constexpr int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
constexpr int64_t padded_length(int64_t L, int elem_bytes) {
  return round_up(L, operand_vec(elem_bytes));
}
constexpr int64_t packed_row(int64_t cin, int elem_bytes) {
  return round_up(cin, operand_vec(elem_bytes));
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

// A bottleneck conv: input channels and length, output channels and length, and whether
// it is a stride-2 transposed conv (else a stride-2 conv).
struct ConvLayer {
  int64_t cin, lin, cout, lout;
  bool transposed;
};

// Bottleneck conv `i` (0..3): enc1 (C1 -> C2, D/2 -> D/4), enc2 (C2 -> D, D/4 -> D/8),
// dec0 (D -> C2, D/8 -> D/4, transposed), dec1 (C2 -> C1, D/4 -> D/2, transposed).
inline ConvLayer bottleneck_layer(const Problem& p, int i) {
  const int64_t D = p.d_model, C1 = D / 4, C2 = D / 2;
  const ConvLayer layers[kBottleneckLayers] = {{C1, D / 2, C2, D / 4, false},
                                               {C2, D / 4, D, D / 8, false},
                                               {D, D / 8, C2, D / 4, true},
                                               {C2, D / 4, C1, D / 2, true}};
  return layers[i];
}

// Output tiles of a conv layer: kConvRows x kConvCols tiles over (output channels,
// output positions, per parity for a transposed conv) per batch element.
inline int64_t conv_tiles(const Problem& p, const ConvLayer& l) {
  const int64_t cols = l.transposed ? l.lin : l.lout;
  return ceil_div(cols, kConvCols) * ceil_div(l.cout, kConvRows) * (l.transposed ? 2 : 1) * p.batch;
}

// The encoder head as a conv layer: the N variates as input channels (N -> C1, D -> D/2).
inline ConvLayer head_layer(const Problem& p) {
  return {p.n_vars, p.d_model, p.d_model / 4, p.d_model / 2, false};
}

// Blocks of the head's grid for `splits`.
inline int64_t head_blocks(const Problem& p, int64_t splits) {
  return conv_tiles(p, head_layer(p)) * splits;
}

// Input channels (the head: variates) per split of a conv layer split `splits` ways: a
// multiple of kSplitChannels, so every split but the last reads whole, aligned K steps.
inline int split_chunk(int64_t cin, int64_t splits) {
  return chunk_rows(cin, splits, kSplitChannels);
}

// Splits of a conv layer's input channels for `sms` SMs: as many as it takes for the
// tiles to give every SM a block (⌈sms / tiles⌉), at most kMaxConvSplits and one K step
// (kSplitChannels) each; 1 when the tiles alone fill the SMs (B = 16 at Traffic's D = 512).
inline int conv_splits_for(const Problem& p, const ConvLayer& l, int64_t sms) {
  const int64_t wanted =
      std::min({static_cast<int64_t>(kMaxConvSplits), ceil_div(sms, conv_tiles(p, l)),
                ceil_div(l.cin, kSplitChannels)});
  return static_cast<int>(ceil_div(l.cin, split_chunk(l.cin, std::max<int64_t>(1, wanted))));
}

// Blocks of a tail launch with tiles of `cols` columns.
inline int64_t tail_blocks(const Problem& p, int cols) {
  return ceil_div(p.d_model, cols) * tail_tiles(p.n_vars) * p.batch;
}

// Whether `cols` is one of the instantiated tail tile widths.
constexpr bool tail_cols_instantiated(int cols) {
  for (int option : kTailColOptions) {
    if (option == cols) return true;
  }
  return false;
}

// The tail tile width for `resident` CTAs resident at once: the option of kTailColOptions
// with the least ⌈blocks / resident⌉ · kTailRows · cols, the tile area times the waves of
// CTAs, i.e. the rows x columns one SM slot computes, padding and the last wave's idle
// slots included; ties go to the wider tile (fewer CTAs, less per-CTA overhead). A pure
// function of the sizes: the same plan for the same problem and SM count.
inline int tail_cols_for(const Problem& p, int64_t resident) {
  int best = kTailMaxCols;
  int64_t best_cost = -1;
  for (int cols : kTailColOptions) {
    const int64_t cost = ceil_div(tail_blocks(p, cols), resident) * kTailRows * cols;
    if (best_cost < 0 || cost < best_cost) best = cols, best_cost = cost;
  }
  return best;
}

// head_splits: the most splits (each at least 32 variates, at most kMaxHeadSplits) whose
// grid stays within the CTAs resident at once, kHeadBlocksPerSm per SM (one split when
// the unsplit grid already fills them). conv_splits: conv_splits_for each bottleneck
// conv. tail_cols: tail_cols_for the kTailBlocksPerSm CTAs per SM.
inline Plan make_plan(const Problem& p, int sm_count) {
  const int64_t sms = std::max(sm_count, 1);
  const int64_t resident = kHeadBlocksPerSm * sms;
  const int64_t most = std::max<int64_t>(1, resident / head_blocks(p, 1));
  const int64_t wanted =
      std::max<int64_t>(1, std::min({most, kMaxHeadSplits, p.n_vars / kSplitChannels}));
  Plan plan;
  plan.head_splits = static_cast<int>(ceil_div(p.n_vars, split_chunk(p.n_vars, wanted)));
  for (int i = 0; i < kBottleneckLayers; ++i) {
    plan.conv_splits[i] = conv_splits_for(p, bottleneck_layer(p, i), sms);
  }
  plan.tail_splits = static_cast<int>(tail_tiles(p.n_vars));
  plan.tail_cols = tail_cols_for(p, kTailBlocksPerSm * sms);
  return plan;
}

// ---------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------

// One launch: its kernel's name, blocks (one-dimensional grid; 0: not launched), threads
// per block and dynamic shared memory bytes per block.
struct Launch {
  const char* kernel;
  int64_t blocks;
  int threads;
  int smem_bytes;
};

// Every launch of one call, in launch order (kLaunches of them).
struct LaunchPlan {
  Launch head, head_reduce, enc1, enc2, dec0, dec1, tail_stats, tail_output;
};
constexpr int kLaunches = 8;

// Blocks of a grid-stride elementwise launch over `total` elements.
inline int64_t elementwise_blocks(int64_t total) {
  return std::min<int64_t>(ceil_div(total, kReduceThreads), 65536);
}

inline LaunchPlan plan_launches(const Problem& p, const Plan& plan, DType dtype) {
  const int64_t B = p.batch, D = p.d_model, C1 = D / 4;
  const int e = dtype_bytes(dtype), k = static_cast<int>(p.kernel);
  // A conv launch: its layer's tiles (conv_tiles) per split.
  auto conv = [&](const char* name, const ConvLayer& layer, int64_t splits) {
    return Launch{name, conv_tiles(p, layer) * splits, kConvThreads,
                  conv_smem_bytes(e, k, layer.transposed)};
  };
  const int64_t tail = tail_blocks(p, plan.tail_cols);
  LaunchPlan lp;
  lp.head = conv("head_kernel", head_layer(p), plan.head_splits);
  // One head split stores h1 itself; more are summed by the reduce launch.
  lp.head_reduce = {"head_reduce_kernel",
                    plan.head_splits > 1 ? elementwise_blocks(B * C1 * padded_length(D / 2, e)) : 0,
                    kReduceThreads, 0};
  Launch* layers[kBottleneckLayers] = {&lp.enc1, &lp.enc2, &lp.dec0, &lp.dec1};
  for (int i = 0; i < kBottleneckLayers; ++i) {
    *layers[i] = conv("conv_kernel", bottleneck_layer(p, i), plan.conv_splits[i]);
  }
  lp.tail_stats = {"tail_stats_kernel", tail, kTailThreads,
                   tail_smem_bytes(e, k, false, plan.tail_cols)};
  lp.tail_output = {"tail_output_kernel", tail, kTailThreads,
                    tail_smem_bytes(e, k, true, plan.tail_cols)};
  return lp;
}

}  // namespace gpu
}  // namespace casa
