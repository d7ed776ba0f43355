// Argument checks shared by every device implementation of casa::fused_score_attention.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "weight_index.h"

namespace casa {

using Weights = std::array<at::Tensor, kNumWeights>;

struct Sizes {
  int64_t batch, n_vars, d_model, kernel, padding;
};

// Checks ranks, sizes, dtypes, devices and contiguity; returns the problem sizes. An
// empty batch (B = 0) passes: the implementations return an empty result for it. With
// conv_any_layout the layouts of the six conv weights are left to the caller (the CUDA
// binding takes them contiguous or as views of the packed tensors the cuda backend
// prepares, and packs any other layout itself).
inline Sizes check_args(const at::Tensor& x, const Weights& w, bool conv_any_layout = false) {
  TORCH_CHECK(x.dim() == 3, "x: expected a 3-D tensor [batch, n_vars, d_model], received shape ",
              x.sizes());
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0,
              "x: expected non-zero n_vars and d_model (dims 1, 2), received shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x: expected a contiguous tensor");
  TORCH_CHECK(w[kEnc0Weight].dim() == 3, "enc0_weight: expected a 3-D tensor, received shape ",
              w[kEnc0Weight].sizes());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), k = w[kEnc0Weight].size(2);
  TORCH_CHECK(D % 8 == 0, "x: expected d_model (dim 2) a multiple of 8, received ", D);
  TORCH_CHECK(k % 2 == 1, "enc0_weight: expected an odd kernel size (dim 2), received ", k);
  const int64_t C1 = D / 4, C2 = D / 2;
  std::array<std::vector<int64_t>, kNumWeights> expected;
  expected[kValueWeight] = {D, D};
  expected[kValueBias] = {D};
  expected[kEnc0Weight] = {C1, N, k};
  expected[kEnc0Bias] = {C1};
  expected[kEnc1Weight] = {C2, C1, k};
  expected[kEnc1Bias] = {C2};
  expected[kEnc2Weight] = {D, C2, k};
  expected[kEnc2Bias] = {D};
  expected[kDec0Weight] = {D, C2, k};
  expected[kDec0Bias] = {C2};
  expected[kDec1Weight] = {C2, C1, k};
  expected[kDec1Bias] = {C1};
  expected[kDec2Weight] = {C1, N, k};
  expected[kDec2Bias] = {N};
  for (int i = 0; i < kNumWeights; ++i) {
    TORCH_CHECK(w[i].sizes() == at::IntArrayRef(expected[i]), kWeightNames[i], ": expected shape ",
                at::IntArrayRef(expected[i]), ", received ", w[i].sizes());
    TORCH_CHECK(w[i].scalar_type() == x.scalar_type(), kWeightNames[i], ": expected dtype ",
                x.scalar_type(), " (that of x), received ", w[i].scalar_type());
    TORCH_CHECK(w[i].device() == x.device(), kWeightNames[i], ": expected device ", x.device(),
                " (that of x), received ", w[i].device());
    const bool conv = i == kEnc0Weight || i == kEnc1Weight || i == kEnc2Weight ||
                      i == kDec0Weight || i == kDec1Weight || i == kDec2Weight;
    TORCH_CHECK(w[i].is_contiguous() || (conv_any_layout && conv), kWeightNames[i],
                ": expected a contiguous tensor");
  }
  return {B, N, D, k, k / 2};
}

// Adapts an implementation taking (x, Weights) to the schema's 15 tensor arguments,
// for registration: m.impl("fused_score_attention", &with_weights<&impl>).
template <at::Tensor (*Impl)(const at::Tensor&, const Weights&)>
at::Tensor with_weights(const at::Tensor& x, const at::Tensor& value_weight,
                        const at::Tensor& value_bias, const at::Tensor& enc0_weight,
                        const at::Tensor& enc0_bias, const at::Tensor& enc1_weight,
                        const at::Tensor& enc1_bias, const at::Tensor& enc2_weight,
                        const at::Tensor& enc2_bias, const at::Tensor& dec0_weight,
                        const at::Tensor& dec0_bias, const at::Tensor& dec1_weight,
                        const at::Tensor& dec1_bias, const at::Tensor& dec2_weight,
                        const at::Tensor& dec2_bias) {
  return Impl(
      x, {value_weight, value_bias, enc0_weight, enc0_bias, enc1_weight, enc1_bias, enc2_weight,
          enc2_bias, dec0_weight, dec0_bias, dec1_weight, dec1_bias, dec2_weight, dec2_bias});
}

}  // namespace casa
