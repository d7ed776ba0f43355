// The official block's work after the attention (MLP_attention), fused on the CPU:
//
//   z = LN(y);  out = LN(relu(z W1^T + b1) W2^T + b2 + z);  then relu(out) when asked
//
// with ONE LayerNorm (weight, bias, eps) used twice, as in the official block, and the
// model's ReLU after the block folded in. y: [M, D] rows (M = B·N), float32 or bfloat16.
// Each worker takes blocks of at most kRows rows (cpu::row_blocks: as many per worker) and
// runs the whole chain on a block while it is in cache: two GEMMs with K = D and five
// row-wise passes that never leave the block, where the eager module writes and re-reads
// six [M, D] tensors. Temporary memory: three [kRows, D] fp32 buffers per worker (and one
// bfloat16 one, the GEMMs' rounded operand). Work too small for two threads
// (cpu::threads_for) runs on one.
//
// The GEMMs take the MLP weights prepared once per weight version (cpu_prepare_mlp):
// W^T [D, D] in the input dtype, for bfloat16 packed for the bfloat16 GEMMs (gemm.h;
// without a bfloat16 GEMM unit, fp32 W^T and fp32 GEMMs). Accumulation is fp32;
// bfloat16 input has its GEMM operands rounded to bfloat16 as PyTorch's bfloat16
// Linear does, and everything else in fp32 until the output is rounded.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "gemm.h"
#include "parallel.h"
#include "sequential_blas.h"
#include "vectorised.h"

namespace casa {
namespace {

// Rows of a block, at most. A D = 512 fp32 GEMM goes to ATen's matmul (gemm.h), which
// packs W^T (1 MiB) on every call: 128-row blocks halve that against 64 and ran the
// forecaster ~4% faster on a Zen 3 EPYC (docs/design.md §11.5), though there the three
// [128, 512] fp32 buffers (768 KiB a worker) outgrow a core's 512 KiB L2.
constexpr int64_t kRows = 128;

// Whether bfloat16 input runs its GEMMs in bfloat16 for the tier named by the caller.
bool bf16_gemm_for(const at::Tensor& y, const std::string& bf16_gemm) {
  return y.scalar_type() == at::kBFloat16 &&
         cpu::bf16_gemm_from_name(bf16_gemm) != cpu::Bf16Gemm::kNone;
}

// v [D] as contiguous floats: v's own data where it is a contiguous float32 tensor, else
// converted into `storage`, without an ATen op (a cast per vector cost a dispatch and an
// allocation on every call: ~4 us each, against ~30 us for the whole block at ETTh1).
const float* float_vector(const at::Tensor& v, std::vector<float>& storage) {
  if (v.scalar_type() == at::kFloat && v.is_contiguous()) return v.data_ptr<float>();
  storage.resize(v.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "float_vector", [&] {
    const auto entries = v.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < v.size(0); ++i) storage[i] = static_cast<float>(entries[i]);
  });
  return storage.data();
}

void check_mlp_weight(const char* name, const at::Tensor& w, int64_t D) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == D && w.size(1) == D, name,
              ": expected a [d_model, d_model] = [", D, ", ", D, "] tensor, received shape ",
              w.sizes());
}

// casa::cpu_prepare_mlp: [W1^T, W2^T] for the epilogue's GEMMs (see the header comment).
std::vector<at::Tensor> prepare_mlp(const at::Tensor& mlp0_weight, const at::Tensor& mlp2_weight,
                                    const std::string& bf16_gemm) {
  const int64_t D = mlp0_weight.size(0);
  check_mlp_weight("mlp0_weight", mlp0_weight, D);
  check_mlp_weight("mlp2_weight", mlp2_weight, D);
  TORCH_CHECK(mlp0_weight.scalar_type() == mlp2_weight.scalar_type(),
              "mlp2_weight: expected the dtype of mlp0_weight, received ",
              mlp2_weight.scalar_type());
  std::vector<at::Tensor> out;
  for (const at::Tensor& w : {mlp0_weight, mlp2_weight}) {
    if (bf16_gemm_for(w, bf16_gemm)) {
      const at::Tensor wt = w.t().contiguous();
      at::Tensor packed = at::empty({cpu::packed_bf16_size(D, D)}, w.options());
      cpu::pack_bf16(D, D, wt.data_ptr<c10::BFloat16>(), D, packed.data_ptr<c10::BFloat16>());
      out.push_back(packed);
    } else {
      out.push_back(w.t().to(at::kFloat).contiguous());
    }
  }
  return out;
}

template <typename scalar_t>
void run_epilogue(const at::Tensor& y, const float* norm_w, const float* norm_b, float eps,
                  const at::Tensor& w1t, const float* b1, const at::Tensor& w2t, const float* b2,
                  bool bf16, bool relu_out, at::Tensor& out) {
  const int64_t M = y.size(0), D = y.size(1);
  const scalar_t* in = y.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t threads = cpu::threads_for(2 * M * D * D) > 1 ? at::get_num_threads() : 1;
  const int64_t blocks = cpu::row_blocks(M, kRows, threads);
  const int64_t block_rows = (M + blocks - 1) / blocks;
  at::parallel_for(0, blocks, threads > 1 ? 1 : blocks, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlasGuard sequential_blas;
    std::vector<float> z(kRows * D), h(kRows * D), o(kRows * D);
    std::vector<c10::BFloat16> a_bf16(bf16 ? kRows * D : 0);
    // C[rows, D] = A[rows, D] · W^T, the operand rounded to bfloat16 on the bfloat16 path.
    const auto gemm = [&](const float* A, int64_t rows, const at::Tensor& wt, float* C) {
      if (bf16) {
        cpu::to_bf16(A, rows * D, a_bf16.data());
        cpu::gemm_bf16(rows, D, D, a_bf16.data(), D, wt.data_ptr<c10::BFloat16>(), C, D, false);
      } else {
        cpu::gemm(rows, D, D, A, D, wt.data_ptr<float>(), D, C, D, false);
      }
    };
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * block_rows, rows = std::min(block_rows, M - r0);
      if (rows <= 0) break;  // the last blocks of a rounded-up count can be empty
      cpu::layer_norm_rows(in + r0 * D, rows, D, norm_w, norm_b, eps, z.data());
      gemm(z.data(), rows, w1t, h.data());
      cpu::add_bias_relu_rows(h.data(), rows, D, b1);
      gemm(h.data(), rows, w2t, o.data());
      cpu::add_bias_residual_rows(o.data(), rows, D, b2, z.data());
      cpu::layer_norm_rows(o.data(), rows, D, norm_w, norm_b, eps, h.data());
      cpu::store_rows(h.data(), rows * D, relu_out, dst + r0 * D);
    }
    if (bf16) cpu::release_bf16_gemm();
  });
}

// casa::cpu_block_epilogue (see the header comment). Vectors (norm, biases) any float
// dtype of D entries; mlp_prepared from cpu_prepare_mlp with the same bf16_gemm.
at::Tensor block_epilogue(const at::Tensor& y, const at::Tensor& norm_weight,
                          const at::Tensor& norm_bias, double eps, at::TensorList mlp_prepared,
                          const at::Tensor& mlp0_bias, const at::Tensor& mlp2_bias,
                          const std::string& bf16_gemm, bool relu_out) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.device().is_cpu(),
              "y: expected a contiguous 2-D CPU tensor [rows, d_model], received shape ",
              y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16,
              "y: expected dtype float32 or bfloat16, received ", y.scalar_type());
  const int64_t D = y.size(1);
  TORCH_CHECK(mlp_prepared.size() == 2, "mlp_prepared: expected the 2 tensors of cpu_prepare_mlp");
  std::vector<float> storage[4];
  const float* f[4];
  int i = 0;
  for (const at::Tensor& v : {norm_weight, norm_bias, mlp0_bias, mlp2_bias}) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == D, "epilogue vectors: expected [d_model] = [", D,
                "], received shape ", v.sizes());
    TORCH_CHECK(v.is_floating_point() && v.device().is_cpu(),
                "epilogue vectors: expected floating-point CPU tensors, received ", v.scalar_type(),
                " on ", v.device());
    f[i] = float_vector(v, storage[i]);
    ++i;
  }
  at::Tensor out = at::empty_like(y);
  if (y.size(0) == 0) return out;
  const bool bf16 = bf16_gemm_for(y, bf16_gemm);
  if (y.scalar_type() == at::kFloat) {
    run_epilogue<float>(y, f[0], f[1], static_cast<float>(eps), mlp_prepared[0], f[2],
                        mlp_prepared[1], f[3], false, relu_out, out);
  } else {
    run_epilogue<c10::BFloat16>(y, f[0], f[1], static_cast<float>(eps), mlp_prepared[0], f[2],
                                mlp_prepared[1], f[3], bf16, relu_out, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(casa, m) {
  m.def("cpu_prepare_mlp(Tensor mlp0_weight, Tensor mlp2_weight, str bf16_gemm) -> Tensor[]");
  m.def(
      "cpu_block_epilogue(Tensor y, Tensor norm_weight, Tensor norm_bias, float eps, "
      "Tensor[] mlp_prepared, Tensor mlp0_bias, Tensor mlp2_bias, str bf16_gemm, "
      "bool relu_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(casa, CPU, m) {
  m.impl("cpu_prepare_mlp", &prepare_mlp);
  m.impl("cpu_block_epilogue", &block_epilogue);
}

}  // namespace casa
