// The 14 parameters of casa::fused_score_attention, named, in schema order — the one
// C++ statement of that order, free of torch headers so that the torch-free CUDA
// kernels (csrc/cuda/score_attention_kernels.cu) use it as well as the bindings.
//
// The order is that of the Python NamedTuple casa_kernels.weights.ScoreAttentionWeights
// and of the schema in csrc/score_attention.cpp; tests/test_weight_index.py parses this
// file and checks both the enum and kWeightNames against the Python fields.
//
// Shapes (N = variates, D = d_model, k = kernel, C1 = D/4, C2 = D/2):
//   value_weight [D, D], value_bias [D],
//   enc0_weight [C1, N, k], enc0_bias [C1], enc1_weight [C2, C1, k], enc1_bias [C2],
//   enc2_weight [D, C2, k], enc2_bias [D], dec0_weight [D, C2, k], dec0_bias [C2],
//   dec1_weight [C2, C1, k], dec1_bias [C1], dec2_weight [C1, N, k], dec2_bias [N].
#pragma once

namespace casa {

enum WeightIndex : int {
  kValueWeight,
  kValueBias,
  kEnc0Weight,
  kEnc0Bias,
  kEnc1Weight,
  kEnc1Bias,
  kEnc2Weight,
  kEnc2Bias,
  kDec0Weight,
  kDec0Bias,
  kDec1Weight,
  kDec1Bias,
  kDec2Weight,
  kDec2Bias,
  kNumWeights
};

// kWeightNames[i]: the schema (and Python field) name of parameter i.
inline constexpr const char* kWeightNames[kNumWeights] = {
    "value_weight", "value_bias",  "enc0_weight", "enc0_bias",   "enc1_weight",
    "enc1_bias",    "enc2_weight", "enc2_bias",   "dec0_weight", "dec0_bias",
    "dec1_weight",  "dec1_bias",   "dec2_weight", "dec2_bias"};

}  // namespace casa
