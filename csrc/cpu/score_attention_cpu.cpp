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
// Stages (activations of the bottleneck are laid out [channels, batch, length]):
//   1. head: conv N -> D/4 per batch element, reducing over N in chunks of
//      kHeadChunk rows, so x is only ever copied one chunk at a time. Work items are
//      (batch element, group of chunks): the N reduction is split when B is small.
//   2. bottleneck: the four N-independent convs, O(B·D^2), each one GEMM over the
//      whole batch, its columns split across threads.
//   3. tail, per (batch element, tile of T output columns): last transposed conv
//      (GEMM + col2im into S[N, T]), value projection (GEMM into V[N, T]), then the
//      vectorised softmax epilogue of vectorised.cpp.
//
// All GEMMs run inside torch's parallel workers with the BLAS single-threaded
// (sequential_blas.h), so only one pool of threads ever runs.
//
// Temporary memory: O(B·D^2) for the bottleneck, kHeadChunk·k·D/2 per head worker,
// and N·(2T + k(T/2 + k)) values per tail worker, T chosen to keep that within one
// [N, D] buffer (tail_tile_width; T = 128 at D = 512); for bfloat16 input also one fp32
// copy of x[b] ([N, D]) per tail worker. Accumulation is fp32 for fp32/bf16 input,
// fp64 for fp64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../score_attention_args.h"
#include "sequential_blas.h"
#include "vectorised.h"

namespace casa {
namespace {

constexpr int64_t kHeadChunk = 256;    // rows of x turned into GEMM columns at a time
constexpr int64_t kMaxTailTile = 128;  // output columns per tail tile, at most

// Tail tile width T: even, and at most D/2 so that a worker's scores and values,
// 2·N·T values, fit in one [N, D] buffer.
int64_t tail_tile_width(int64_t D) { return std::min(kMaxTailTile, D / 2); }

// The taps j of the last transposed conv that reach outputs of parity q: output
// 2u + q takes tap j from input u + (q + p - j) / 2 when q + p - j is even.
std::vector<int64_t> parity_taps(int64_t k, int64_t q) {
  std::vector<int64_t> taps;
  for (int64_t j = 0; j < k; ++j) {
    if ((q + k / 2 - j) % 2 == 0) taps.push_back(j);
  }
  return taps;
}

// For each tail tile [o0, o0 + T) of the D output columns: o0 + 2c at position o0 + c
// and o0 + 2c + 1 at position o0 + T/2 + c (c < T/2), the order of the tail's GEMMs.
at::Tensor tile_parity_order(int64_t D, int64_t tile) {
  at::Tensor order = at::empty({D}, at::kLong);
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t o0 = 0; o0 < D; o0 += tile) {
    const int64_t half = std::min(tile, D - o0) / 2;
    for (int64_t c = 0; c < half; ++c) {
      o[o0 + c] = o0 + 2 * c;
      o[o0 + half + c] = o0 + 2 * c + 1;
    }
  }
  return order;
}

// at::parallel_for for bodies that call ATen ops: each worker takes the caller's
// thread-local state (below-autograd dispatch, inference mode — OpenMP workers do not
// inherit it) and keeps the BLAS single-threaded (sequential_blas.h).
template <typename F>
void parallel_for_aten(int64_t end, int64_t grain, const F& body) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, end, grain, [&](int64_t begin, int64_t stop) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const cpu::SequentialBlasGuard sequential_blas;
    body(begin, stop);
  });
}

// out = a @ b (+ bias[:, None]) with the columns split across threads: the kernel keeps
// to one pool of threads (torch's workers) instead of handing the BLAS its own.
void parallel_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor* bias) {
  const int64_t n = out.size(1);
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(32, (n + threads - 1) / threads);
  parallel_for_aten(n, grain, [&](int64_t c0, int64_t c1) {
    at::Tensor block = out.narrow(1, c0, c1 - c0);
    if (bias != nullptr) {
      at::addmm_out(block, *bias, a, b.narrow(1, c0, c1 - c0));
    } else {
      at::mm_out(block, a, b.narrow(1, c0, c1 - c0));
    }
  });
}

// relu(conv(in) + bias) for a stride-2 conv, every batch element in one GEMM:
// in [Cin, B, L] -> [Cout, B, L/2].
template <typename acc_t>
at::Tensor conv_relu(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& in,
                     int64_t k) {
  const int64_t Cin = in.size(0), B = in.size(1), L = in.size(2), Cout = weight.size(0);
  at::Tensor cols = at::empty({Cin * k, B, L / 2}, in.options());
  for (int64_t b = 0; b < B; ++b) {
    cpu::im2col_s2(in.data_ptr<acc_t>() + b * L, B * L, Cin, L, k,
                   cols.data_ptr<acc_t>() + b * (L / 2), B * (L / 2));
  }
  at::Tensor out = at::empty({Cout, B, L / 2}, in.options());
  const at::Tensor column_bias = bias.unsqueeze(1);
  parallel_mm(out.view({Cout, B * L / 2}), weight.reshape({Cout, Cin * k}),
              cols.view({Cin * k, B * L / 2}), &column_bias);
  return out.relu_();
}

// relu(conv_transpose(in) + bias) for a stride-2 transposed conv, every batch element
// in one GEMM: in [Cin, B, L] -> [Cout, B, 2L].
template <typename acc_t>
at::Tensor conv_transpose_relu(const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& in, int64_t k) {
  const int64_t Cin = in.size(0), B = in.size(1), L = in.size(2), Cout = bias.size(0);
  const at::Tensor cols = at::empty({Cout * k, B * L}, in.options());
  parallel_mm(cols, weight.reshape({Cin, Cout * k}).t(), in.view({Cin, B * L}), nullptr);
  at::Tensor out = at::empty({Cout, B, 2 * L}, in.options());
  for (int64_t b = 0; b < B; ++b) {
    cpu::col2im_s2(cols.data_ptr<acc_t>() + b * L, B * L, Cout, k, 0, L, 0, 2 * L,
                   bias.data_ptr<acc_t>(), out.data_ptr<acc_t>() + b * 2 * L, B * 2 * L);
  }
  return out.relu_();
}

template <typename scalar_t, typename acc_t>
struct Plan {
  Sizes s;
  at::ScalarType acc;
  Weights w;    // in acc_t: the caller's tensors for fp32/fp64, fp32 copies for bf16
  int64_t tile;  // tail tile width T
  // The tail's weights in the order of its GEMMs:
  std::vector<int64_t> taps[2];  // parity_taps(k, q)
  at::Tensor dec2_by_parity[2];  // [N, |taps[q]|·D/4]: (n, (jj, c)) = dec2_weight[c, n, taps[q][jj]]
  at::Tensor value_weight_t;     // [D, D]: Wv^T, columns in tile_parity_order
  at::Tensor value_bias;         // [D]: bv in tile_parity_order

  Plan(const Sizes& sizes, const Weights& weights)
      : s(sizes), acc(c10::CppTypeToScalarType<acc_t>::value), tile(tail_tile_width(sizes.d_model)) {
    for (int i = 0; i < kNumWeights; ++i) w[i] = weights[i].to(acc);
    for (int64_t q = 0; q < 2; ++q) {
      taps[q] = parity_taps(s.kernel, q);
      const at::Tensor index = at::tensor(taps[q], at::kLong);
      dec2_by_parity[q] =
          w[kDec2Weight].index_select(2, index).permute({1, 2, 0}).reshape({s.n_vars, -1});
    }
    const at::Tensor order = tile_parity_order(s.d_model, tile);
    value_weight_t = w[kValueWeight].index_select(0, order).t().contiguous();
    value_bias = w[kValueBias].index_select(0, order);
  }

  // Stage 1: relu(conv(x) + bias) for every batch element: x [B, N, D] -> [D/4, B, D/2].
  at::Tensor head(const at::Tensor& x) const {
    const int64_t B = s.batch, N = s.n_vars, D = s.d_model, C1 = D / 4, k = s.kernel;
    const at::Tensor weight = w[kEnc0Weight].reshape({C1, N * k});
    const int64_t chunks = (N + kHeadChunk - 1) / kHeadChunk;
    const int64_t threads = at::get_num_threads();
    const int64_t groups = std::min(chunks, std::max<int64_t>(1, (threads + B - 1) / B));
    const at::Tensor partial = at::empty({groups, C1, B, D / 2}, at::TensorOptions(acc));
    parallel_for_aten(B * groups, 1, [&](int64_t begin, int64_t end) {
      at::Tensor cols = at::empty({kHeadChunk * k, D / 2}, at::TensorOptions(acc));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / groups, g = item % groups;
        at::Tensor out = partial[g].select(1, b);
        for (int64_t c = g; c < chunks; c += groups) {
          const int64_t n0 = c * kHeadChunk, rows = std::min(kHeadChunk, N - n0);
          const at::Tensor chunk_cols = cols.narrow(0, 0, rows * k);
          cpu::im2col_s2(x[b].data_ptr<scalar_t>() + n0 * D, D, rows, D, k,
                         chunk_cols.data_ptr<acc_t>(), D / 2);
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
    return h1.add_(w[kEnc0Bias].view({C1, 1, 1})).relu_();
  }

  // Stage 2: the four N-independent convs: [D/4, B, D/2] -> [D/4, B, D/2].
  at::Tensor bottleneck(const at::Tensor& h1) const {
    const int64_t k = s.kernel;
    at::Tensor h = conv_relu<acc_t>(w[kEnc1Weight], w[kEnc1Bias], h1, k);
    h = conv_relu<acc_t>(w[kEnc2Weight], w[kEnc2Bias], h, k);
    h = conv_transpose_relu<acc_t>(w[kDec0Weight], w[kDec0Bias], h, k);
    return conv_transpose_relu<acc_t>(w[kDec1Weight], w[kDec1Bias], h, k);
  }

  // Scratch of one tail worker; x_acc caches x[b] in acc_t for bfloat16 input.
  struct TailScratch {
    at::Tensor rhs, scores, values, x_acc;
    int64_t x_acc_batch = -1;
  };

  TailScratch tail_scratch() const {
    const at::TensorOptions options(acc);
    const int64_t max_taps = (s.kernel + 1) / 2;
    return {at::empty({max_taps * (s.d_model / 4), tile / 2}, options),
            at::empty({s.n_vars, tile}, options), at::empty({s.n_vars, tile}, options)};
  }

  // The right operand of the last transposed conv for outputs o0 + 2c + q, c < half:
  // row block jj holds h5_b[:, o0/2 + c + (q + p - taps[q][jj]) / 2], zero outside [0, D/2).
  at::Tensor parity_rhs(const at::Tensor& h5_b, int64_t q, int64_t o0, int64_t half,
                        const at::Tensor& rhs) const {
    const int64_t C1 = s.d_model / 4, L = s.d_model / 2;
    at::Tensor out = rhs.narrow(0, 0, static_cast<int64_t>(taps[q].size()) * C1).narrow(1, 0, half);
    for (size_t jj = 0; jj < taps[q].size(); ++jj) {
      const int64_t first = o0 / 2 + (q + s.padding - taps[q][jj]) / 2;  // input of c = 0
      const int64_t c0 = std::clamp<int64_t>(-first, 0, half);
      const int64_t c1 = std::clamp<int64_t>(L - first, c0, half);
      at::Tensor block = out.narrow(0, jj * C1, C1);
      block.narrow(1, 0, c0).zero_();
      block.narrow(1, c0, c1 - c0).copy_(h5_b.narrow(1, first + c0, c1 - c0));
      block.narrow(1, c1, half - c1).zero_();
    }
    return out;
  }

  // Stage 3 for batch element b, output columns [o0, o0 + T): writes y[b, :, o0 : o0 + T].
  // h5_b: [D/4, D/2], the bottleneck's output for b. Scores and values are computed in
  // parity order (even output columns, then odd), as softmax_epilogue takes them.
  void tail_tile(const at::Tensor& x, const at::Tensor& h5_b, int64_t b, int64_t o0,
                 TailScratch& scratch, at::Tensor& y) const {
    const int64_t D = s.d_model, T = std::min(tile, D - o0), half = T / 2;
    at::Tensor S = scratch.scores.narrow(1, 0, T), V = scratch.values.narrow(1, 0, T);
    for (int64_t q = 0; q < 2; ++q) {
      at::Tensor S_q = S.narrow(1, q * half, half);
      if (taps[q].empty()) {
        S_q.zero_();  // k = 1: odd outputs take the bias alone
      } else {
        at::mm_out(S_q, dec2_by_parity[q], parity_rhs(h5_b, q, o0, half, scratch.rhs));
      }
    }
    if (scratch.x_acc_batch != b) {
      scratch.x_acc = x[b].to(acc);  // a view unless x is bfloat16
      scratch.x_acc_batch = b;
    }
    at::mm_out(V, scratch.x_acc, value_weight_t.narrow(1, o0, T));
    cpu::softmax_epilogue(S.data_ptr<acc_t>(), V.data_ptr<acc_t>(), S.stride(0),
                          w[kDec2Bias].data_ptr<acc_t>(), value_bias.data_ptr<acc_t>() + o0,
                          s.n_vars, T, x[b].data_ptr<scalar_t>() + o0,
                          y[b].data_ptr<scalar_t>() + o0, D);
  }

  void run(const at::Tensor& x, at::Tensor& y) const {
    const at::Tensor h5 = bottleneck(head(x));
    const int64_t tiles = (s.d_model + tile - 1) / tile;
    parallel_for_aten(s.batch * tiles, 1, [&](int64_t begin, int64_t end) {
      TailScratch scratch = tail_scratch();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles;
        tail_tile(x, h5.select(1, b), b, (item % tiles) * tile, scratch, y);
      }
    });
  }
};

at::Tensor fused_score_attention_cpu(const at::Tensor& x, const Weights& w) {
  const Sizes s = check_args(x, w);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, received device ", x.device());
  at::Tensor y = at::empty_like(x);
  switch (x.scalar_type()) {
    case at::kFloat: Plan<float, float>(s, w).run(x, y); break;
    case at::kDouble: Plan<double, double>(s, w).run(x, y); break;
    case at::kBFloat16: Plan<c10::BFloat16, float>(s, w).run(x, y); break;
    default:
      TORCH_CHECK(false, "x: expected dtype float32, float64 or bfloat16 on the CPU, received ",
                  x.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(casa, CPU, m) {
  m.impl("fused_score_attention", &with_weights<&fused_score_attention_cpu>);
}

}  // namespace casa
