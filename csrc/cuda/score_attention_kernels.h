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
// Stages, each a kernel launch on `stream`:
//   1. head:        h1 = relu(conv(x, enc0) + b)        [B, C1, D/2], N reduction split
//                   over `head_splits` blocks into fp32 partials, then a reduce kernel;
//   2. bottleneck:  h2..h5 (enc1, enc2, dec0, dec1), fp32 [B, *, *], O(B·D²);
//   3. tail:        one block per (batch, output parity, column tile) — last transposed
//                   conv + bias + sigmoid + skip + softmax over N + value projection +
//                   product + residual, walking N twice (column max/sum, then output);
//                   nothing of size [B, N, D] is written except y. When B·D alone gives
//                   too few blocks, N is also split over `tail_splits` blocks: a stats
//                   launch writes each split's column (max, sum) [B, splits, D], and an
//                   output launch combines them and writes its rows (same kernel code).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../weight_index.h"

namespace casa {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Problem sizes; D % 8 == 0 and k odd (checked by the binding).
struct Problem {
  int64_t batch, n_vars, d_model, kernel;
};

// How N is split across blocks. head_splits: blocks sharing the N reduction of the
// encoder head (each at least 32 variates); tail_splits: row ranges of the tail (each
// at least 128 variates). Both aim at about two blocks per SM when B is small.
struct Plan {
  int head_splits, tail_splits;
};

Plan make_plan(const Problem& problem, int sm_count);

// fp32 elements of the workspace: (head_splits + 5) · B · D²/8 for the head partials
// and the five bottleneck activations, plus 2 · B · tail_splits · D for the tail's
// column (max, sum) when tail_splits > 1.
size_t workspace_floats(const Problem& problem, const Plan& plan);

struct Params {
  DType dtype;
  Problem problem;
  Plan plan;                         // from make_plan(); splits >= 1
  const void* x;                     // [B, N, D], dtype
  const void* weights[kNumWeights];  // indexed by WeightIndex; dtype, contiguous
  void* y;                           // [B, N, D], dtype, written
  float* workspace;                  // workspace_floats(problem, plan) floats
};

// Whether the sizes fit the kernels' 32-bit grid and index arithmetic; on false,
// `why` (if non-null) names the first violated limit.
bool problem_supported(const Problem& problem, const char** why);

// Enqueues all stages on `stream`; returns the first launch error (cudaSuccess if none).
cudaError_t launch_fused_score_attention(const Params& params, cudaStream_t stream);

}  // namespace gpu
}  // namespace casa
