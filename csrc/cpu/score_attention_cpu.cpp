// Fused CPU implementation of casa::fused_score_attention (DESIGN §5).
//
// Every convolution is a sum of GEMMs over its taps on zero-padded buffers — no
// im2col. Layout is the natural one, [channels, length], per batch element:
//
// * stride-2 conv: with j - p = 2q + r, tap j reads in[:, 2(t + q) + r], i.e. column
//   t + q of the parity-r half of the input. The input is split into even and odd
//   columns once ("deinterleaved"), and each tap is one GEMM on a shifted view.
// * stride-2 transposed conv (output_padding 1): output column 2u + r gathers the
//   taps j with j ≡ r + p (mod 2) from input column u + (r + p - j) / 2 — no
//   structural zeros. The two output parities are computed separately.
//
// Stages per batch element b:
//   1. head: conv N -> D/4 reduces over N in chunks of kHeadChunk rows, so the only
//      copy of x is one chunk (split across threads when B is small);
//   2. bottleneck: the four N-independent convs, O(D^2);
//   3. tail, per tile of T output columns: last transposed conv (GEMM into S[N, T]),
//      value projection (GEMM into V[N, T]), then one walk for sigmoid + skip and
//      column max, one for exp and column sum, one writing
//      y = softmax * V + x. Only S and V — [N, T] each — are held per thread.
//
// Temporary memory: O(D^2) per batch element in flight, 2·N·T per tile worker, and
// for bfloat16 input one fp32 copy of x[b] ([N, D]) per batch element in flight.
// Accumulation is fp32 for fp32/bf16 input, fp64 for fp64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../score_attention_args.h"

namespace casa {
namespace {

constexpr int64_t kHeadChunk = 256;  // rows of x deinterleaved at a time by the head
constexpr int64_t kTailTile = 128;   // output columns per tail tile (even)

// Zero columns on each side of a padded buffer: covers every tap offset, |q| and
// |(r + p - j) / 2|, which are at most ceil(p / 2).
int64_t halo(int64_t p) { return (p + 1) / 2; }

int64_t floor_div2(int64_t v) { return v >= 0 ? v / 2 : -((1 - v) / 2); }

// A stride-2 (transposed) convolution as k GEMM taps, each [Cout, Cin].
struct ConvTaps {
  at::Tensor taps;  // [k, Cout, Cin]
  at::Tensor bias;  // [Cout, 1]
  int64_t p;
};

ConvTaps conv_taps(const at::Tensor& w, const at::Tensor& b, at::ScalarType acc) {
  // Conv1d weight [Cout, Cin, k]: tap j is w[:, :, j].
  return {w.to(acc).permute({2, 0, 1}).contiguous(), b.to(acc).unsqueeze(1), w.size(2) / 2};
}

ConvTaps conv_transpose_taps(const at::Tensor& w, const at::Tensor& b, at::ScalarType acc) {
  // ConvTranspose1d weight [Cin, Cout, k]: tap j is w[:, :, j]^T.
  return {w.to(acc).permute({2, 1, 0}).contiguous(), b.to(acc).unsqueeze(1), w.size(2) / 2};
}

// buf[r][:, h + s] = in[:, 2s + r] for a zero-initialised buf [2, C, L/2 + 2h]; in: [C, L].
void deinterleave(const at::Tensor& in, const at::Tensor& buf, int64_t h) {
  const int64_t L = in.size(1);
  for (int64_t r = 0; r < 2; ++r) {
    buf[r].narrow(1, h, L / 2).copy_(in.slice(1, r, L, 2));
  }
}

// out (+)= Σ_j taps[j][:, cin0 : cin0 + rows] @ parity half of the input, shifted by q_j.
// in_deint: [2, rows, Lh + 2h] from deinterleave; out: [Cout, Lh]. No bias.
void conv_s2(const ConvTaps& c, int64_t cin0, const at::Tensor& in_deint, at::Tensor& out,
             bool accumulate) {
  const int64_t rows = in_deint.size(1), Lh = out.size(1), h = halo(c.p);
  for (int64_t j = 0; j < c.taps.size(0); ++j) {
    const int64_t q = floor_div2(j - c.p), r = (j - c.p) - 2 * q;
    const at::Tensor a = c.taps[j].narrow(1, cin0, rows);
    const at::Tensor b = in_deint[r].narrow(1, h + q, Lh);
    if (j == 0 && !accumulate) {
      at::mm_out(out, a, b);
    } else {
      out.addmm_(a, b);
    }
  }
}

// out[:, u] = bias + Σ_{j ≡ r+p (2)} taps[j] @ in_pad[:, h + u0 + u + (r + p - j) / 2]:
// output columns 2(u0 + u) + r of the transposed conv. in_pad: [Cin, L + 2h]; out: [Cout, len].
void conv_transpose_s2_parity(const ConvTaps& c, const at::Tensor& in_pad, int64_t u0,
                              int64_t r, at::Tensor out) {
  const int64_t h = halo(c.p), len = out.size(1);
  bool first = true;
  for (int64_t j = 0; j < c.taps.size(0); ++j) {
    if ((r + c.p - j) % 2 != 0) continue;
    const at::Tensor b = in_pad.narrow(1, h + u0 + (r + c.p - j) / 2, len);
    if (first) {
      at::addmm_out(out, c.bias, c.taps[j], b);
      first = false;
    } else {
      out.addmm_(c.taps[j], b);
    }
  }
  if (first) out.copy_(c.bias.expand_as(out));  // kernel 1: odd outputs see no tap
}

// relu of a [C, 2L] transposed-conv output given by parities [2, C, L], written into
// the middle of a zero-initialised padded buffer [C, 2L + 2h].
void interleave_relu(const at::Tensor& parities, const at::Tensor& padded, int64_t h) {
  const int64_t L = parities.size(2);
  const at::Tensor mid = padded.narrow(1, h, 2 * L).unflatten(1, {L, 2});
  for (int64_t r = 0; r < 2; ++r) {
    at::Tensor out = mid.select(2, r);
    at::clamp_min_out(out, parities[r], 0);
  }
}

// Runs f(begin, end) over [0, n): split across threads when `parallel`, else inline.
template <typename F>
void for_range(bool parallel, int64_t n, const F& f) {
  if (parallel) {
    at::parallel_for(0, n, 1, f);
  } else {
    f(0, n);
  }
}

template <typename scalar_t, typename acc_t>
struct Plan {
  Sizes s;
  at::ScalarType acc;
  ConvTaps enc0, enc1, enc2, dec0, dec1, dec2;
  at::Tensor value_t;     // [D, D]: column o0 + r·TU + u of a tile holds Wv row o0 + 2u + r
  at::Tensor value_bias;  // [1, D], same column order

  Plan(const Sizes& sizes, const Weights& w)
      : s(sizes),
        acc(c10::CppTypeToScalarType<acc_t>::value),
        enc0(conv_taps(w[kEnc0Weight], w[kEnc0Bias], acc)),
        enc1(conv_taps(w[kEnc1Weight], w[kEnc1Bias], acc)),
        enc2(conv_taps(w[kEnc2Weight], w[kEnc2Bias], acc)),
        dec0(conv_transpose_taps(w[kDec0Weight], w[kDec0Bias], acc)),
        dec1(conv_transpose_taps(w[kDec1Weight], w[kDec1Bias], acc)),
        dec2(conv_transpose_taps(w[kDec2Weight], w[kDec2Bias], acc)) {
    const int64_t D = s.d_model;
    std::vector<int64_t> order(D);
    for (int64_t o0 = 0; o0 < D; o0 += kTailTile) {
      const int64_t half = std::min(kTailTile, D - o0) / 2;
      for (int64_t r = 0; r < 2; ++r)
        for (int64_t u = 0; u < half; ++u) order[o0 + r * half + u] = o0 + 2 * u + r;
    }
    const at::Tensor index = at::tensor(order, at::kLong);
    value_t = w[kValueWeight].to(acc).index_select(0, index).t().contiguous();
    value_bias = w[kValueBias].to(acc).index_select(0, index).unsqueeze(0);
  }

  at::Tensor buffer(at::IntArrayRef sizes) const { return at::zeros(sizes, at::TensorOptions(acc)); }

  // Stage 1: h1 = relu(conv(x_b) + bias), [D/4, D/2]; the N reduction split over threads.
  at::Tensor head(const at::Tensor& x_b, bool parallel) const {
    const int64_t N = s.n_vars, D = s.d_model, C1 = D / 4, h = halo(s.padding);
    const int64_t chunks = (N + kHeadChunk - 1) / kHeadChunk;
    const int64_t groups = parallel ? std::min<int64_t>(at::get_num_threads(), chunks) : 1;
    const at::Tensor partial = buffer({groups, C1, D / 2});
    for_range(groups > 1, groups, [&](int64_t g0, int64_t g1) {
      const at::Tensor buf = buffer({2, kHeadChunk, D / 2 + 2 * h});
      for (int64_t g = g0; g < g1; ++g) {
        at::Tensor out = partial[g];
        for (int64_t c = g; c < chunks; c += groups) {
          const int64_t n0 = c * kHeadChunk, rows = std::min(kHeadChunk, N - n0);
          const at::Tensor chunk = buf.narrow(1, 0, rows);
          deinterleave(x_b.narrow(0, n0, rows), chunk, h);
          conv_s2(enc0, n0, chunk, out, /*accumulate=*/c != g);
        }
      }
    });
    at::Tensor h1 = groups > 1 ? partial.sum(0) : partial[0];
    return h1.add_(enc0.bias).relu_();
  }

  // Stage 2: the four N-independent convs; returns relu(dec1(...)) zero-padded, [D/4, D/2 + 2h].
  at::Tensor bottleneck(const at::Tensor& h1) const {
    const int64_t D = s.d_model, C1 = D / 4, C2 = D / 2, h = halo(s.padding);
    const at::Tensor d1 = buffer({2, C1, D / 4 + 2 * h});
    deinterleave(h1, d1, h);
    at::Tensor h2 = buffer({C2, D / 4});
    conv_s2(enc1, 0, d1, h2, false);
    h2.add_(enc1.bias).relu_();

    const at::Tensor d2 = buffer({2, C2, D / 8 + 2 * h});
    deinterleave(h2, d2, h);
    at::Tensor h3 = buffer({D, D / 8});
    conv_s2(enc2, 0, d2, h3, false);
    const at::Tensor p3 = buffer({D, D / 8 + 2 * h});
    p3.narrow(1, h, D / 8).copy_(h3.add_(enc2.bias).relu_());

    const at::Tensor h4 = buffer({2, C2, D / 8});
    for (int64_t r = 0; r < 2; ++r) conv_transpose_s2_parity(dec0, p3, 0, r, h4[r]);
    const at::Tensor p4 = buffer({C2, D / 4 + 2 * h});
    interleave_relu(h4, p4, h);

    const at::Tensor h5 = buffer({2, C1, D / 4});
    for (int64_t r = 0; r < 2; ++r) conv_transpose_s2_parity(dec1, p4, 0, r, h5[r]);
    const at::Tensor p5 = buffer({C1, D / 2 + 2 * h});
    interleave_relu(h5, p5, h);
    return p5;
  }

  // Stage 3 for output columns [o0, o0 + T): writes y_b[:, o0 : o0 + T].
  // S, V: [N, kTailTile] scratch of this worker.
  void tail_tile(const at::Tensor& p5, const scalar_t* x_b, const at::Tensor& x_acc, int64_t o0,
                 at::Tensor& S_buf, at::Tensor& V_buf, scalar_t* y_b) const {
    const int64_t N = s.n_vars, D = s.d_model;
    const int64_t T = std::min(kTailTile, D - o0), TU = T / 2;
    at::Tensor S = S_buf.narrow(1, 0, T), V = V_buf.narrow(1, 0, T);
    for (int64_t r = 0; r < 2; ++r) conv_transpose_s2_parity(dec2, p5, o0 / 2, r, S.narrow(1, r * TU, TU));
    at::addmm_out(V, value_bias.narrow(1, o0, T), x_acc, value_t.narrow(1, o0, T));

    acc_t* sp = S.data_ptr<acc_t>();
    const acc_t* vp = V.data_ptr<acc_t>();
    const int64_t ld = S.stride(0);  // == V.stride(0) == kTailTile
    std::vector<acc_t> col_max(T, -std::numeric_limits<acc_t>::infinity()), col_sum(T, acc_t(0));

    // Column (r, u) of S holds output column o0 + 2u + r.
    for (int64_t n = 0; n < N; ++n) {
      acc_t* row = sp + n * ld;
      for (int64_t r = 0; r < 2; ++r) {
        const scalar_t* xr = x_b + n * D + o0 + r;
        acc_t* sr = row + r * TU;
        acc_t* mr = col_max.data() + r * TU;
        for (int64_t u = 0; u < TU; ++u) {
          const acc_t score = acc_t(1) / (acc_t(1) + std::exp(-sr[u])) + static_cast<acc_t>(xr[2 * u]);
          sr[u] = score;
          mr[u] = std::max(mr[u], score);
        }
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      acc_t* row = sp + n * ld;
      for (int64_t c = 0; c < T; ++c) {
        const acc_t e = std::exp(row[c] - col_max[c]);
        row[c] = e;
        col_sum[c] += e;
      }
    }
    for (int64_t c = 0; c < T; ++c) col_sum[c] = acc_t(1) / col_sum[c];
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* row = sp + n * ld;
      const acc_t* vrow = vp + n * ld;
      for (int64_t r = 0; r < 2; ++r) {
        const scalar_t* xr = x_b + n * D + o0 + r;
        scalar_t* yr = y_b + n * D + o0 + r;
        const acc_t* inv = col_sum.data() + r * TU;
        for (int64_t u = 0; u < TU; ++u) {
          const int64_t c = r * TU + u;
          yr[2 * u] = static_cast<scalar_t>(row[c] * inv[u] * vrow[c] + static_cast<acc_t>(xr[2 * u]));
        }
      }
    }
  }

  void batch_element(const at::Tensor& x, at::Tensor& y, int64_t b, bool parallel) const {
    const int64_t N = s.n_vars, D = s.d_model;
    const at::Tensor x_b = x[b];
    const at::Tensor x_acc = x_b.scalar_type() == acc ? x_b : x_b.to(acc);
    const at::Tensor p5 = bottleneck(head(x_b, parallel));
    const int64_t tiles = (D + kTailTile - 1) / kTailTile;
    const scalar_t* xp = x_b.data_ptr<scalar_t>();
    scalar_t* yp = y[b].data_ptr<scalar_t>();
    for_range(parallel && tiles > 1, tiles, [&](int64_t t0, int64_t t1) {
      at::Tensor S = at::empty({N, kTailTile}, at::TensorOptions(acc));
      at::Tensor V = at::empty({N, kTailTile}, at::TensorOptions(acc));
      for (int64_t t = t0; t < t1; ++t) tail_tile(p5, xp, x_acc, t * kTailTile, S, V, yp);
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
