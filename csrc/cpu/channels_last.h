// The bottleneck's convs in bfloat16 on the bfloat16 GEMM tiers (AMX, avx512_bf16),
// channels-last (docs/design.md §11.4).
//
// Each activation is [B, L + 2p, C] in bfloat16 (PaddedRows), p = k/2 zero rows around each
// batch element's L rows, so that every conv is GEMMs on the activation as it lies, with
// the weights as the packed right operand (packed once per weight version):
// * stride-2 conv: output row i of batch element b takes input rows 2i - p … 2i - p + k - 1,
//   k·C consecutive elements: one GEMM row, rows 2C apart, times the weight as [k·C, Cout]
//   (row j·C + c = weight[o, c, j]);
// * stride-2 transposed conv (output_padding 1): output row 2u + q takes tap j from input
//   row u + (q + p - j)/2 for the taps j of parity q (parity_taps). Ordered by descending
//   j those inputs are consecutive rows: again one GEMM row, rows C apart, times the taps'
//   weights stacked. Inputs past [0, L) are padding rows, whose zeros add exact zeros: the
//   weights are finite here (the cpu backend runs non-finite weights on the reference,
//   casa_kernels/ops/finite_weights.py), so the result is the transposed conv's.
// No im2col, col2im or activation packing: each GEMM block's fp32 output gets its bias and
// ReLU (NaN kept) while in cache and is rounded to bfloat16 into the next activation, the
// rounding the im2col path applies when it packs its columns.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

namespace casa {
namespace cpu {

// The taps j of a stride-2 transposed conv (kernel k, padding k/2) that reach outputs of
// parity q, ascending: output 2u + q takes tap j from input u + (q + k/2 - j) / 2.
std::vector<int64_t> parity_taps(int64_t k, int64_t q);

// A channels-last bfloat16 activation [batch, L + 2·pad, channels]; row t of batch
// element b, t in [-pad, L + pad), at row(b, t).
struct PaddedRows {
  c10::BFloat16* data;
  int64_t batch, L, channels, pad;

  static int64_t elements(int64_t batch, int64_t L, int64_t channels, int64_t pad) {
    return batch * (L + 2 * pad) * channels;
  }
  c10::BFloat16* row(int64_t b, int64_t t) const {
    return data + (b * (L + 2 * pad) + pad + t) * channels;
  }
  // Writes the zero rows (a stride-2 conv's padding).
  void zero_padding() const;
};

// The weights packed for the convs below (pack_bf16 blocks):
// conv [Cout, Cin, k] -> [k·Cin, Cout]; transposed conv [Cin, Cout, k] -> each parity's
// taps by descending j, [|taps|·Cin, Cout], parity 0 then parity 1. bfloat16 weights.
at::Tensor pack_conv_s2_weight(const at::Tensor& weight);
at::Tensor pack_conv_transpose_s2_weight(const at::Tensor& weight);

// dst = src in bfloat16, channels-last: src [C, B, L] fp32 (channels B·L apart), dst
// [B, L + 2p, C] with its padding zeroed.
void to_padded_rows(const float* src, const PaddedRows& dst);

// out = relu(conv_s2(in) + bias), rounded to bfloat16: in [B, L, Cin] -> out [B, L/2, Cout];
// in's padding must be zero. packed: pack_conv_s2_weight; bias [Cout] fp32.
void conv_s2_relu(const PaddedRows& in, const c10::BFloat16* packed, const float* bias, int64_t k,
                  const PaddedRows& out);

// relu(conv_transpose_s2(in) + bias): in [B, L, Cin] -> [B, 2L, Cout], into `out` rounded to
// bfloat16, or (out == nullptr) into channels_first [Cout, B, 2L] fp32; in's padding must be
// zero. packed: pack_conv_transpose_s2_weight; bias [Cout] fp32.
void conv_transpose_s2_relu(const PaddedRows& in, const c10::BFloat16* packed, const float* bias,
                            int64_t k, int64_t Cout, const PaddedRows* out, float* channels_first);

}  // namespace cpu
}  // namespace casa
