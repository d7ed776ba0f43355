// Fused CPU implementation of casa::fused_score_attention (DESIGN §5).
//
// Every convolution is a GEMM on the weight exactly as stored, so nothing is
// re-laid out per call:
//
// * stride-2 conv: weight [Cout, Cin, k] viewed as [Cout, Cin·k] times the columns
//   of the input (im2col_s2, K = Cin·k, zeros only at the two borders);
// * stride-2 transposed conv (output_padding 1): weight [Cin, Cout, k] viewed as
//   [Cin, Cout·k], transposed, times the input gives one row per (output channel,
//   tap); col2im_s2 adds each tap into output column 2i - p + j. No structural zeros
//   are multiplied.
//
// Stages per batch element b:
//   1. head: conv N -> D/4 reduces over N in chunks of kHeadChunk rows, so x is only
//      ever copied one chunk at a time (chunks split across threads when B is small);
//   2. bottleneck: the four N-independent convs, O(D^2);
//   3. tail, per tile of T output columns: last transposed conv (GEMM + col2im into
//      S[N, T]), value projection (GEMM into V[N, T]), then the vectorised softmax
//      epilogue of vectorised.cpp. Only [N, T]-sized scratch is held per thread.
//
// Temporary memory: O(D^2) per batch element in flight, about N·T·(2 + k/2) values per
// tail worker, and for bfloat16 input one fp32 copy of x[b] ([N, D]) per batch element
// in flight. Accumulation is fp32 for fp32/bf16 input, fp64 for fp64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../score_attention_args.h"
#include "vectorised.h"

namespace casa {
namespace {

constexpr int64_t kHeadChunk = 256;  // rows of x turned into GEMM columns at a time
constexpr int64_t kTailTile = 128;   // output columns per tail tile

int64_t floor_div2(int64_t v) { return v >= 0 ? v / 2 : -((1 - v) / 2); }

// Runs f(begin, end) over [0, n): split across threads when `parallel`, else inline.
template <typename F>
void for_range(bool parallel, int64_t n, const F& f) {
  if (parallel) {
    at::parallel_for(0, n, 1, f);
  } else {
    f(0, n);
  }
}

// relu(conv(in) + bias) for a stride-2 conv: in [Cin, L] -> [Cout, L/2].
template <typename acc_t>
at::Tensor conv_relu(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& in,
                     int64_t k) {
  const int64_t Cin = in.size(0), L = in.size(1);
  at::Tensor cols = at::empty({Cin * k, L / 2}, in.options());
  cpu::im2col_s2(in.data_ptr<acc_t>(), in.stride(0), Cin, L, k, cols.data_ptr<acc_t>());
  return at::addmm(bias.unsqueeze(1), weight.reshape({weight.size(0), -1}), cols).relu_();
}

// relu(conv_transpose(in) + bias) for a stride-2 transposed conv: in [Cin, L] -> [Cout, 2L].
template <typename acc_t>
at::Tensor conv_transpose_relu(const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& in, int64_t k) {
  const int64_t Cout = bias.size(0), L = in.size(1);
  const at::Tensor cols = at::mm(weight.reshape({weight.size(0), -1}).t(), in);  // [Cout·k, L]
  at::Tensor out = at::empty({Cout, 2 * L}, in.options());
  cpu::col2im_s2(cols.data_ptr<acc_t>(), L, Cout, k, 0, L, 0, 2 * L, bias.data_ptr<acc_t>(),
                 out.data_ptr<acc_t>(), 2 * L);
  return out.relu_();
}

template <typename scalar_t, typename acc_t>
struct Plan {
  Sizes s;
  at::ScalarType acc;
  Weights w;  // in acc_t: views of the caller's tensors for fp32/fp64, copies for bf16

  Plan(const Sizes& sizes, const Weights& weights)
      : s(sizes), acc(c10::CppTypeToScalarType<acc_t>::value) {
    for (int i = 0; i < kNumWeights; ++i) w[i] = weights[i].to(acc);
  }

  // Stage 1: h1 = relu(conv(x_b) + bias), [D/4, D/2]; the N reduction split over threads.
  at::Tensor head(const at::Tensor& x_b, bool parallel) const {
    const int64_t N = s.n_vars, D = s.d_model, C1 = D / 4, k = s.kernel;
    const at::Tensor weight = w[kEnc0Weight].reshape({C1, N * k});
    const int64_t chunks = (N + kHeadChunk - 1) / kHeadChunk;
    const int64_t groups = parallel ? std::min<int64_t>(at::get_num_threads(), chunks) : 1;
    const at::Tensor partial = at::empty({groups, C1, D / 2}, at::TensorOptions(acc));
    for_range(groups > 1, groups, [&](int64_t g0, int64_t g1) {
      at::Tensor cols = at::empty({kHeadChunk * k, D / 2}, at::TensorOptions(acc));
      for (int64_t g = g0; g < g1; ++g) {
        at::Tensor out = partial[g];
        for (int64_t c = g; c < chunks; c += groups) {
          const int64_t n0 = c * kHeadChunk, rows = std::min(kHeadChunk, N - n0);
          const at::Tensor chunk_cols = cols.narrow(0, 0, rows * k);
          cpu::im2col_s2(x_b.data_ptr<scalar_t>() + n0 * D, D, rows, D, k,
                         chunk_cols.data_ptr<acc_t>());
          const at::Tensor a = weight.narrow(1, n0 * k, rows * k);
          if (c == g) {
            at::mm_out(out, a, chunk_cols);
          } else {
            out.addmm_(a, chunk_cols);
          }
        }
      }
    });
    at::Tensor h1 = groups > 1 ? partial.sum(0) : partial[0];
    return h1.add_(w[kEnc0Bias].unsqueeze(1)).relu_();
  }

  // Stage 2: the four N-independent convs: [D/4, D/2] -> [D/4, D/2].
  at::Tensor bottleneck(const at::Tensor& h1) const {
    const int64_t k = s.kernel;
    at::Tensor h = conv_relu<acc_t>(w[kEnc1Weight], w[kEnc1Bias], h1, k);
    h = conv_relu<acc_t>(w[kEnc2Weight], w[kEnc2Bias], h, k);
    h = conv_transpose_relu<acc_t>(w[kDec0Weight], w[kDec0Bias], h, k);
    return conv_transpose_relu<acc_t>(w[kDec1Weight], w[kDec1Bias], h, k);
  }

  // Scratch of one tail worker.
  struct TailScratch {
    at::Tensor cols, scores, values;
  };

  TailScratch tail_scratch() const {
    const at::TensorOptions options(acc);
    return {at::empty({s.n_vars * s.kernel, kTailTile / 2 + s.kernel}, options),
            at::empty({s.n_vars, kTailTile}, options), at::empty({s.n_vars, kTailTile}, options)};
  }

  // Stage 3 for output columns [o0, o0 + T): writes y_b[:, o0 : o0 + T].
  void tail_tile(const at::Tensor& h5, const scalar_t* x_b, const at::Tensor& x_acc, int64_t o0,
                 TailScratch& scratch, scalar_t* y_b) const {
    const int64_t N = s.n_vars, D = s.d_model, k = s.kernel, p = s.padding;
    const int64_t T = std::min(kTailTile, D - o0);
    // Input columns i reaching the tile: o0 <= 2i - p + j < o0 + T for some tap j < k.
    const int64_t i0 = std::max<int64_t>(0, -floor_div2(p - o0));
    const int64_t i1 = std::min(D / 2, floor_div2(o0 + T - 1 + p) + 1);
    at::Tensor cols = scratch.cols.narrow(1, 0, i1 - i0);
    at::mm_out(cols, w[kDec2Weight].reshape({D / 4, N * k}).t(), h5.narrow(1, i0, i1 - i0));
    at::Tensor S = scratch.scores.narrow(1, 0, T), V = scratch.values.narrow(1, 0, T);
    cpu::col2im_s2(cols.data_ptr<acc_t>(), cols.stride(0), N, k, i0, i1 - i0, o0, T,
                   w[kDec2Bias].data_ptr<acc_t>(), S.data_ptr<acc_t>(), S.stride(0));
    at::addmm_out(V, w[kValueBias].narrow(0, o0, T), x_acc, w[kValueWeight].narrow(0, o0, T).t());
    cpu::softmax_epilogue(S.data_ptr<acc_t>(), V.data_ptr<acc_t>(), S.stride(0), N, T, x_b + o0,
                          y_b + o0, D);
  }

  void batch_element(const at::Tensor& x, at::Tensor& y, int64_t b, bool parallel) const {
    const int64_t D = s.d_model;
    const at::Tensor x_b = x[b];
    const at::Tensor x_acc = x_b.to(acc);  // a view unless x is bfloat16
    const at::Tensor h5 = bottleneck(head(x_b, parallel));
    const int64_t tiles = (D + kTailTile - 1) / kTailTile;
    const scalar_t* xp = x_b.data_ptr<scalar_t>();
    scalar_t* yp = y[b].data_ptr<scalar_t>();
    for_range(parallel && tiles > 1, tiles, [&](int64_t t0, int64_t t1) {
      TailScratch scratch = tail_scratch();
      for (int64_t t = t0; t < t1; ++t) tail_tile(h5, xp, x_acc, t * kTailTile, scratch, yp);
    });
  }
};

template <typename scalar_t, typename acc_t>
void run(const at::Tensor& x, const Weights& w, const Sizes& s, at::Tensor& y) {
  const Plan<scalar_t, acc_t> plan(s, w);
  if (s.batch >= at::get_num_threads()) {
    // One batch element per worker; its GEMMs run single-threaded inside the region.
    at::parallel_for(0, s.batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) plan.batch_element(x, y, b, /*parallel=*/false);
    });
  } else {
    for (int64_t b = 0; b < s.batch; ++b) plan.batch_element(x, y, b, /*parallel=*/true);
  }
}

at::Tensor fused_score_attention_cpu(
    const at::Tensor& x, const at::Tensor& value_weight, const at::Tensor& value_bias,
    const at::Tensor& enc0_weight, const at::Tensor& enc0_bias, const at::Tensor& enc1_weight,
    const at::Tensor& enc1_bias, const at::Tensor& enc2_weight, const at::Tensor& enc2_bias,
    const at::Tensor& dec0_weight, const at::Tensor& dec0_bias, const at::Tensor& dec1_weight,
    const at::Tensor& dec1_bias, const at::Tensor& dec2_weight, const at::Tensor& dec2_bias) {
  const Weights w = {value_weight, value_bias, enc0_weight, enc0_bias, enc1_weight,
                     enc1_bias,    enc2_weight, enc2_bias, dec0_weight, dec0_bias,
                     dec1_weight,  dec1_bias,  dec2_weight, dec2_bias};
  const Sizes s = check_args(x, w);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, received device ", x.device());
  at::Tensor y = at::empty_like(x);
  switch (x.scalar_type()) {
    case at::kFloat: run<float, float>(x, w, s, y); break;
    case at::kDouble: run<double, double>(x, w, s, y); break;
    case at::kBFloat16: run<c10::BFloat16, float>(x, w, s, y); break;
    default:
      TORCH_CHECK(false, "x: expected dtype float32, float64 or bfloat16 on the CPU, received ",
                  x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(casa, CPU, m) { m.impl("fused_score_attention", &fused_score_attention_cpu); }

}  // namespace casa
