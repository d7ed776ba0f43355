// The elementwise loops of the CPU kernel, vectorised (see vectorised.cpp). Stride-2
// convolutions with kernel k and padding p = k / 2 (docs/design.md §2).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace casa {
namespace cpu {

// The vector tier the loops below run on (vectorised.cpp): the best of AVX-512 (F, BW, DQ,
// VL), AVX2 + FMA and baseline x86-64 this CPU has, capped by ATEN_CPU_CAPABILITY
// ("default", "avx2") where set. Fixed at the first call; baseline off x86-64 GCC.
enum class VectorIsa { baseline, avx2, avx512 };
VectorIsa vector_isa();
const char* vector_isa_name(VectorIsa isa);

// Columns of a stride-2 conv as a GEMM operand: for `rows` input rows of length L at
// src + i·ld, dst[(i·k + j)·dst_ld + t] = src[i·ld + 2t + j - p] for t < L/2, zero
// outside [0, L). The conv's weight [Cout, Cin, k], viewed as [Cout, Cin·k], multiplies
// it from the left.
void im2col_s2(const float* src, int64_t ld, int64_t rows, int64_t L, int64_t k, float* dst,
               int64_t dst_ld);
void im2col_s2(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t L, int64_t k, float* dst,
               int64_t dst_ld);
void im2col_s2(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t L, int64_t k,
               c10::BFloat16* dst, int64_t dst_ld);
void im2col_s2(const double* src, int64_t ld, int64_t rows, int64_t L, int64_t k, double* dst,
               int64_t dst_ld);

// The scatter of a stride-2 transposed conv (output_padding 1) after its GEMM, with its
// bias and ReLU: cols[(n·k + j)·ldc + i] holds Σ_ci W[ci, n, j]·in[ci, i] for i < L;
// output column o = 2i - p + j. Writes out[n·ldo + o] = max(0, bias[n] + Σ_{i, j :
// 2i - p + j = o} cols[(n·k + j)·ldc + i]) for o < 2L, n < rows.
void col2im_relu_s2(const float* cols, int64_t ldc, int64_t rows, int64_t k, int64_t L,
                    const float* bias, float* out, int64_t ldo);
void col2im_relu_s2(const double* cols, int64_t ldc, int64_t rows, int64_t k, int64_t L,
                    const double* bias, double* out, int64_t ldo);

// out[r·ld + c] = max(out[r·ld + c] + bias[r], 0) for r < rows, c < cols: a conv's bias
// and ReLU on its GEMM output, one block of columns at a time.
void add_bias_relu(float* out, int64_t ld, int64_t rows, int64_t cols, const float* bias);
void add_bias_relu(double* out, int64_t ld, int64_t rows, int64_t cols, const double* bias);

// The softmax end of the tail (docs/design.md §5, stage 3) for one tile of T output columns
// (T even), computed as
//   y = softmax_N(sigmoid(scores + score_bias) + x) * (values + value_bias) + x
// one block of rows at a time, so that the caller can use each block's GEMM output
// while it is in cache. Per-column arrays (scores, values, value_bias, shift, sum,
// scale) are in parity order: entry c < T/2 is the tile's output column 2c, entry
// T/2 + c its column 2c + 1. x and y point at the tile's first column of the block's
// first row, rows D apart, in natural column order.
//
// Each block i is shifted by its own shift_i = 1 + max of x over the block's rows (0 where
// that maximum is -inf, as every numerator is then 0), per
// column: sigmoid lies in (0, 1), so the shift is within 1 of the block's largest
// exponent and exp neither overflows nor underflows for it. softmax_merge_blocks and
// softmax_scales then put the blocks on a common shift. The block's x rows are read once from
// memory and again from cache, where one shift over all N would read x once more.

// For `rows` rows: scores (the last transposed conv without its bias, [rows, ld]) become
// e = exp(sigmoid(scores + score_bias[n]) + x - shift), with shift[c] (written) = 1 +
// max over the rows of x in column c, and sum[c] (written) = Σ_n e.
void softmax_numerators(float* scores, int64_t ld, const float* score_bias, int64_t rows, int64_t T,
                        const float* x, int64_t D, float* shift, float* sum);
void softmax_numerators(float* scores, int64_t ld, const float* score_bias, int64_t rows, int64_t T,
                        const c10::BFloat16* x, int64_t D, float* shift, float* sum);
void softmax_numerators(double* scores, int64_t ld, const double* score_bias, int64_t rows,
                        int64_t T, const double* x, int64_t D, double* shift, double* sum);

// From the `blocks` blocks' shift and sum ([blocks, T] each), the column statistics of
// all of them on one shift: top[c] = max_i shift[i, c], total[c] = Σ_i sum[i, c]·
// exp(shift[i, c] - top[c]) (the log-sum-exp merge; statistics of other variates merge
// with these the same way).
void softmax_merge_blocks(const float* shift, const float* sum, int64_t blocks, int64_t T,
                          float* top, float* total);
void softmax_merge_blocks(const double* shift, const double* sum, int64_t blocks, int64_t T,
                          double* top, double* total);

// The factor that turns each block's numerators into softmax weights, given the column
// statistics (top, total) of every variate: shift[i, c] becomes
// exp(shift[i, c] - top[c]) / total[c].
void softmax_scales(float* shift, int64_t blocks, int64_t T, const float* top, const float* total);
void softmax_scales(double* shift, int64_t blocks, int64_t T, const double* top,
                    const double* total);

// For `rows` rows of one block: y = numerators * scale * (values + value_bias) + x, with
// values ([rows, ldv]) = x Wv^T without its bias and scale the block's row of
// softmax_scales.
void softmax_output(const float* numerators, int64_t ld, const float* values, int64_t ldv,
                    const float* value_bias, const float* scale, int64_t rows, int64_t T,
                    const float* x, float* y, int64_t D);
void softmax_output(const float* numerators, int64_t ld, const float* values, int64_t ldv,
                    const float* value_bias, const float* scale, int64_t rows, int64_t T,
                    const c10::BFloat16* x, c10::BFloat16* y, int64_t D);
void softmax_output(const double* numerators, int64_t ld, const double* values, int64_t ldv,
                    const double* value_bias, const double* scale, int64_t rows, int64_t T,
                    const double* x, double* y, int64_t D);

// The softmax end of the backward (backward.cpp) for `rows` rows of one tile of T columns,
// per-column arrays and [rows, ld] buffers in the tail's parity order (as above), x and g
// (dL/dy) in natural order, rows D apart.
//
// softmax_backward_weights: scores (the last transposed conv without its bias) become the
// softmax weights P = exp(σ(t) + x − col_max) / col_sum, t = scores + score_bias[n]. Where
// values (x Wv^T without its bias, [rows, ld]) is given, also dp = (values + value_bias)·g,
// sigma_prime = σ(t)(1 − σ(t)) and colsum += P·dp; else dp, sigma_prime, colsum unused.
void softmax_backward_weights(float* scores, int64_t ld, const float* score_bias, int64_t rows,
                              int64_t T, const float* x, const float* g, int64_t D,
                              const float* col_max, const float* col_sum, const float* values,
                              const float* value_bias, float* dp, float* sigma_prime,
                              float* colsum);
void softmax_backward_weights(float* scores, int64_t ld, const float* score_bias, int64_t rows,
                              int64_t T, const c10::BFloat16* x, const c10::BFloat16* g, int64_t D,
                              const float* col_max, const float* col_sum, const float* values,
                              const float* value_bias, float* dp, float* sigma_prime,
                              float* colsum);
void softmax_backward_weights(double* scores, int64_t ld, const double* score_bias, int64_t rows,
                              int64_t T, const double* x, const double* g, int64_t D,
                              const double* col_max, const double* col_sum, const double* values,
                              const double* value_bias, double* dp, double* sigma_prime,
                              double* colsum);

// softmax_backward_grads: from P, dv = P·g where dv is given; where dp (= v·g) is given,
// ds = P·(dp − colsum[c]), then dp becomes dt = ds·sigma_prime and, where dx is given,
// dx = g + ds. Null outputs are skipped.
void softmax_backward_grads(const float* P, int64_t ld, int64_t rows, int64_t T, const float* g,
                            int64_t D, const float* colsum, const float* sigma_prime, float* dp,
                            float* dv, float* dx);
void softmax_backward_grads(const float* P, int64_t ld, int64_t rows, int64_t T,
                            const c10::BFloat16* g, int64_t D, const float* colsum,
                            const float* sigma_prime, float* dp, float* dv, float* dx);
void softmax_backward_grads(const double* P, int64_t ld, int64_t rows, int64_t T, const double* g,
                            int64_t D, const double* colsum, const double* sigma_prime, double* dp,
                            double* dv, double* dx);

// The bfloat16 GEMMs' packing (gemm.h, pack_bf16): B [K, N] (row stride ldb, K even) into
// blocks of `block` columns, element (k, c) of block n0 at n0·K + ((k / 2)·block + c)·2 +
// k % 2; columns past N are zero.
void interleave_pairs_bf16(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, int64_t block,
                           c10::BFloat16* packed);
void interleave_pairs_bf16(int64_t K, int64_t N, const float* B, int64_t ldb, int64_t block,
                           c10::BFloat16* packed);  // rounded to nearest even

// The block around the attention (csrc/cpu/block_epilogue.cpp), row-wise on blocks of
// rows of D features, fp32 arithmetic:

// out[r·D + c] = (in[r·D + c] - mean_r) / sqrt(var_r + eps) · weight[c] + bias[c], the
// LayerNorm over each row (biased variance, as nn.LayerNorm).
void layer_norm_rows(const float* in, int64_t rows, int64_t D, const float* weight,
                     const float* bias, float eps, float* out);
void layer_norm_rows(const c10::BFloat16* in, int64_t rows, int64_t D, const float* weight,
                     const float* bias, float eps, float* out);

// io[r·D + c] = relu(io[r·D + c] + bias[c]) (NaN kept).
void add_bias_relu_rows(float* io, int64_t rows, int64_t D, const float* bias);

// io[r·D + c] += bias[c] + residual[r·D + c].
void add_bias_residual_rows(float* io, int64_t rows, int64_t D, const float* bias,
                            const float* residual);

// dst[c·ldd + r] = src[r·lds + c] for r < rows, c < cols (rounded to bfloat16, nearest
// even, for bfloat16 dst): the channels-last bottleneck's changes of layout.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd);
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, c10::BFloat16* dst,
               int64_t ldd);

// Rounds n floats to bfloat16 (nearest even): the GEMMs' operands and the output.
void to_bf16(const float* in, int64_t n, c10::BFloat16* out);

// n floats, with relu (NaN kept) when `relu`, to out (float or rounded to bfloat16).
void store_rows(const float* in, int64_t n, bool relu, float* out);
void store_rows(const float* in, int64_t n, bool relu, c10::BFloat16* out);

// The backward's row updates (backward.cpp), for `rows` rows:
// add_parity_rows: dst[r·ldd + o0 + 2c] += tile[r·ld + c] and dst[r·ldd + o0 + 2c + 1] +=
// tile[r·ld + T/2 + c] for c < T/2 (a tile in the tail's parity order added to its columns
// in natural order), and, where `full` is given, dst[r·ldd + c] += full[r·D + c] for c < D.
void add_parity_rows(float* dst, int64_t ldd, const float* full, int64_t D, const float* tile,
                     int64_t ld, int64_t o0, int64_t T, int64_t rows);
void add_parity_rows(double* dst, int64_t ldd, const double* full, int64_t D, const double* tile,
                     int64_t ld, int64_t o0, int64_t T, int64_t rows);
// bfloat16 dst: the same sums formed in fp32, each element of dst rounded once; `full`
// (required) is overwritten.
void add_parity_rows(c10::BFloat16* dst, int64_t ldd, float* full, int64_t D, const float* tile,
                     int64_t ld, int64_t o0, int64_t T, int64_t rows);
// add_rounded: out[i] = bfloat16(out[i] + in[i]) (nearest even) for i < n.
void add_rounded(const float* in, int64_t n, c10::BFloat16* out);
// add_row_sums: out[r] += Σ_{c < cols} a[r·ld + c] (float: in 16 partial sums per row).
void add_row_sums(const float* a, int64_t ld, int64_t rows, int64_t cols, float* out);
void add_row_sums(const double* a, int64_t ld, int64_t rows, int64_t cols, double* out);
// relu_backward: io[i] = 0 where output[i] <= 0, else io[i] unchanged (a NaN output keeps
// its gradient, as threshold_backward), for i < n: a ReLU's backward given its output.
void relu_backward(float* io, const float* output, int64_t n);
void relu_backward(double* io, const double* output, int64_t n);

}  // namespace cpu
}  // namespace casa
