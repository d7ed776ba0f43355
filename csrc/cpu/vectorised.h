// The elementwise loops of the CPU kernel, vectorised (see vectorised.cpp). Stride-2
// convolutions with kernel k and padding p = k / 2 (DESIGN §2).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace casa {
namespace cpu {

// Columns of a stride-2 conv as a GEMM operand: for `rows` input rows of length L at
// src + i·ld, dst[(i·k + j)·dst_ld + t] = src[i·ld + 2t + j - p] for t < L/2, zero
// outside [0, L). The conv's weight [Cout, Cin, k], viewed as [Cout, Cin·k], multiplies
// it from the left.
void im2col_s2(const float* src, int64_t ld, int64_t rows, int64_t L, int64_t k, float* dst,
               int64_t dst_ld);
void im2col_s2(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t L, int64_t k,
               float* dst, int64_t dst_ld);
void im2col_s2(const double* src, int64_t ld, int64_t rows, int64_t L, int64_t k, double* dst,
               int64_t dst_ld);

// The scatter of a stride-2 transposed conv (output_padding 1) after its GEMM:
// cols[(n·k + j)·ldc + a] holds Σ_ci W[ci, n, j]·in[ci, i0 + a] for a < ni; output
// column o = 2i - p + j. Writes, for the tile of output columns [o0, o0 + T),
// out[n·ldo + c] = bias[n] + Σ_{i, j : 2i - p + j = o0 + c} cols[(n·k + j)·ldc + i - i0],
// for n < rows. The caller passes every input column i that reaches the tile.
void col2im_s2(const float* cols, int64_t ldc, int64_t rows, int64_t k, int64_t i0, int64_t ni,
               int64_t o0, int64_t T, const float* bias, float* out, int64_t ldo);
void col2im_s2(const double* cols, int64_t ldc, int64_t rows, int64_t k, int64_t i0, int64_t ni,
               int64_t o0, int64_t T, const double* bias, double* out, int64_t ldo);

// The elementwise end of the tail (DESIGN §5, stage 3) for one tile of T output
// columns (T even), held in parity order: column c < T/2 of scores and values is the
// tile's output column 2c, column T/2 + c its output column 2c + 1.
//   scores [N, ld]: the last transposed conv without its bias; overwritten.
//   values [N, ld]: x Wv^T without its bias.
//   score_bias [N]: the conv's bias, one per row; value_bias [T]: Wv's bias, parity order.
//   x, y: the tile's first column, rows D apart, natural column order.
// Computes y = softmax_N(sigmoid(scores + score_bias) + x) * (values + value_bias) + x.
// The softmax is shifted by max_N(x) + 1 per column rather than by the scores' own
// maximum: sigmoid lies in (0, 1), so the shift is within 1 of that maximum and
// exp never overflows nor underflows for the largest term — one pass fewer.
void softmax_epilogue(float* scores, const float* values, int64_t ld, const float* score_bias,
                      const float* value_bias, int64_t N, int64_t T, const float* x, float* y,
                      int64_t D);
void softmax_epilogue(float* scores, const float* values, int64_t ld, const float* score_bias,
                      const float* value_bias, int64_t N, int64_t T, const c10::BFloat16* x,
                      c10::BFloat16* y, int64_t D);
void softmax_epilogue(double* scores, const double* values, int64_t ld, const double* score_bias,
                      const double* value_bias, int64_t N, int64_t T, const double* x, double* y,
                      int64_t D);

}  // namespace cpu
}  // namespace casa
