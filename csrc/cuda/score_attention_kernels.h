// CUDA kernels of casa::fused_score_attention (docs/design.md §5), free of torch headers.
//
// The binding (score_attention_cuda.cpp) validates the tensors, allocates the output
// and one fp32 workspace, and calls launch_fused_score_attention on its stream.
// Everything here works on raw device pointers of contiguous tensors.
//
// Shapes (B = batch, N = variates, D = d_model, k = kernel, C1 = D/4, C2 = D/2):
//   x, y: [B, N, D]; weights indexed by casa::WeightIndex (csrc/weight_index.h), all
//   of the dtype of x. Accumulation is fp32 for every dtype.
//
// Stages, each a kernel launch on `stream` (v3, see the .cu; tiles and layouts in
// launch_plan.h):
//   1. head:        h1 = relu(conv(x, enc0) + b)        [B, C1, D/2] in the dtype of x; the N
//                   reduction split over `head_splits` blocks into fp32 partials (32 x 64
//                   conv tiles, the grid capped at the resident CTAs), then a reduce kernel
//                   adds bias and ReLU;
//   2. bottleneck:  h2..h5 (enc1, enc2, dec0, dec1) in the dtype of x, O(B·D²), 32 x 64
//                   conv tiles per (batch, channel tile, position tile, parity) (tensor
//                   cores for fp16/bf16, fp32 accumulation); a layer whose tiles do not
//                   give every SM a block (small B) splits its input channels over up to
//                   4 blocks per tile, the last to finish summing their fp32 partials
//                   (split-K in one launch);
//   3. tail:        split over N into `tail_splits` = ⌈N/64⌉ row tiles; CTAs = B × row tiles
//                   × ⌈D/tail_cols⌉ column tiles, two per SM, the plan's tail_cols (128 or
//                   64) the width whose waves of CTAs leave the fewest idle slots. A stats
//                   launch writes each tile's column (max, Σexp) [B, tail_splits, D]; an
//                   output launch merges its columns' statistics (log-sum-exp over the row
//                   tiles), recomputes the score tile (last transposed conv + bias + sigmoid
//                   + skip), forms the value tile (a 64 x tail_cols GEMM, K = D) and writes
//                   y = p ⊙ (v + bv) + x.
//                   Nothing of size [B, N, D] is written except y.
// Every conv (head, bottleneck, the tail's scores) is the same pipelined conv tile: 16-byte
// cp.async copies of the per-tap packed weights and of a contiguous halo tile of the
// input, the taps as shared-memory offsets, the kernel size a template parameter.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../weight_index.h"
#include "launch_plan.h"  // DType, Problem, Plan, make_plan, plan_launches

namespace casa {
namespace gpu {

// fp32 elements of the workspace (each region rounded up to 128 bytes): head_splits · B ·
// D²/8 for the head partials, the bottleneck's split-K partials and arrival counts (at
// most kMaxConvSplits x the largest split layer's output, fp32, and one int per tile),
// the five bottleneck activations (about B · D²/8 each, rows padded to 16 bytes; stored in
// the dtype of x, sized for fp32) and 2 · B · tail_splits · D for the tail's per-tile
// column (max, sum).
size_t workspace_floats(const Problem& problem, const Plan& plan);

// x, weights[kValueWeight] and the six conv weights must start on 16 bytes (the
// cp.async copies).
struct Params {
  DType dtype;
  Problem problem;
  Plan plan;                         // from make_plan(); splits >= 1
  const void* x;                     // [B, N, D], dtype
  const void* weights[kNumWeights];  // indexed by WeightIndex; dtype, contiguous, except the
                                     // six conv weights: packed per tap (launch_plan.h)
  void* y;                           // [B, N, D], dtype, written
  float* workspace;                  // workspace_floats(problem, plan) floats
};

// The most dynamic shared memory one block of the kernels uses for `dtype`, any kernel
// size (the tail's output kernel at k = 7: 85 KiB); the device must allow it per block
// (opt-in limit: sm_86/sm_89 99 KiB, A100 163 KiB, H100 227 KiB).
size_t shared_memory_bytes(DType dtype);

// Whether the sizes fit the kernels' 32-bit grid and index arithmetic; on false,
// `why` (if non-null) names the first violated limit.
bool problem_supported(const Problem& problem, const char** why);

// Enqueues all stages on `stream`; returns the first launch error (cudaSuccess if none).
cudaError_t launch_fused_score_attention(const Params& params, cudaStream_t stream);

}  // namespace gpu
}  // namespace casa
