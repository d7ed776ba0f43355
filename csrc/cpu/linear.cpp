// F.linear for bfloat16 on a CPU without bfloat16 GEMMs (cpu::bf16_gemm() == kNone, e.g.
// AVX2 only), for the forecaster's embedding and head:
//
//   out[..., N] = bf16(x[..., K] · W^T + b)   with x, b bfloat16, fp32 GEMMs
//
// The operands are converted to fp32 exactly and the result rounded once, as PyTorch's
// bfloat16 GEMM accumulates, at the fp32 GEMM's speed (PyTorch's own bfloat16 GEMM has no
// hardware here: ~10x slower). Each worker takes blocks of at most kRows rows
// (cpu::row_blocks), converts its rows of x (any strides: the embedding's input is a
// transposed view) into a block buffer, starts the block's output at the bias, accumulates
// the GEMM into it and rounds it into the output: the fp32 copies of x and of the output
// never exist whole, and there is one op call where the Python path made five (casts of
// x, W and b, the GEMM, the rounding: ~5 us each at the forecaster's small shapes).
// W^T comes in fp32, [K, N] contiguous: the backend prepares it from the bfloat16 weight
// once per weight version (weight_cache; converting and transposing it cost ~20 us a call
// at D = 512, a third of the GEMM at B = 1). No autograd: the backend calls it for
// inference only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "vectorised.h"

namespace casa {
namespace {

constexpr int64_t kRows = 128;  // rows of a block, at most

void check_bf16_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), name,
              ": expected a bfloat16 CPU tensor, received ", t.scalar_type(), " on ", t.device());
}

// casa::cpu_linear_bf16 (see the header comment). x: [..., K] bfloat16; weight_t: W^T
// [K, N] float32, contiguous; bias: [N] bfloat16.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight_t,
                       const std::optional<at::Tensor>& bias) {
  check_bf16_cpu("x", x);
  TORCH_CHECK(weight_t.scalar_type() == at::kFloat && weight_t.device().is_cpu() &&
                  weight_t.dim() == 2 && weight_t.is_contiguous(),
              "weight_t: expected a contiguous float32 CPU tensor [in_features, out_features] ",
              "(W^T), received ", weight_t.scalar_type(), " of shape ", weight_t.sizes(), " on ",
              weight_t.device());
  const int64_t K = weight_t.size(0), N = weight_t.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x: expected [..., in_features] with ",
              "in_features = ", K, " (weight_t's dim 0), received shape ", x.sizes());
  if (bias.has_value()) {
    check_bf16_cpu("bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: expected [out_features] = [", N,
                "], received shape ", bias->sizes());
  }
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor out = at::empty(out_sizes, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand(out_sizes)) : out.zero_();
  const int64_t M = out.numel() / N;

  // x as [P, R, K] (a view for up to 3 dims), row m = (m / R, m % R).
  const at::Tensor x3 = x.dim() == 3   ? x
                        : x.dim() <= 2 ? x.reshape({1, -1, K})
                                       : x.reshape({-1, x.size(-2), K});
  const int64_t R = x3.size(1), s0 = x3.stride(0), s1 = x3.stride(1), s2 = x3.stride(2);
  const c10::BFloat16* x_data = x3.const_data_ptr<c10::BFloat16>();

  const float* wt = weight_t.const_data_ptr<float>();
  std::vector<float> b_fp32(bias.has_value() ? N : 0);
  if (bias.has_value()) {
    const at::Tensor b = bias->contiguous();
    const c10::BFloat16* src = b.const_data_ptr<c10::BFloat16>();
    for (int64_t n = 0; n < N; ++n) b_fp32[n] = static_cast<float>(src[n]);
  }

  const int64_t threads = cpu::threads_for(M * K * N) > 1 ? at::get_num_threads() : 1;
  const int64_t blocks = cpu::row_blocks(M, kRows, threads);
  const int64_t block_rows = (M + blocks - 1) / blocks;
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  cpu::parallel_for_aten(blocks, threads > 1 ? 1 : blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> a(block_rows * K), c(block_rows * N);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * block_rows, rows = std::min(block_rows, M - r0);
      if (rows <= 0) break;  // the last blocks of a rounded-up count can be empty
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t m = r0 + r;
        const c10::BFloat16* src = x_data + (m / R) * s0 + (m % R) * s1;
        float* row = a.data() + r * K;
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(src[k * s2]);
        if (bias.has_value()) std::copy(b_fp32.begin(), b_fp32.end(), c.begin() + r * N);
      }
      cpu::gemm(rows, N, K, a.data(), K, wt, N, c.data(), N,
                /*accumulate=*/bias.has_value());
      cpu::store_rows(c.data(), rows * N, /*relu=*/false, dst + r0 * N);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(casa, m) {
  m.def("cpu_linear_bf16(Tensor x, Tensor weight_t, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(casa, CPU, m) { m.impl("cpu_linear_bf16", &linear_bf16); }

}  // namespace casa
