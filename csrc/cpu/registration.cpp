// The schemas and CPU kernels of the forward's ops (csrc/cpu/score_attention_cpu.cpp holds
// the kernel plan and these entry points; docs/design.md §5.3). The backward's and the block
// epilogue's ops are registered beside their one function (backward.cpp, block_epilogue.cpp).
#include <torch/library.h>

#include "../score_attention_args.h"
#include "score_attention_ops.h"

namespace casa {

TORCH_LIBRARY_FRAGMENT(casa, m) {
  m.def("cpu_bf16_gemm() -> str", &cpu_ops::bf16_gemm_now);
  m.def("cpu_vector_isa() -> str", &cpu_ops::vector_isa_now);
  m.def("cpu_tail_tile(int batch, int n_vars, int d_model, bool for_backward) -> int",
        &cpu_ops::tail_tile);
  m.def("cpu_prepare_weights(Tensor[] weights, int tile, str bf16_gemm) -> Tensor[]");
  m.def(
      "cpu_score_attention(Tensor x, Tensor[] weights, Tensor[] prepared, int tile, "
      "str bf16_gemm) -> Tensor");
  m.def("cpu_head_partial(Tensor x, Tensor enc0_weight) -> Tensor");
  m.def(
      "cpu_bottleneck(Tensor h1, Tensor enc1_weight, Tensor enc1_bias, Tensor enc2_weight, "
      "Tensor enc2_bias, Tensor dec0_weight, Tensor dec0_bias, Tensor dec1_weight, "
      "Tensor dec1_bias) -> Tensor[]");
  m.def(
      "cpu_prepare_tail(Tensor dec2_weight, Tensor dec2_bias, Tensor? value_weight, "
      "Tensor? value_bias, int tile, str bf16_gemm) -> Tensor[]");
  m.def(
      "cpu_tail_stats(Tensor x, Tensor h5, Tensor dec2_weight, Tensor dec2_bias, "
      "Tensor[] prepared, int tile, str bf16_gemm) -> (Tensor, Tensor)");
  m.def(
      "cpu_tail_output(Tensor x, Tensor h5, Tensor dec2_weight, Tensor dec2_bias, "
      "Tensor value_weight, Tensor value_bias, Tensor[] prepared, int tile, str bf16_gemm, "
      "Tensor col_max, Tensor col_sum) -> Tensor");
  m.def(
      "cpu_tail_fused(Tensor x, Tensor h5, Tensor dec2_weight, Tensor dec2_bias, "
      "Tensor value_weight, Tensor value_bias, Tensor[] prepared, int tile, str bf16_gemm) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(casa, CPU, m) {
  m.impl("fused_score_attention", &with_weights<&cpu_ops::fused_score_attention_cpu>);
  m.impl("cpu_prepare_weights", &cpu_ops::prepare_weights);
  m.impl("cpu_score_attention", &cpu_ops::score_attention_prepared);
  m.impl("cpu_head_partial", &cpu_ops::head_partial);
  m.impl("cpu_bottleneck", &cpu_ops::bottleneck);
  m.impl("cpu_prepare_tail", &cpu_ops::prepare_tail);
  m.impl("cpu_tail_stats", &cpu_ops::tail_stats);
  m.impl("cpu_tail_output", &cpu_ops::tail_output);
  m.impl("cpu_tail_fused", &cpu_ops::tail_fused);
}

}  // namespace casa
