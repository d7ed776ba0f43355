#include "channels_last.h"

#include <algorithm>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "vectorised.h"

namespace casa {
namespace cpu {
namespace {

// Output rows of one GEMM block (on AMX, four tiles of 16 rows), whose fp32 output ([rows,
// at most 512 columns], 128 KiB) stays in L2 for the epilogue.
constexpr int64_t kBlockRows = 64;

// The taps of parity q in the order of their input rows (descending j), and the offset d
// = (q + p - j)/2 of the first: output u's inputs are rows u + d … u + d + |taps| - 1.
struct ParityTaps {
  std::vector<int64_t> taps;
  int64_t first_offset;
};

ParityTaps taps_by_input_row(int64_t k, int64_t q) {
  std::vector<int64_t> taps = parity_taps(k, q);
  std::reverse(taps.begin(), taps.end());
  return {taps, taps.empty() ? 0 : (q + k / 2 - taps.front()) / 2};
}

// weight_kio [k, Cin, Cout]: the taps' [Cin, Cout] slices stacked in the given order, packed.
at::Tensor pack_taps(const at::Tensor& weight_kio, const std::vector<int64_t>& taps) {
  const int64_t Cin = weight_kio.size(1), Cout = weight_kio.size(2);
  const int64_t K = static_cast<int64_t>(taps.size()) * Cin;
  at::Tensor packed = at::empty({packed_bf16_size(K, Cout)}, at::kBFloat16);
  if (K == 0) return packed;
  const at::Tensor rows = weight_kio.to(at::kBFloat16)
                              .index_select(0, at::tensor(taps, at::kLong))
                              .reshape({K, Cout})
                              .contiguous();
  pack_bf16(K, Cout, rows.data_ptr<c10::BFloat16>(), Cout, packed.data_ptr<c10::BFloat16>());
  return packed;
}

// Calls block(b, r0, r1, n0, n1, scratch) for the work items of a conv with `rows` output
// rows per batch element and N output channels: chunks of kBlockRows rows, the columns split
// into groups of whole packed blocks only where the chunks are fewer than the threads
// (B = 1). scratch: fp32 room for 2·kBlockRows rows of the group's columns. On
// threads_for(macs) threads.
template <typename F>
void for_each_block(int64_t B, int64_t rows, int64_t N, int64_t macs, const F& block) {
  const int64_t threads = threads_for(macs);
  const int64_t chunks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t column_blocks = (N + kPackedColumns - 1) / kPackedColumns;
  const int64_t groups =
      std::clamp<int64_t>((threads + B * chunks - 1) / (B * chunks), 1, column_blocks);
  const int64_t width = (column_blocks + groups - 1) / groups * kPackedColumns;
  const int64_t items = B * chunks * groups;
  parallel_for_aten(items, (items + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({2 * kBlockRows * width}, at::kFloat);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % groups, chunk = item / groups % chunks, b = item / groups / chunks;
      const int64_t r0 = chunk * kBlockRows, n0 = g * width;
      block(b, r0, std::min(rows, r0 + kBlockRows), n0, std::min(N, n0 + width),
            scratch.data_ptr<float>());
    }
    release_bf16_gemm();
  });
}

// rows x cols of fp32 (row stride cols) to bfloat16 rows `ld` apart.
void store_bf16_rows(const float* C, int64_t rows, int64_t cols, c10::BFloat16* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) to_bf16(C + r * cols, cols, out + r * ld);
}

}  // namespace

std::vector<int64_t> parity_taps(int64_t k, int64_t q) {
  std::vector<int64_t> taps;
  for (int64_t j = 0; j < k; ++j) {
    if ((q + k / 2 - j) % 2 == 0) taps.push_back(j);
  }
  return taps;
}

void PaddedRows::zero_padding() const {
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(row(b, -pad), row(b, 0), c10::BFloat16(0.0f));
    std::fill(row(b, L), row(b, L + pad), c10::BFloat16(0.0f));
  }
}

at::Tensor pack_conv_s2_weight(const at::Tensor& weight) {
  std::vector<int64_t> taps(weight.size(2));
  for (int64_t j = 0; j < weight.size(2); ++j) taps[j] = j;
  return pack_taps(weight.permute({2, 1, 0}), taps);
}

at::Tensor pack_conv_transpose_s2_weight(const at::Tensor& weight) {
  const at::Tensor weight_kio = weight.permute({2, 0, 1});
  return at::cat({pack_taps(weight_kio, taps_by_input_row(weight.size(2), 0).taps),
                  pack_taps(weight_kio, taps_by_input_row(weight.size(2), 1).taps)});
}

void to_padded_rows(const float* src, const PaddedRows& dst) {
  const int64_t L = dst.L;
  at::parallel_for(0, dst.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      transpose(src + b * L, dst.batch * L, dst.channels, L, dst.row(b, 0), dst.channels);
    }
  });
  dst.zero_padding();
}

void conv_s2_relu(const PaddedRows& in, const c10::BFloat16* packed, const float* bias, int64_t k,
                  const PaddedRows& out) {
  const int64_t B = in.batch, Cin = in.channels, Cout = out.channels, K = k * Cin;
  const int64_t rows = in.L / 2, p = k / 2;
  const auto block = [&](int64_t b, int64_t r0, int64_t r1, int64_t n0, int64_t n1, float* C) {
    const int64_t m = r1 - r0, w = n1 - n0;
    gemm_bf16(m, w, K, in.row(b, 2 * r0 - p), 2 * Cin, packed + n0 * K, C, w,
              /*accumulate=*/false);
    add_bias_relu_rows(C, m, w, bias + n0);
    store_bf16_rows(C, m, w, out.row(b, r0) + n0, Cout);
  };
  for_each_block(B, rows, Cout, B * rows * K * Cout, block);
  out.zero_padding();
}

void conv_transpose_s2_relu(const PaddedRows& in, const c10::BFloat16* packed, const float* bias,
                            int64_t k, int64_t Cout, const PaddedRows* out, float* channels_first) {
  const int64_t B = in.batch, L = in.L, Cin = in.channels;
  const ParityTaps parity[2] = {taps_by_input_row(k, 0), taps_by_input_row(k, 1)};
  const int64_t K[2] = {static_cast<int64_t>(parity[0].taps.size()) * Cin,
                        static_cast<int64_t>(parity[1].taps.size()) * Cin};
  const c10::BFloat16* packed_q[2] = {packed, packed + packed_bf16_size(K[0], Cout)};
  // C [2·(u1 - u0), w]: the GEMM output for outputs 2u0 … 2u1 - 1 in order, each parity's
  // rows 2w apart.
  const auto block = [&](int64_t b, int64_t u0, int64_t u1, int64_t n0, int64_t n1, float* C) {
    const int64_t w = n1 - n0, rows = 2 * (u1 - u0);
    for (int64_t q = 0; q < 2; ++q) {
      float* Cq = C + q * w;
      if (K[q] == 0) {  // k = 1: odd outputs take the bias alone
        for (int64_t r = 0; r < u1 - u0; ++r) std::fill(Cq + 2 * r * w, Cq + (2 * r + 1) * w, 0.0f);
        continue;
      }
      gemm_bf16(u1 - u0, w, K[q], in.row(b, u0 + parity[q].first_offset), Cin,
                packed_q[q] + n0 * K[q], Cq, 2 * w, /*accumulate=*/false);
    }
    add_bias_relu_rows(C, rows, w, bias + n0);
    if (out != nullptr) {
      store_bf16_rows(C, rows, w, out->row(b, 2 * u0) + n0, Cout);
    } else {
      transpose(C, w, rows, w, channels_first + (n0 * B + b) * 2 * L + 2 * u0, B * 2 * L);
    }
  };
  for_each_block(B, L, Cout, B * L * (K[0] + K[1]) * Cout, block);
  if (out != nullptr) out->zero_padding();
}

}  // namespace cpu
}  // namespace casa
