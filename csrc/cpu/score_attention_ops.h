// Entry points of the CPU forward's ops (score_attention_cpu.cpp), registered in
// registration.cpp: casa::cpu_prepare_weights, casa::cpu_score_attention, the stages of
// variate parallelism (head partial sums, tail statistics and output), the bottleneck and
// the fused tail that keep what the backward takes, and casa::fused_score_attention on the
// CPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../score_attention_args.h"

namespace casa::cpu_ops {

std::vector<at::Tensor> prepare_weights(at::TensorList weights, int64_t tile,
                                        const std::string& bf16_gemm);
at::Tensor score_attention_prepared(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList prepared, int64_t tile,
                                    const std::string& bf16_gemm);
at::Tensor head_partial(const at::Tensor& x_in, const at::Tensor& enc0_weight);
std::vector<at::Tensor> bottleneck(const at::Tensor& h1, const at::Tensor& enc1_weight,
                                   const at::Tensor& enc1_bias, const at::Tensor& enc2_weight,
                                   const at::Tensor& enc2_bias, const at::Tensor& dec0_weight,
                                   const at::Tensor& dec0_bias, const at::Tensor& dec1_weight,
                                   const at::Tensor& dec1_bias);
std::vector<at::Tensor> prepare_tail(const at::Tensor& dec2_weight, const at::Tensor& dec2_bias,
                                     const std::optional<at::Tensor>& value_weight,
                                     const std::optional<at::Tensor>& value_bias, int64_t tile,
                                     const std::string& bf16_gemm);
std::tuple<at::Tensor, at::Tensor> tail_stats(const at::Tensor& x, const at::Tensor& h5,
                                              const at::Tensor& dec2_weight,
                                              const at::Tensor& dec2_bias, at::TensorList prepared,
                                              int64_t tile, const std::string& bf16_gemm);
at::Tensor tail_output(const at::Tensor& x, const at::Tensor& h5, const at::Tensor& dec2_weight,
                       const at::Tensor& dec2_bias, const at::Tensor& value_weight,
                       const at::Tensor& value_bias, at::TensorList prepared, int64_t tile,
                       const std::string& bf16_gemm, const at::Tensor& col_max,
                       const at::Tensor& col_sum);
std::tuple<at::Tensor, at::Tensor, at::Tensor> tail_fused(
    const at::Tensor& x, const at::Tensor& h5, const at::Tensor& dec2_weight,
    const at::Tensor& dec2_bias, const at::Tensor& value_weight, const at::Tensor& value_bias,
    at::TensorList prepared, int64_t tile, const std::string& bf16_gemm);
int64_t tail_tile(int64_t batch, int64_t n_vars, int64_t d_model, bool for_backward);
std::string bf16_gemm_now();
std::string vector_isa_now();
at::Tensor fused_score_attention_cpu(const at::Tensor& x, const Weights& w);

}  // namespace casa::cpu_ops
