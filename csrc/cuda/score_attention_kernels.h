// CUDA kernels of casa::fused_score_attention (DESIGN §5), free of torch headers.
//
// The binding (score_attention_cuda.cpp) validates the tensors, allocates the output
// and one fp32 workspace, and calls launch_fused_score_attention on its stream.
// Everything here works on raw device pointers of contiguous tensors.
//
// Shapes (B = batch, N = variates, D = d_model, k = kernel, C1 = D/4, C2 = D/2):
//   x, y: [B, N, D]; weights in schema order (see csrc/score_attention.cpp), all of
//   the dtype of x. Accumulation is fp32 for every dtype.
//
// Stages, each a kernel launch on `stream`:
//   1. head:        h1 = relu(conv(x, enc0) + b)        [B, C1, D/2], N reduction split
//                   over `head_splits` blocks into fp32 partials, then a reduce kernel;
//   2. bottleneck:  h2..h5 (enc1, enc2, dec0, dec1), fp32 [B, *, *], O(B·D²);
//   3. tail:        one block per (batch, output parity, column tile) — last transposed
//                   conv + bias + sigmoid + skip + softmax over N + value projection +
//                   product + residual, walking N twice; nothing of size [B, N, D] is
//                   written except y.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace casa {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Problem sizes; D % 8 == 0 and k odd (checked by the binding).
struct Problem {
  int64_t batch, n_vars, d_model, kernel;
};

// Number of parameter tensors of the op, in schema order:
// value_weight, value_bias, enc0_weight, enc0_bias, ..., dec2_weight, dec2_bias.
constexpr int kNumParams = 14;

struct Params {
  DType dtype;
  Problem problem;
  const void* x;                    // [B, N, D], dtype
  const void* weights[kNumParams];  // schema order, dtype, contiguous
  void* y;                          // [B, N, D], dtype, written
  float* workspace;                 // workspace_floats(problem, head_splits) floats
  int head_splits;                  // from head_splits(); >= 1
};

// How many blocks share the N reduction of the encoder head: enough to give about
// two blocks per SM when B is small, each split covering at least 32 variates.
int head_splits(const Problem& problem, int sm_count);

// fp32 elements of the workspace: (head_splits + 5) · B · D²/8.
size_t workspace_floats(const Problem& problem, int head_splits);

// Whether the sizes fit the kernels' 32-bit grid and index arithmetic; on false,
// `why` (if non-null) names the first violated limit.
bool problem_supported(const Problem& problem, const char** why);

// Enqueues all stages on `stream`; returns the first launch error (cudaSuccess if none).
cudaError_t launch_fused_score_attention(const Params& params, cudaStream_t stream);

}  // namespace gpu
}  // namespace casa
