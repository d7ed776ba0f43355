// CUDA implementation of casa::fused_score_attention: the torch side of the kernels
// in score_attention_kernels.cu (docs/design.md §5, §6).
//
// The six conv weights are read packed per tap (packed_taps): the cuda backend
// (casa_kernels/ops/backends/cuda.py) packs them once per weight version through the
// weight cache; other layouts are packed here, on every call.
//
// Validates the arguments (check_args, shared with the CPU implementation), allocates
// y [B, N, D] (dtype of x) and one fp32 workspace (gpu::workspace_floats: O(B·D²),
// nothing of size [B, N, D]) and enqueues every stage on the
// current CUDA stream. Supports float32, float16 and bfloat16.
//
// Only c10/cuda headers (c10::cuda::getCurrentCUDAStream is what at::cuda's alias
// names): ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which the
// compile-only CI toolkit lacks.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../score_attention_args.h"
#include "score_attention_kernels.h"

namespace casa {
namespace {

gpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return gpu::DType::kFloat32;
    case at::kHalf: return gpu::DType::kFloat16;
    case at::kBFloat16: return gpu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "x: expected dtype float32, float16 or bfloat16 on CUDA, received ", t);
  }
}

// `weight` ([Cout, Cin, k], or [Cin, Cout, k] when `transposed`) packed per tap as the
// conv kernel reads it (launch_plan.h): a [k, Cout, packed_row(Cin)] tensor, the row
// padding zero. A view of such a tensor with the weight's shape (what the cuda backend's
// weight cache hands over, casa_kernels/ops/backends/cuda.py: packed_taps) is used as it
// is; any other layout is packed here, on every call.
at::Tensor packed_taps(const at::Tensor& weight, bool transposed) {
  const int64_t cout = weight.size(transposed ? 1 : 0), cin = weight.size(transposed ? 0 : 1);
  const int64_t k = weight.size(2);
  const int64_t row = gpu::packed_row(cin, static_cast<int>(weight.element_size()));
  const std::vector<int64_t> strides = transposed ? std::vector<int64_t>{1, row, cout * row}
                                                  : std::vector<int64_t>{row, 1, cout * row};
  if (weight.strides() == at::IntArrayRef(strides) &&
      reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0) {
    return weight;
  }
  at::Tensor packed = at::zeros({k, cout, row}, weight.options());
  packed.narrow(2, 0, cin).copy_(transposed ? weight.permute({2, 1, 0})
                                            : weight.permute({2, 0, 1}));
  return packed;
}

at::Tensor fused_score_attention_cuda(const at::Tensor& x, const Weights& w) {
  const Sizes s = check_args(x, w, /*conv_any_layout=*/true);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, received device ", x.device());
  if (s.batch == 0) return at::empty_like(x);
  const gpu::DType dtype = kernel_dtype(x.scalar_type());

  const gpu::Problem problem{s.batch, s.n_vars, s.d_model, s.kernel};
  const char* why = nullptr;
  TORCH_CHECK(gpu::problem_supported(problem, &why), "x: shape ", x.sizes(), " (kernel ", s.kernel,
              ") is not supported by the CUDA kernels: ", why);

  const c10::cuda::CUDAGuard guard(x.device());
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount,
                                        static_cast<int>(x.get_device())));
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        static_cast<int>(x.get_device())));
  const size_t smem_needed = gpu::shared_memory_bytes(dtype);
  TORCH_CHECK(static_cast<size_t>(smem_optin) >= smem_needed, "the CUDA kernels need ", smem_needed,
              " bytes of shared memory per block; this GPU allows ", smem_optin,
              " (sm_80 and newer GPUs allow at least 99 KiB; use backend=\"triton\" here)");
  const gpu::Plan plan = gpu::make_plan(problem, sm_count);
  at::Tensor y = at::empty_like(x);
  at::Tensor workspace = at::empty({static_cast<int64_t>(gpu::workspace_floats(problem, plan))},
                                   x.options().dtype(at::kFloat));

  gpu::Params params{};
  params.dtype = dtype;
  params.problem = problem;
  params.plan = plan;
  // The value GEMM streams rows of x and of the value weight in 16-byte cp.async copies:
  // a tensor whose data does not start on 16 bytes (an offset view) is copied first.
  auto aligned16 = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
  };
  const at::Tensor x16 = aligned16(x), value_weight16 = aligned16(w[kValueWeight]);
  params.x = x16.data_ptr();
  for (int i = 0; i < kNumWeights; ++i) params.weights[i] = w[i].data_ptr();
  params.weights[kValueWeight] = value_weight16.data_ptr();
  // The conv weights packed per tap; kept alive until the launches are enqueued (the
  // caching allocator orders any reuse of their memory after them on this stream).
  const at::Tensor taps[] = {packed_taps(w[kEnc0Weight], false), packed_taps(w[kEnc1Weight], false),
                             packed_taps(w[kEnc2Weight], false), packed_taps(w[kDec0Weight], true),
                             packed_taps(w[kDec1Weight], true),  packed_taps(w[kDec2Weight], true)};
  const WeightIndex tap_weights[] = {kEnc0Weight, kEnc1Weight, kEnc2Weight,
                                     kDec0Weight, kDec1Weight, kDec2Weight};
  for (int i = 0; i < 6; ++i) params.weights[tap_weights[i]] = taps[i].data_ptr();
  params.y = y.data_ptr();
  params.workspace = workspace.data_ptr<float>();
  C10_CUDA_CHECK(
      gpu::launch_fused_score_attention(params, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

// Why the kernels cannot serve a problem of these sizes, "" when they can: the limits of
// gpu::problem_supported, asked by the Python backend before dispatch.
std::string cuda_shape_limits(int64_t batch, int64_t n_vars, int64_t d_model, int64_t kernel) {
  const char* why = nullptr;
  return gpu::problem_supported({batch, n_vars, d_model, kernel}, &why) ? std::string() : why;
}

}  // namespace

// Defined here, not in csrc/score_attention.cpp: the op exists only where the CUDA
// kernels were built.
TORCH_LIBRARY_FRAGMENT(casa, m) {
  m.def("cuda_shape_limits(int batch, int n_vars, int d_model, int kernel) -> str",
        &cuda_shape_limits);
}

TORCH_LIBRARY_IMPL(casa, CUDA, m) {
  m.impl("fused_score_attention", &with_weights<&fused_score_attention_cuda>);
}

}  // namespace casa
