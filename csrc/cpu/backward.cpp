// Fused backward of the CPU kernel: casa::cpu_score_attention_backward (docs/design.md §5.8,
// §12). For one batch element, with P = softmax over N of the scores s (per column),
// v = x Wv^T + bv, y = P ⊙ v + x and g = dL/dy:
//   dv = P ⊙ g              -> dWv = Σ dv^T x, dbv = Σ dv, dx += dv Wv
//   dP = v ⊙ g, ds = P ⊙ (dP − colsum_N(P ⊙ dP)), dx += g + ds
//   dt = ds ⊙ σ(t)(1 − σ(t)) for the last transposed conv's output t (s = σ(t) + x)
//   -> d dec2_weight, d dec2_bias, dh5
// then dh5 back through the bottleneck's four convs and the first conv, as GEMMs on the
// saved activations (conv_s2_backward, conv_transpose_s2_backward; the first conv's also
// gives its share of dx).
//
// The tail part runs per (batch element, tile of T output columns), as the forward's tail
// does (tail_layout.h): the scores S[N, T] are recomputed from h5 by one GEMM per output
// parity; pass 1, kRows rows at a time, runs the value GEMM on the block and turns S into P
// (from the forward's column statistics col_max, col_sum), with dP, σ' and the column sums
// of P ⊙ dP; pass 2, kRows rows at a time, gives dv, ds and dt, dWv's tile rows (dv^T x),
// dbv and dx's rows (g + ds in the tile's columns, dv Wv in all). Then over all N: d dec2 by
// parity (dt window^T) and dh5 (dec2^T dt, scattered back to h5's columns). Nothing
// [B, N, D] is stored but dx itself, in x's dtype. Each worker holds three [N, T] buffers
// and, for the parameters it adds to, its own accumulators, summed once at its end, except
// where the workers' parts of a gradient are distinct (dWv and dbv at B = 1, a conv's weight
// where its channel groups split evenly over the workers): there they share one. d dec2
// (N·k·D/4 elements, the largest at large N) is one accumulator for all workers, each tile
// adding its product by blocks of kDec2Rows rows under that block's lock. dx rows and dh5
// of one batch element are added under that element's lock (tiles of one element can run
// on different workers). So with several workers the order of those additions, and the
// last bits of dx, d dec2 and the summed accumulators, can change from run to run; one
// thread gives the same bits every run. The tail's weight layouts and accumulators are
// freed before the convolutions' backward runs. Where whole tiles per worker would hold the
// [N, T] buffers of more than two batch elements' tiles at once (many threads), the tiles
// run one at a time instead, each shared by the workers by ranges of rows
// (tail_shared_tiles): its buffers held once, whatever the thread count.
//
// The variate-parallel layer (docs/design.md §12.4) runs the same pieces split at its two
// all-reduces: casa::cpu_tail_backward_colsum (per tile the scores and pass 1, P, dP and σ'
// kept in the caller's `state`, 3·B·N·D values, and this rank's colsum), then
// casa::cpu_tail_backward_rows (pass 2 from the state and the global colsum, the last conv's
// gradients and the bottleneck down to h1's pre-activation gradient), then
// casa::cpu_head_backward (the first conv's backward from that gradient summed over ranks).
//
// Any subset of gradients (needs) costs only what it needs: no value GEMM without dP, no
// dt without a score-network gradient, no conv backward below the lowest layer whose
// parameters (or x) need one, no input gradient of a layer nothing below needs.
// Arithmetic in the accumulation type: fp32 for fp32 and bfloat16 input, fp64 for fp64. The
// parameters' gradients are rounded to bfloat16 once, at the end; dx is held in bfloat16,
// each addition to it (a 64-row block of one tail tile, a row of the first conv's share)
// formed in fp32 and rounded once: with one tile per batch element, twice in all.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../score_attention_args.h"
#include "channels_last.h"
#include "gemm.h"
#include "parallel.h"
#include "score_attention_ops.h"
#include "tail_layout.h"
#include "vectorised.h"

namespace casa {
namespace {

using cpu::parallel_for_aten;

constexpr int64_t kRows = 64;            // rows of dx added per lock of their batch element
constexpr int64_t kDec2Rows = 256;       // rows of d dec2 added per lock of that block of rows
constexpr int64_t kSharedRows = 32;      // rows of a shared tile per worker, at least
constexpr int64_t kSharedColumns = 16;   // rows or columns of a shared tile's d_window per worker
constexpr int64_t kSharedTilesN = 4096;  // N from which the tail shares its tiles on 2+ workers
constexpr int64_t kChunkRows = 256;      // input channels per im2col chunk of a conv's backward
constexpr int64_t kReluGrain = int64_t{1} << 16;  // elements per worker of a ReLU backward

// Whether the backward of scalar_t input runs its large GEMMs on bfloat16 operands: bfloat16
// input on a CPU with bfloat16 GEMMs (cpu::bf16_gemm), as the reference's bfloat16 autograd.
template <typename scalar_t>
bool rounds_to_bf16() {
  return std::is_same_v<scalar_t, c10::BFloat16> && cpu::bf16_gemm() != cpu::Bf16Gemm::kNone;
}

// The bfloat16 backward's GEMMs on the bfloat16 tier (rounds_to_bf16): C [M, N] (ldc) = A [M, K]
// (lda) · B [K, N] (+ C where accumulate) with A and B rounded to bfloat16, as the
// reference's bfloat16 autograd holds them, and fp32 accumulation (cpu::gemm_bf16). A is
// fp32 (rounded here) or already bfloat16 (a weight, rounded once per call: rounded_rows).
// B is read as [K, N] (row stride ldb), or with b_transposed as its transpose [N, K]. K must
// be even (the packed layout pairs rows). `rounded`: rounded_gemm_elements(M, N, K, A is
// bfloat16) bfloat16s.
int64_t rounded_gemm_elements(int64_t M, int64_t N, int64_t K, bool a_bf16) {
  return (a_bf16 ? 0 : M * K) + K * N + cpu::packed_bf16_size(K, N);
}
void rounded_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                  const float* B, int64_t ldb, bool b_transposed, float* C, int64_t ldc,
                  bool accumulate, c10::BFloat16* rounded) {
  c10::BFloat16* packed = rounded + K * N;
  if (b_transposed) {
    c10::BFloat16* b = rounded;  // [K, N]
    cpu::transpose(B, ldb, N, K, b, N);
    cpu::pack_bf16(K, N, b, N, packed);
  } else {
    cpu::pack_bf16(K, N, B, ldb, packed);
  }
  cpu::gemm_bf16(M, N, K, A, lda, packed, C, ldc, accumulate);
}
void rounded_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, bool b_transposed, float* C, int64_t ldc, bool accumulate,
                  c10::BFloat16* rounded) {
  for (int64_t r = 0; r < M; ++r) cpu::to_bf16(A + r * lda, K, rounded + r * K);
  rounded_gemm(M, N, K, rounded, K, B, ldb, b_transposed, C, ldc, accumulate, rounded + M * K);
}

// A [rows, cols] fp32 matrix rounded to bfloat16 (a GEMM's constant left operand), or an
// undefined tensor where `round` is false.
at::Tensor rounded_rows(const at::Tensor& m, bool round) {
  return round ? m.to(at::kBFloat16).contiguous() : at::Tensor();
}

// The forward's activations saved for the backward, [B, channels, length] in the
// accumulation dtype, in this order.
enum ActivationIndex : int {
  kH1,       // relu(enc0(x)),     [B, D/4, D/2]
  kEnc1Out,  // relu(enc1(h1)),    [B, D/2, D/4]
  kEnc2Out,  // relu(enc2(..)),    [B, D, D/8]
  kDec0Out,  // relu(dec0(..)),    [B, D/2, D/4]
  kH5,       // relu(dec1(..)),    [B, D/4, D/2]
  kNumActivations
};

// Which gradients a call computes: x and each weight (the op's needs_input_grad), and
// what they imply.
struct Needs {
  bool x;
  std::array<bool, kNumWeights> w;
  bool any_of(std::initializer_list<int> weights) const {
    return std::any_of(weights.begin(), weights.end(), [&](int i) { return w[i]; });
  }
  // dh5: x or a parameter of the head or the bottleneck.
  bool dh5() const {
    return x || any_of({kEnc0Weight, kEnc0Bias, kEnc1Weight, kEnc1Bias, kEnc2Weight, kEnc2Bias,
                        kDec0Weight, kDec0Bias, kDec1Weight, kDec1Bias});
  }
  bool dt() const { return dh5() || any_of({kDec2Weight, kDec2Bias}); }
  bool ds() const { return x || dt(); }
  bool dv() const { return x || any_of({kValueWeight, kValueBias}); }
};

// One worker's buffers for a tile of T columns (acc_t), and its own parameter accumulators.
template <typename acc_t>
struct TileScratch {
  at::Tensor memory;
  acc_t* rhs[2];       // [taps · D/4, T/2]: h5's columns read by each output parity, then
                       // dec2^T dt for that parity (once d dec2 has read the columns)
  acc_t* scores;       // [N, T]: S, then P
  acc_t* dp;           // [N, T]: v ⊙ g, then dt
  acc_t* sigma_prime;  // [N, T]: σ'(t) = σ(1 − σ)
  acc_t* colsum;       // [3·T]: Σ_N P ⊙ dP, then the tile's col_max and col_sum
  acc_t* block;        // [kRows, T]: a block of V (pass 1), then of dv = P ⊙ g (pass 2)
  acc_t* dv_t;         // [T, kRows]: the block of dv transposed
  acc_t* dx_tile;      // [kRows, T]: g + ds for a block of rows
  acc_t* dx_rows;      // [kRows, D]: dv Wv for a block of rows
  acc_t* x_rows;       // [kRows, D]: a block of x[b] rows in acc_t (bfloat16 input)
  acc_t* dec2_block;   // [kDec2Rows, max K]: a block of rows of dt · window^T
  // The bfloat16 GEMMs' operands (Backward::bf16_gemms only):
  at::Tensor memory_bf16;
  c10::BFloat16* dv_bf16;    // [kRows, T]: the block of dv, rounded
  c10::BFloat16* dv_t_bf16;  // [T, kRows]: the same transposed
  c10::BFloat16* x_packed;   // cpu::packed_bf16_size(kRows, D): a block of x rows, packed
  c10::BFloat16* rounded;    // rounded_gemm's buffer for the last transposed conv's GEMMs
};

template <typename acc_t>
struct ParameterGrads {                 // in the tile parity order where a layout says so
  at::Tensor value_weight, value_bias;  // [D, D] rows in tile_parity_order, [D] likewise
  at::Tensor dec2[2];                   // [N, taps(q) · D/4]: (n, (jj, c)) as dec2 by parity
  at::Tensor dec2_bias;                 // [N]
  // One lock per kDec2Rows rows of dec2, which every worker shares (the total's).
  std::shared_ptr<std::mutex[]> dec2_locks;

  // A worker's accumulators: dec2 (and its locks) the total's, which every tile adds to by
  // blocks of rows (N·k·D/4 elements once, not per worker); value_weight and value_bias
  // the total's too with `share_values` (workers whose tiles own distinct rows of them add
  // there directly), else zeros of its own, as dec2_bias.
  ParameterGrads(const Needs& needs, int64_t N, int64_t D, at::ScalarType acc,
                 const ParameterGrads& total, bool share_values)
      : dec2{total.dec2[0], total.dec2[1]}, dec2_locks(total.dec2_locks) {
    if (share_values) {
      value_weight = total.value_weight;
      value_bias = total.value_bias;
    } else {
      zero_values(needs, D, acc);
    }
    if (needs.w[kDec2Bias]) dec2_bias = at::zeros({N}, at::TensorOptions(acc));
  }

  // The total's shared parts, zeros: dec2 and its locks, and value_weight and value_bias
  // with `share_values`.
  void zero_shared(const Needs& needs, int64_t N, int64_t D, const int64_t K[2], at::ScalarType acc,
                   bool share_values) {
    for (int q = 0; q < 2 && needs.w[kDec2Weight]; ++q) {
      dec2[q] = at::zeros({N, K[q]}, at::TensorOptions(acc));
    }
    if (needs.w[kDec2Weight]) {
      dec2_locks.reset(new std::mutex[(N + kDec2Rows - 1) / kDec2Rows]);
    }
    if (share_values) zero_values(needs, D, acc);
  }

  // value_weight and value_bias as zeros, where needed.
  void zero_values(const Needs& needs, int64_t D, at::ScalarType acc) {
    const at::TensorOptions options(acc);
    if (needs.w[kValueWeight]) value_weight = at::zeros({D, D}, options);
    if (needs.w[kValueBias]) value_bias = at::zeros({D}, options);
  }

  ParameterGrads() = default;  // none: a total before zero_shared

  // Adds these to `total`; the first worker's become the total (no copy), and those shared
  // with the total are already there.
  void add_to(ParameterGrads& total) const {
    const auto add = [](at::Tensor& to, const at::Tensor& from) {
      if (!from.defined() || from.is_same(to)) return;
      to = to.defined() ? to.add_(from) : from;
    };
    add(total.value_weight, value_weight);
    add(total.value_bias, value_bias);
    add(total.dec2[0], dec2[0]);
    add(total.dec2[1], dec2[1]);
    add(total.dec2_bias, dec2_bias);
  }
};

// A row-major [rows, cols] view of acc_t memory with row stride ld.
template <typename acc_t>
at::Tensor view(acc_t* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(data, {rows, cols}, {ld, 1},
                       at::TensorOptions(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename scalar_t, typename acc_t>
struct Backward {
  Sizes s;
  Needs needs;
  at::ScalarType acc;
  int64_t tile;
  std::vector<int64_t> taps[2];
  int64_t K[2];                // taps(q) · D/4
  std::vector<int64_t> order;  // tile_parity_order
  // [N, K[q]]: dec2_weight by parity, (n, (jj, c)) = W[c, n, taps[q][jj]]; on the bfloat16
  // tier only where a GEMM on it stays fp32 (dec2_fp32_needed), else undefined.
  at::Tensor dec2[2];
  // bf16_gemms only: the same in bfloat16, and its transpose [K[q], N] in bfloat16.
  at::Tensor dec2_rounded[2], dec2_t_rounded[2];
  at::Tensor dec2_bias;   // [N]
  at::Tensor value_t;     // [D, D]: Wv^T, columns in tile_parity_order
  at::Tensor value;       // [D, D]: Wv, rows in tile_parity_order
  at::Tensor value_bias;  // [D]: bv in tile_parity_order
  // bfloat16 input on a CPU with bfloat16 GEMMs (cpu::bf16_gemm): the tail's three value
  // GEMMs (V = x Wv^T, dWv += dv^T x, dv Wv) take bfloat16 operands, dv rounded as the
  // reference's bfloat16 autograd holds it, with fp32 accumulation. Wv^T and Wv are packed
  // once per call, tile by tile (elements per tile: value_t_tile, value_tile).
  bool bf16_gemms = false;
  at::Tensor value_t_packed;  // per tile of T columns: Wv^T[:, tile], [D, T]
  at::Tensor value_packed;    // per tile: Wv[tile, :], [T, D]
  int64_t value_t_tile = 0, value_tile = 0;
  const acc_t* col_max;
  const acc_t* col_sum;

  // tile: the tail tile width of the forward's layouts, prepared: the forward's tail
  // layouts for it (cpu_prepare_tail, PreparedIndex), checked by check_layouts. The plan
  // takes dec2 by parity, Wv^T and bv from them where their GEMM operands are acc_t (no
  // bfloat16 GEMMs); otherwise (bfloat16 operands) from cpu_prepare_tail's layouts without
  // bfloat16 GEMMs, in acc_t, except dec2 by parity in bfloat16, which with bf16_gemms is
  // the forward's own (plain [N, K[q]] rows).
  Backward(const Sizes& sizes, const Weights& w, const Needs& n, const at::Tensor& stats_max,
           const at::Tensor& stats_sum, int64_t tile_width, at::TensorList prepared)
      : s(sizes),
        needs(n),
        acc(c10::CppTypeToScalarType<acc_t>::value),
        tile(tile_width),
        order(cpu::tile_parity_order(sizes.d_model, tile)),
        col_max(stats_max.data_ptr<acc_t>()),
        col_sum(stats_sum.data_ptr<acc_t>()) {
    for (int q = 0; q < 2; ++q) {
      taps[q] = cpu::parity_taps(s.kernel, q);
      K[q] = static_cast<int64_t>(taps[q].size()) * (s.d_model / 4);
    }
    bf16_gemms = rounds_to_bf16<scalar_t>();
    std::vector<at::Tensor> layouts = prepared.vec();
    at::Tensor forward_value_t;  // the forward's Wv^T packed by tile (bfloat16 layouts)
    if (prepared[kDec2Even].scalar_type() != acc) {
      RECORD_FUNCTION("casa::cpu backward layouts", std::vector<c10::IValue>());
      for (int q = 0; q < 2 && bf16_gemms; ++q) dec2_rounded[q] = prepared[kDec2Even + q];
      if (bf16_gemms) forward_value_t = prepared[kValueWeightT];
      layouts = cpu_ops::prepare_tail(w[kDec2Weight], w[kDec2Bias], w[kValueWeight], w[kValueBias],
                                      tile, "none");
    }
    for (int q = 0; q < 2; ++q) dec2[q] = layouts[kDec2Even + q];
    value_t = layouts[kValueWeightT];
    value_bias = layouts[kValueBiasOrdered];
    value = cpu::transposed(value_t);
    dec2_bias = w[kDec2Bias].to(acc).contiguous();
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_gemms) pack_values(forward_value_t);
    }
    for (int q = 0; q < 2 && bf16_gemms; ++q) {
      if (!dec2_rounded[q].defined()) dec2_rounded[q] = rounded_rows(dec2[q], true);
      dec2_t_rounded[q] = dec2_rounded[q].t().contiguous();
      if (!dec2_fp32_needed()) dec2[q] = at::Tensor();
    }
  }

  // value_t_packed (the forward's own layout where given, check_layouts) and value_packed,
  // from value_t and value (bfloat16 values held in fp32: packing rounds them exactly);
  // then value_t and value are released, as no GEMM reads them.
  void pack_values(const at::Tensor& forward_value_t) {
    const int64_t D = s.d_model, tiles = tile_count();
    value_t_tile = cpu::packed_bf16_size(D, tile);
    value_tile = cpu::packed_bf16_size(tile, D);
    const bool own_value_t = !forward_value_t.defined();
    value_t_packed =
        own_value_t ? at::empty({tiles * value_t_tile}, at::kBFloat16) : forward_value_t;
    value_packed = at::empty({tiles * value_tile}, at::kBFloat16);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t o0 = t * tile, T = width(o0);
      if (own_value_t) {
        cpu::pack_bf16(D, T, value_t.data_ptr<float>() + o0, D,
                       value_t_packed.data_ptr<c10::BFloat16>() + t * value_t_tile);
      }
      cpu::pack_bf16(T, D, value.data_ptr<float>() + o0 * D, D,
                     value_packed.data_ptr<c10::BFloat16>() + t * value_tile);
    }
    value_t = at::Tensor();
    value = at::Tensor();
  }

  // A worker's buffers; without own_rows the three [N, T] ones are left out (TileRows in
  // the caller's memory instead); without own_windows (a worker of a shared tile) the two h5
  // windows and the room for d_window's right operand (dt, which the tile packs once).
  TileScratch<acc_t> scratch(bool own_rows, bool own_windows = true) const {
    const int64_t N = own_rows ? s.n_vars : 0, D = s.d_model, T = tile;
    const int64_t window = own_windows ? std::max(K[0], K[1]) * (T / 2) : 0;
    const int64_t x_rows = std::is_same_v<scalar_t, acc_t> ? 0 : kRows * D;
    const int64_t dec2_block = needs.w[kDec2Weight] ? kDec2Rows * std::max(K[0], K[1]) : 0;
    TileScratch<acc_t> sc;
    sc.memory =
        at::empty({2 * window + 3 * N * T + 3 * T + kRows * (3 * T + D) + x_rows + dec2_block},
                  at::TensorOptions(acc));
    acc_t* next = sc.memory.template data_ptr<acc_t>();
    const auto take = [&](int64_t n) { return std::exchange(next, next + n); };
    sc.rhs[0] = take(window);
    sc.rhs[1] = take(window);
    sc.scores = take(N * T);
    sc.dp = take(N * T);
    sc.sigma_prime = take(N * T);
    sc.colsum = take(3 * T);
    sc.block = take(kRows * T);
    sc.dv_t = take(kRows * T);
    sc.dx_tile = take(kRows * T);
    sc.dx_rows = take(kRows * D);
    sc.x_rows = take(x_rows);
    sc.dec2_block = take(dec2_block);
    if (bf16_gemms) {
      const int64_t packed_x = cpu::packed_bf16_size(kRows, D);
      const int64_t Nv = s.n_vars, half = T / 2, Kq = std::max(K[0], K[1]);
      const int64_t dec2_gemms =
          std::max({rounded_gemm_elements(Nv, half, Kq, true),
                    rounded_gemm_elements(kDec2Rows, Kq, half, false),
                    own_windows ? rounded_gemm_elements(Kq, half, Nv, true) : 0});
      sc.memory_bf16 = at::empty({2 * kRows * T + packed_x + dec2_gemms}, at::kBFloat16);
      sc.dv_bf16 = sc.memory_bf16.template data_ptr<c10::BFloat16>();
      sc.dv_t_bf16 = sc.dv_bf16 + kRows * T;
      sc.x_packed = sc.dv_t_bf16 + kRows * T;
      sc.rounded = sc.x_packed + packed_x;
    }
    return sc;
  }

  // rhs[(jj, c), u] = h5_b[c, first + u] for u < half (first: cpu::parity_window), zero outside
  // [0, D/2): the right operand of the last transposed conv for the tile's outputs of
  // parity q. h5_b: [D/4, D/2] contiguous.
  void gather_window(const acc_t* h5_b, int64_t q, int64_t o0, int64_t half, acc_t* rhs) const {
    const int64_t L = s.d_model / 2;
    cpu::gather_parity_window(h5_b, L, taps[q], q, o0, half, s.padding, s.d_model / 4, L, rhs,
                              half);
  }

  // The adjoint of gather_window: dh5_b[c, first + u] += d[(jj, c), u].
  void scatter_window(const acc_t* d, int64_t q, int64_t o0, int64_t half, acc_t* dh5_b) const {
    const int64_t C1 = s.d_model / 4, L = s.d_model / 2;
    for (size_t jj = 0; jj < taps[q].size(); ++jj) {
      const auto [first, u0, u1] = cpu::parity_window(o0, q, s.padding, taps[q][jj], half, L);
      for (int64_t c = 0; c < C1; ++c) {
        const acc_t* row = d + (static_cast<int64_t>(jj) * C1 + c) * half;
        acc_t* out = dh5_b + c * L + first;
        for (int64_t u = u0; u < u1; ++u) out[u] += row[u];
      }
    }
  }

  // The tile's column of output position i (parity order): o0 + 2i or o0 + 2(i − half) + 1.
  static int64_t column(int64_t o0, int64_t half, int64_t i) {
    return i < half ? o0 + 2 * i : o0 + 2 * (i - half) + 1;
  }

  // The tile's [N, T] buffers: the scores, then P; dP, then dt; σ'. In a worker's scratch
  // (the single-process backward) or in the caller's memory across the colsum's all-reduce.
  struct TileRows {
    acc_t* scores;
    acc_t* dp;
    acc_t* sigma_prime;
  };

  // The width of the tile of output columns from o0.
  int64_t width(int64_t o0) const { return std::min(tile, s.d_model - o0); }

  // The tiles of one batch element: ⌈D / tile⌉.
  int64_t tile_count() const { return (s.d_model + tile - 1) / tile; }

  // The tile's h5 windows for both parities (where K[q] > 0) into windows[q]: the right
  // operands of the scores and of d dec2 (gather_window).
  void gather_windows(const acc_t* h5, int64_t b, int64_t o0, acc_t* const windows[2]) const {
    const int64_t D = s.d_model, half = width(o0) / 2;
    for (int64_t q = 0; q < 2; ++q) {
      if (K[q] > 0) gather_window(h5 + b * (D / 4) * (D / 2), q, o0, half, windows[q]);
    }
  }

  // The tail's backward, part 1, for batch element b, output columns [o0, o0 + T), rows
  // [n0, n1) of N: those rows' scores from the tile's h5 windows (gather_windows) in
  // rows_buf.scores, then pass 1: P, dP, σ' in rows_buf and, where ds is due, sc.colsum[0, T)
  // = Σ P ⊙ dP over those rows (parity order).
  void tile_colsum(int64_t b, int64_t o0, int64_t n0, int64_t n1, const scalar_t* x_all,
                   const scalar_t* g_all, acc_t* const windows[2], const TileScratch<acc_t>& sc,
                   const TileRows& rows_buf) const {
    const int64_t N = s.n_vars, D = s.d_model, T = width(o0), half = T / 2, rows_in = n1 - n0;
    const int64_t ld = T;  // of the [N, T] and [kRows, T] buffers
    const scalar_t* x_b = x_all + b * N * D;
    const scalar_t* g_b = g_all + b * N * D;
    const bool want_ds = needs.ds();

    // The scores S = dec2 by parity · h5's window, rows [n0, n1).
    for (int64_t q = 0; q < 2; ++q) {
      acc_t* S_q = rows_buf.scores + n0 * ld + q * half;
      if (K[q] == 0) {  // k = 1: odd outputs take the bias alone
        for (int64_t n = 0; n < rows_in; ++n) {
          std::fill(S_q + n * ld, S_q + n * ld + half, acc_t(0));
        }
        continue;
      }
      const acc_t* A = dec2[q].defined() ? dec2[q].template data_ptr<acc_t>() + n0 * K[q] : nullptr;
      const at::Tensor A_rounded =
          dec2_rounded[q].defined() ? dec2_rounded[q].narrow(0, n0, rows_in) : at::Tensor();
      dec2_gemm(rows_in, half, K[q], A, A_rounded, K[q], windows[q], half,
                /*b_transposed=*/false, S_q, ld, /*accumulate=*/false, sc);
    }

    // Pass 1, kRows rows at a time: the value block V = x Wv^T; S becomes P, and where ds is
    // due dP = v g, σ' and colsum = Σ P dP.
    const acc_t* vbias = value_bias.template data_ptr<acc_t>() + o0;
    acc_t* m = sc.colsum + T;  // the statistics of the tile's columns, in parity order
    acc_t* l = m + T;
    for (int64_t i = 0; i < T; ++i) {
      m[i] = col_max[b * D + column(o0, half, i)];
      l[i] = col_sum[b * D + column(o0, half, i)];
    }
    std::fill(sc.colsum, sc.colsum + T, acc_t(0));
    for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
      const int64_t rows = std::min(kRows, n1 - r0);
      if (want_ds) values_block(x_b, r0, rows, o0, T, sc);
      cpu::softmax_backward_weights(
          rows_buf.scores + r0 * ld, ld, dec2_bias.template data_ptr<acc_t>() + r0, rows, T,
          x_b + r0 * D + o0, g_b + r0 * D + o0, D, m, l, want_ds ? sc.block : nullptr, vbias,
          rows_buf.dp + r0 * ld, rows_buf.sigma_prime + r0 * ld, sc.colsum);
    }
  }

  // The tail's backward, part 2, for the same tile and rows [n0, n1), from tile_colsum's
  // rows_buf (every row of the tile done), the tile's h5 windows and the column sums
  // `colsum` [T] (parity order; over all N, of every rank in a variate-parallel backward):
  // pass 2 and the last transposed conv's parameter gradients of those rows. dx's rows are
  // added under `lock`, d dec2's blocks under theirs.
  void tile_rows(int64_t b, int64_t o0, int64_t n0, int64_t n1, const scalar_t* x_all,
                 const scalar_t* g_all, acc_t* const windows[2], const TileScratch<acc_t>& sc,
                 const TileRows& rows_buf, const acc_t* colsum, ParameterGrads<acc_t>& grads,
                 scalar_t* dx, std::mutex& lock) const {
    const int64_t N = s.n_vars, D = s.d_model, T = width(o0), half = T / 2;
    const int64_t ld = T;
    const scalar_t* x_b = x_all + b * N * D;
    const scalar_t* g_b = g_all + b * N * D;
    const bool want_ds = needs.ds(), want_dv = needs.dv(), want_dt = needs.dt();

    // Pass 2, kRows rows at a time: dv = P g; ds = P (dP − colsum) and dp becomes dt = ds σ';
    // dx rows get g + ds in the tile's columns and dv Wv in all of them; dWv's tile rows get
    // dv^T x, dbv's dv's column sums.
    for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
      const int64_t rows = std::min(kRows, n1 - r0);
      cpu::softmax_backward_grads(rows_buf.scores + r0 * ld, ld, rows, T, g_b + r0 * D + o0, D,
                                  colsum, rows_buf.sigma_prime + r0 * ld,
                                  want_ds ? rows_buf.dp + r0 * ld : nullptr,
                                  want_dv ? sc.block : nullptr, needs.x ? sc.dx_tile : nullptr);
      if (grads.value_weight.defined()) {
        add_value_weight_grad(x_b, r0, rows, o0, T, sc,
                              grads.value_weight.template data_ptr<acc_t>() + o0 * D);
      }
      if (grads.value_bias.defined()) {
        acc_t* db = grads.value_bias.template data_ptr<acc_t>() + o0;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t i = 0; i < T; ++i) db[i] += sc.block[r * ld + i];
        }
      }
      if (!needs.x) continue;
      dv_times_value(rows, o0, T, sc);
      const std::lock_guard<std::mutex> guard(lock);
      cpu::add_parity_rows(dx + (b * N + r0) * D, D, sc.dx_rows, D, sc.dx_tile, ld, o0, T, rows);
    }

    // The last transposed conv's parameters, GEMMs over the rows of dt.
    if (!want_dt) return;
    if (grads.dec2_bias.defined()) {
      cpu::add_row_sums(rows_buf.dp + n0 * ld, ld, n1 - n0, T,
                        grads.dec2_bias.template data_ptr<acc_t>() + n0);
    }
    for (int64_t q = 0; q < 2 && grads.dec2[0].defined(); ++q) {
      if (K[q] > 0)
        add_dec2_grad(q, half, rows_buf.dp + q * half, ld, n0, n1, windows[q], sc, grads);
    }
  }

  // The tile's share of dh5 for parity q, columns [c0, c1) of its half: those columns of
  // d_window [K[q], half] (row stride half) = dec2[q]^T dt_q over all N. The caller scatters
  // d_window to dh5 (scatter_window) once every column is done.
  void tile_dwindow(int64_t o0, int64_t q, int64_t c0, int64_t c1, const TileRows& rows_buf,
                    acc_t* d_window, const TileScratch<acc_t>& sc) const {
    const int64_t N = s.n_vars, T = width(o0), half = T / 2, cols = c1 - c0;
    const acc_t* dt_q = rows_buf.dp + q * half + c0;
    if (rounded_dec2_grad(N, half)) {
      dec2_gemm(K[q], cols, N, nullptr, dec2_t_rounded[q], N, dt_q, T, /*b_transposed=*/false,
                d_window + c0, half, /*accumulate=*/false, sc);
    } else {
      at::Tensor out = view(d_window + c0, K[q], cols, half);
      at::mm_out(out, dec2[q].t(), view(const_cast<acc_t*>(dt_q), N, cols, T));
    }
  }

  // The tile's whole share of dh5 by one worker: per parity, d_window in windows[q] (whose
  // h5 columns d dec2 has read by now), scattered to dh5 under `lock`.
  void tile_dh5(int64_t b, int64_t o0, acc_t* const windows[2], const TileRows& rows_buf,
                const TileScratch<acc_t>& sc, acc_t* dh5, std::mutex& lock) const {
    if (!needs.dh5()) return;
    const int64_t D = s.d_model, half = width(o0) / 2;
    for (int64_t q = 0; q < 2; ++q) {
      if (K[q] == 0) continue;
      tile_dwindow(o0, q, 0, half, rows_buf, windows[q], sc);
      const std::lock_guard<std::mutex> guard(lock);
      scatter_window(windows[q], q, o0, half, dh5 + b * (D / 4) * (D / 2));
    }
  }

  // d dec2[q] rows [n0, n1) += dt_q [N, half] (row stride ld) rows [n0, n1) · window^T
  // (window: [K[q], half]), by blocks within the kDec2Rows-row blocks of N: each block's
  // product formed in sc.dec2_block, then added to the accumulator every worker shares
  // under that block's lock.
  void add_dec2_grad(int64_t q, int64_t half, const acc_t* dt_q, int64_t ld, int64_t n0, int64_t n1,
                     const acc_t* window, const TileScratch<acc_t>& sc,
                     ParameterGrads<acc_t>& grads) const {
    const int64_t N = s.n_vars, Kq = K[q];
    const at::Tensor window_t = view(const_cast<acc_t*>(window), Kq, half, half).t();
    for (int64_t r0 = n0; r0 < n1;) {
      const int64_t lock_block = r0 / kDec2Rows;
      const int64_t rows = std::min((lock_block + 1) * kDec2Rows, n1) - r0;
      at::Tensor block = view(sc.dec2_block, rows, Kq, Kq);
      if (rounded_dec2_grad(N, half)) {
        dec2_gemm(rows, Kq, half, dt_q + r0 * ld, at::Tensor(), ld, window, half,
                  /*b_transposed=*/true, sc.dec2_block, Kq, /*accumulate=*/false, sc);
      } else {
        at::mm_out(block, view(const_cast<acc_t*>(dt_q) + r0 * ld, rows, half, ld), window_t);
      }
      {
        const std::lock_guard<std::mutex> guard(grads.dec2_locks[lock_block]);
        grads.dec2[q].narrow(0, r0, rows).add_(block);
      }
      r0 += rows;
    }
  }

  // The last transposed conv's GEMMs (the scores, d dec2, dec2^T dt): rounded_gemm on the
  // bfloat16 tier where K is even (A_rounded: A already in bfloat16, [M, K] contiguous, where
  // defined), else cpu::gemm (b_transposed: only on the bfloat16 tier).
  void dec2_gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, const at::Tensor& A_rounded,
                 int64_t lda, const acc_t* B, int64_t ldb, bool b_transposed, acc_t* C, int64_t ldc,
                 bool accumulate, const TileScratch<acc_t>& sc) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_gemms && K % 2 == 0 && A_rounded.defined()) {
        rounded_gemm(M, N, K, A_rounded.data_ptr<c10::BFloat16>(), K, B, ldb, b_transposed, C, ldc,
                     accumulate, sc.rounded);
        return;
      }
      if (bf16_gemms && K % 2 == 0) {
        rounded_gemm(M, N, K, A, lda, B, ldb, b_transposed, C, ldc, accumulate, sc.rounded);
        return;
      }
    }
    TORCH_CHECK(!b_transposed, "dec2_gemm: a transposed B needs the bfloat16 GEMMs");
    cpu::gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }

  // Whether a GEMM on dec2 by parity stays fp32 on the bfloat16 tier: the scores where K[q] is
  // odd, dec2^T dt where N or a tile's half width is (tiles of `tile` columns, the last of
  // D's remainder).
  bool dec2_fp32_needed() const {
    const int64_t last = s.d_model % tile;
    return K[0] % 2 || K[1] % 2 || !rounded_dec2_grad(s.n_vars, tile / 2) ||
           (last != 0 && !rounded_dec2_grad(s.n_vars, last / 2));
  }

  // Whether d dec2 and dec2^T dt (K = half and N) run as rounded GEMMs.
  bool rounded_dec2_grad(int64_t N, int64_t half) const {
    return bf16_gemms && N % 2 == 0 && half % 2 == 0;
  }

  // sc.block [rows, T] = x_b[r0 : r0 + rows] · Wv^T[:, tile] (V without its bias).
  void values_block(const scalar_t* x_b, int64_t r0, int64_t rows, int64_t o0, int64_t T,
                    const TileScratch<acc_t>& sc) const {
    const int64_t D = s.d_model;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_gemms) {
        cpu::gemm_bf16(rows, T, D, x_b + r0 * D, D,
                       value_t_packed.data_ptr<c10::BFloat16>() + o0 / tile * value_t_tile,
                       sc.block, T, /*accumulate=*/false);
        return;
      }
    }
    cpu::gemm(rows, T, D, rows_acc(x_b + r0 * D, rows, sc.x_rows), D,
              value_t.template data_ptr<acc_t>() + o0, D, sc.block, T, /*accumulate=*/false);
  }

  // dWv[tile rows, :] (at dwv, D apart) += dv^T x_b[r0 : r0 + rows], dv = sc.block [rows, T].
  void add_value_weight_grad(const scalar_t* x_b, int64_t r0, int64_t rows, int64_t o0, int64_t T,
                             const TileScratch<acc_t>& sc, acc_t* dwv) const {
    const int64_t D = s.d_model;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_gemms && rows % 2 == 0) {  // the packed layout pairs rows (K even)
        cpu::transpose(sc.block, T, rows, T, sc.dv_t_bf16, kRows);
        cpu::pack_bf16(rows, D, x_b + r0 * D, D, sc.x_packed);
        cpu::gemm_bf16(T, D, rows, sc.dv_t_bf16, kRows, sc.x_packed, dwv, D, /*accumulate=*/true);
        return;
      }
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      cpu::transpose(sc.block, T, rows, T, sc.dv_t, kRows);
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < T; ++i) sc.dv_t[i * kRows + r] = sc.block[r * T + i];
      }
    }
    cpu::gemm(T, D, rows, sc.dv_t, kRows, rows_acc(x_b + r0 * D, rows, sc.x_rows), D, dwv, D,
              /*accumulate=*/true);
  }

  // sc.dx_rows [rows, D] = dv · Wv[tile rows, :], dv = sc.block [rows, T].
  void dv_times_value(int64_t rows, int64_t o0, int64_t T, const TileScratch<acc_t>& sc) const {
    const int64_t D = s.d_model;
    if (bf16_gemms) {
      if constexpr (std::is_same_v<acc_t, float>) {
        cpu::to_bf16(sc.block, rows * T, sc.dv_bf16);
        cpu::gemm_bf16(rows, D, T, sc.dv_bf16, T,
                       value_packed.data_ptr<c10::BFloat16>() + o0 / tile * value_tile, sc.dx_rows,
                       D, /*accumulate=*/false);
        return;
      }
    }
    cpu::gemm(rows, D, T, sc.block, T, value.template data_ptr<acc_t>() + o0 * D, D, sc.dx_rows, D,
              /*accumulate=*/false);
  }

  // `rows` rows of x[b] (D apart) in acc_t: in place for fp32/fp64, converted into `buffer`
  // ([kRows, D]) for bfloat16.
  const acc_t* rows_acc(const scalar_t* x_rows, int64_t rows, acc_t* buffer) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return x_rows;
    } else {
      std::transform(x_rows, x_rows + rows * s.d_model, buffer,
                     [](scalar_t v) { return static_cast<acc_t>(v); });
      return buffer;
    }
  }

  // The tail's workers: the threads where its multiply-adds merit them (cpu::threads_for),
  // at most one per (batch element, tile).
  int64_t tail_workers() const {
    const int64_t N = s.n_vars, D = s.d_model, items = s.batch * tile_count();
    const int64_t macs = s.batch * N * D * ((s.kernel + 1) / 2 * (D / 4) * 3 + 3 * D);
    return cpu::threads_for(macs) > 1 ? std::min<int64_t>(at::get_num_threads(), items) : 1;
  }

  // Runs body(b, o0, scratch, own, lock) for every (batch element, tile) under
  // at::parallel_for, `own` a worker's parameter accumulators (added to `total` at its
  // end, where given) and `lock` the batch element's; own_rows: the scratch holds [N, T] rows.
  // The workers share the total's d dec2 (by blocks of rows, under their locks) and, with
  // one batch element, where every tile is its own rows of dWv and entries of dbv, its dWv
  // and dbv (one [D, D] accumulator, not one per worker).
  template <typename Body>
  void for_each_tile(bool own_rows, ParameterGrads<acc_t>* total, const Body& body) const {
    const int64_t B = s.batch, N = s.n_vars, D = s.d_model;
    const int64_t tiles = tile_count(), items = B * tiles;
    std::unique_ptr<std::mutex[]> locks(new std::mutex[B]);
    std::mutex total_lock;
    const bool shared_values = B == 1;
    if (total != nullptr) total->zero_shared(needs, N, D, K, acc, shared_values);
    parallel_for_aten(items, tail_workers() > 1 ? 1 : items, [&](int64_t begin, int64_t end) {
      const TileScratch<acc_t> sc = scratch(own_rows);
      ParameterGrads<acc_t> own =
          total ? ParameterGrads<acc_t>(needs, N, D, acc, *total, shared_values)
                : ParameterGrads<acc_t>();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles;
        body(b, (item % tiles) * tile, sc, own, locks[b]);
      }
      if (bf16_gemms) cpu::release_bf16_gemm();
      if (total == nullptr) return;
      const std::lock_guard<std::mutex> guard(total_lock);
      own.add_to(*total);
    });
  }

  // Whether tail() shares each tile among its workers (tail_shared_tiles) rather than giving
  // each worker whole tiles, which hold 3·N·T values per worker: with N rows for two workers
  // at least, where whole tiles would hold the rows of more than two batch elements' tiles
  // at once (more than twice as many workers as tiles per element), or where N ≥
  // kSharedTilesN (a tile's rows outweigh a worker's accumulators and the syncs cost nothing
  // measurable). On two threads sharing cost 3–7% at Traffic B = 16, 0–3% from N = 2048
  // (docs/design.md §5.8).
  bool shares_tiles() const {
    const int64_t workers = tail_workers();
    return workers > 1 && s.n_vars >= 2 * kSharedRows &&
           (workers > 2 * tile_count() || s.n_vars >= kSharedTilesN);
  }

  // The tail's backward over every (batch element, tile), both parts per tile: adds to dx
  // [B, N, D] (x's dtype) and dh5 [B, D/4, D/2] (acc_t), each zero-filled by the caller where
  // given, and fills `total`.
  void tail(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& h5, at::Tensor& dx,
            at::Tensor& dh5, ParameterGrads<acc_t>& total) const {
    scalar_t* dx_data = dx.defined() ? dx.data_ptr<scalar_t>() : nullptr;
    acc_t* dh5_data = dh5.defined() ? dh5.data_ptr<acc_t>() : nullptr;
    const scalar_t* x_all = x.data_ptr<scalar_t>();
    const scalar_t* g_all = grad.data_ptr<scalar_t>();
    const acc_t* h5_all = h5.data_ptr<acc_t>();
    if (shares_tiles()) {
      tail_shared_tiles(x_all, g_all, h5_all, dx_data, dh5_data, total);
      return;
    }
    const int64_t N = s.n_vars;
    for_each_tile(true, &total,
                  [&](int64_t b, int64_t o0, const TileScratch<acc_t>& sc,
                      ParameterGrads<acc_t>& own, std::mutex& lock) {
                    const TileRows rows_buf{sc.scores, sc.dp, sc.sigma_prime};
                    gather_windows(h5_all, b, o0, sc.rhs);
                    tile_colsum(b, o0, 0, N, x_all, g_all, sc.rhs, sc, rows_buf);
                    tile_rows(b, o0, 0, N, x_all, g_all, sc.rhs, sc, rows_buf, sc.colsum, own,
                              dx_data, lock);
                    if (dh5_data != nullptr) tile_dh5(b, o0, sc.rhs, rows_buf, sc, dh5_data, lock);
                  });
  }

  // A worker of tail_shared_tiles: its scratch (without [N, T] rows) and its accumulators.
  struct SharedTileWorker {
    TileScratch<acc_t> sc;
    ParameterGrads<acc_t> own;
  };

  // tail() with the tiles taken one at a time, each shared by the workers, so that its rows
  // [N, T] are held once rather than once per worker. Per tile: the h5 windows gathered;
  // each worker's range of rows through the scores and pass 1, its part of colsum summed in
  // worker order; each worker's range through pass 2 and the last conv's parameters (dx's
  // rows and d dec2's are the worker's own, dWv, dbv and d dec2_bias its accumulators);
  // d_window by ranges of its columns, or on the bfloat16 tier of its rows from dt packed
  // once, scattered to dh5 by this thread. With a given number of threads the order of the
  // tail's additions is fixed.
  void tail_shared_tiles(const scalar_t* x_all, const scalar_t* g_all, const acc_t* h5,
                         scalar_t* dx, acc_t* dh5, ParameterGrads<acc_t>& total) const {
    const int64_t B = s.batch, N = s.n_vars, D = s.d_model, threads = at::get_num_threads();
    // The tile's buffers: its rows, its h5 windows (then d_window), colsum; dt packed.
    const int64_t window = std::max(K[0], K[1]) * (tile / 2);
    const at::Tensor memory = at::empty({3 * N * tile + 2 * window + tile}, at::TensorOptions(acc));
    acc_t* const rows_start = memory.data_ptr<acc_t>();
    const TileRows rows_buf{rows_start, rows_start + N * tile, rows_start + 2 * N * tile};
    acc_t* const windows[2] = {rows_start + 3 * N * tile, rows_start + 3 * N * tile + window};
    acc_t* const colsum = windows[1] + window;
    const at::Tensor packed_dt =
        bf16_gemms ? at::empty({cpu::packed_bf16_size(N, tile / 2)}, at::kBFloat16) : at::Tensor();
    std::vector<std::unique_ptr<SharedTileWorker>> workers(threads);
    total.zero_shared(needs, N, D, K, acc, /*share_values=*/false);
    std::vector<acc_t> partial_colsums(threads * tile);
    std::mutex dx_lock;  // uncontended: a tile's workers add distinct rows
    // Runs body(worker, its thread's id, begin, end) over [0, end) in ranges of at least
    // `grain`.
    const auto in_parallel = [&](int64_t end, int64_t grain, const auto& body) {
      parallel_for_aten(end, grain, [&](int64_t begin, int64_t stop) {
        const int64_t id = at::get_thread_num();
        TORCH_INTERNAL_ASSERT(id < threads);
        if (!workers[id]) {
          workers[id].reset(new SharedTileWorker{
              scratch(false, false), ParameterGrads<acc_t>(needs, N, D, acc, total, false)});
        }
        body(*workers[id], id, begin, stop);
        if (bf16_gemms) cpu::release_bf16_gemm();
      });
    };
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t o0 = 0; o0 < D; o0 += tile) {
        const int64_t T = width(o0), half = T / 2;
        gather_windows(h5, b, o0, windows);
        std::fill(partial_colsums.begin(), partial_colsums.end(), acc_t(0));
        in_parallel(N, kSharedRows, [&](SharedTileWorker& w, int64_t id, int64_t n0, int64_t n1) {
          tile_colsum(b, o0, n0, n1, x_all, g_all, windows, w.sc, rows_buf);
          std::copy(w.sc.colsum, w.sc.colsum + T, partial_colsums.data() + id * tile);
        });
        std::fill(colsum, colsum + T, acc_t(0));
        for (int64_t id = 0; id < threads; ++id) {
          for (int64_t i = 0; i < T; ++i) colsum[i] += partial_colsums[id * tile + i];
        }
        in_parallel(N, kSharedRows, [&](SharedTileWorker& w, int64_t, int64_t n0, int64_t n1) {
          tile_rows(b, o0, n0, n1, x_all, g_all, windows, w.sc, rows_buf, colsum, w.own, dx,
                    dx_lock);
        });
        if (dh5 == nullptr || !needs.dh5()) continue;
        for (int64_t q = 0; q < 2; ++q) {
          if (K[q] == 0) continue;
          bool by_rows = false;  // d_window by rows on dt packed once (the bfloat16 tier)
          if constexpr (std::is_same_v<acc_t, float>) {
            by_rows = rounded_dec2_grad(N, half);
            if (by_rows) {
              c10::BFloat16* packed = packed_dt.data_ptr<c10::BFloat16>();
              cpu::pack_bf16(N, half, rows_buf.dp + q * half, T, packed);
              const c10::BFloat16* dec2_t = dec2_t_rounded[q].data_ptr<c10::BFloat16>();
              in_parallel(K[q], kSharedColumns,
                          [&](SharedTileWorker&, int64_t, int64_t k0, int64_t k1) {
                            cpu::gemm_bf16(k1 - k0, half, N, dec2_t + k0 * N, N, packed,
                                           windows[q] + k0 * half, half, /*accumulate=*/false);
                          });
            }
          }
          if (!by_rows) {
            in_parallel(half, kSharedColumns,
                        [&](SharedTileWorker& w, int64_t, int64_t c0, int64_t c1) {
                          tile_dwindow(o0, q, c0, c1, rows_buf, windows[q], w.sc);
                        });
          }
          scatter_window(windows[q], q, o0, half, dh5 + b * (D / 4) * (D / 2));
        }
      }
    }
    for (const auto& w : workers) {
      if (w) w->own.add_to(total);
    }
  }

  // The rows of tile (b, o0) in `state` (3·B·N·D elements): 3·N·T from (b·D + o0)·3·N.
  TileRows state_rows(acc_t* state, int64_t b, int64_t o0) const {
    const int64_t N = s.n_vars, T = width(o0);
    acc_t* at_tile = state + (b * s.d_model + o0) * 3 * N;
    return {at_tile, at_tile + N * T, at_tile + 2 * N * T};
  }

  // Part 1 of every tile, its rows kept in `state` (3·B·N·D, acc_t): colsum [B, D] (acc_t)
  // gets Σ_N P ⊙ dP over this call's N rows where ds is due.
  void tail_colsum(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& h5,
                   at::Tensor& state, at::Tensor& colsum) const {
    acc_t* out = colsum.data_ptr<acc_t>();
    for_each_tile(false, nullptr,
                  [&](int64_t b, int64_t o0, const TileScratch<acc_t>& sc, ParameterGrads<acc_t>&,
                      std::mutex&) {
                    gather_windows(h5.data_ptr<acc_t>(), b, o0, sc.rhs);
                    tile_colsum(b, o0, 0, s.n_vars, x.data_ptr<scalar_t>(),
                                grad.data_ptr<scalar_t>(), sc.rhs, sc,
                                state_rows(state.data_ptr<acc_t>(), b, o0));
                    if (!needs.ds()) return;
                    const int64_t T = width(o0), half = T / 2;
                    for (int64_t i = 0; i < T; ++i)
                      out[b * s.d_model + column(o0, half, i)] = sc.colsum[i];
                  });
  }

  // Part 2 of every tile from tail_colsum's `state` and the column sums `colsum` [B, D]
  // (acc_t, over all variates): as tail() for dx, dh5 and `total`.
  void tail_given_colsum(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& h5,
                         const at::Tensor& state, const at::Tensor& colsum, at::Tensor& dx,
                         at::Tensor& dh5, ParameterGrads<acc_t>& total) const {
    scalar_t* dx_data = dx.defined() ? dx.data_ptr<scalar_t>() : nullptr;
    acc_t* dh5_data = dh5.defined() ? dh5.data_ptr<acc_t>() : nullptr;
    const acc_t* sums = colsum.data_ptr<acc_t>();
    for_each_tile(false, &total,
                  [&](int64_t b, int64_t o0, const TileScratch<acc_t>& sc,
                      ParameterGrads<acc_t>& own, std::mutex& lock) {
                    const int64_t T = width(o0), half = T / 2;
                    for (int64_t i = 0; i < T && needs.ds(); ++i) {
                      sc.colsum[i] = sums[b * s.d_model + column(o0, half, i)];
                    }
                    const TileRows rows_buf = state_rows(state.data_ptr<acc_t>(), b, o0);
                    // d dec2 reads the tile's h5 windows.
                    if (own.dec2[0].defined()) gather_windows(h5.data_ptr<acc_t>(), b, o0, sc.rhs);
                    tile_rows(b, o0, 0, s.n_vars, x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                              sc.rhs, sc, rows_buf, sc.colsum, own, dx_data, lock);
                    if (dh5_data != nullptr) tile_dh5(b, o0, sc.rhs, rows_buf, sc, dh5_data, lock);
                  });
  }
};

// Runs body(b, group, own, scratch, rounded) for every (batch element, group of `groups`)
// under at::parallel_for, `own` an accumulator of shape `own_shape` (zeros; undefined
// without `accumulates`) to which the body adds only in its group's part, `scratch` a
// worker's buffer of `scratch_elements` and `rounded` its bfloat16 buffer of
// `bf16_elements` (for rounded_gemm; none where 0), and returns the accumulated total.
// Where the groups split evenly over the workers, each worker takes whole groups, every
// batch element of them, and all add to one accumulator (its parts are distinct per
// group); otherwise items are split, each worker has its own accumulator and the total
// is their sum (the first one's, the others added to it). macs: the work's multiply-adds
// (threads_for).
template <typename Body>
at::Tensor for_each_item(int64_t B, int64_t groups, int64_t macs, bool accumulates,
                         at::IntArrayRef own_shape, int64_t scratch_elements, int64_t bf16_elements,
                         at::ScalarType acc, const Body& body) {
  const int64_t workers = cpu::threads_for(macs) > 1 ? at::get_num_threads() : 1;
  const bool by_group = groups % workers == 0;
  at::Tensor total =
      accumulates && by_group ? at::zeros(own_shape, at::TensorOptions(acc)) : at::Tensor();
  std::mutex total_lock;
  const int64_t items = by_group ? groups : B * groups;
  parallel_for_aten(items, workers > 1 ? 1 : items, [&](int64_t begin, int64_t end) {
    at::Tensor own =
        accumulates && !by_group ? at::zeros(own_shape, at::TensorOptions(acc)) : total;
    const at::Tensor scratch = at::empty({scratch_elements}, at::TensorOptions(acc));
    const at::Tensor rounded = at::empty({bf16_elements}, at::kBFloat16);
    c10::BFloat16* rounded_data = rounded.data_ptr<c10::BFloat16>();
    for (int64_t item = begin; item < end; ++item) {
      if (by_group) {  // item: a group, for every batch element
        for (int64_t b = 0; b < B; ++b) body(b, item, own, scratch, rounded_data);
      } else {
        body(item / groups, item % groups, own, scratch, rounded_data);
      }
    }
    if (bf16_elements > 0) cpu::release_bf16_gemm();
    if (!accumulates || by_group) return;
    const std::lock_guard<std::mutex> guard(total_lock);
    total = total.defined() ? total.add_(own) : own;
  });
  return total;
}

// Groups of input channels per batch element: at most kChunkRows channels each, and
// enough items for the threads when B is small.
int64_t channel_groups(int64_t B, int64_t channels) {
  const int64_t threads = at::get_num_threads();
  return std::max((channels + kChunkRows - 1) / kChunkRows,
                  std::min<int64_t>(channels, (threads + B - 1) / B));
}

// Backward of a stride-2 conv (weight [Cout, Cin, k] in acc_t, padding k/2) on input
// [B, Cin, L] (contiguous) from dpre = dL/d(its output before bias and ReLU) [B, Cout, L/2]
// (acc_t, contiguous): adds Wᵀ's share to d_in [B, Cin, L] (acc_t, or bfloat16: each row's
// sum formed in acc_t and rounded once) where given and returns dL/dweight [Cout, Cin, k]
// where want_weight (else undefined). Per (batch element, group of input channels): the
// group's im2col columns cols [rows·k, L/2] give dW[:, group] += dpre_b cols^T, and
// col2im(W[:, group]^T dpre_b), the adjoint of im2col, goes to the group's rows of d_in
// (distinct rows per item, so no lock). bf16_gemms: the GEMMs round their operands to
// bfloat16 (rounded_gemm; fp32 only, where K is even).
template <typename in_t, typename acc_t, typename din_t>
at::Tensor conv_s2_backward(const in_t* input, int64_t B, int64_t Cin, int64_t L,
                            const at::Tensor& weight, const at::Tensor& dpre, din_t* d_in,
                            bool want_weight, bool bf16_gemms) {
  constexpr bool rounded_rows_out = !std::is_same_v<din_t, acc_t>;
  const int64_t Cout = weight.size(0), k = weight.size(2), p = k / 2, half = L / 2;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t groups = channel_groups(B, Cin);
  const auto group_start = [&](int64_t g) { return g * Cin / groups; };
  const int64_t most_rows = (Cin + groups - 1) / groups;
  const at::Tensor weight_2d = weight.reshape({Cout, Cin * k});
  const int64_t macs = (want_weight + (d_in != nullptr)) * B * Cin * k * Cout * half;
  const bool rounded_dw = bf16_gemms && half % 2 == 0, rounded_dx = bf16_gemms && Cout % 2 == 0;
  // The input gradient's GEMMs take W^T [Cin·k, Cout]: a transposed view of the weight
  // (the head's is N·k·D/4, no copy of it), rounded to bfloat16 in that layout once.
  const at::Tensor w_t_rounded =
      rounded_dx && d_in != nullptr ? rounded_rows(weight_2d.t(), true) : at::Tensor();
  const int64_t most_k = most_rows * k;
  const int64_t bf16_elements =
      std::max(rounded_dw ? rounded_gemm_elements(Cout, most_k, half, false) : 0,
               rounded_dx ? rounded_gemm_elements(most_k, half, Cout, true) : 0);
  const at::Tensor dw = for_each_item(
      B, groups, macs, want_weight, {Cout, Cin * k}, most_k * half + (rounded_rows_out ? L : 0),
      bf16_elements, acc,
      [&](int64_t b, int64_t g, at::Tensor& own, const at::Tensor& scratch,
          c10::BFloat16* rounded) {
        acc_t* cols = scratch.data_ptr<acc_t>();  // [rows·k, L/2]
        const int64_t c0 = group_start(g), rows = group_start(g + 1) - c0, K = rows * k;
        acc_t* dpre_b = dpre.data_ptr<acc_t>() + b * Cout * half;
        if (want_weight) {
          cpu::im2col_s2(input + (b * Cin + c0) * L, L, rows, L, k, cols, half);
          if constexpr (std::is_same_v<acc_t, float>) {
            if (rounded_dw) {
              rounded_gemm(Cout, K, half, dpre_b, half, cols, half, /*b_transposed=*/true,
                           own.data_ptr<float>() + c0 * k, Cin * k, /*accumulate=*/true, rounded);
            }
          }
          if (!rounded_dw) {
            own.narrow(1, c0 * k, K)
                .addmm_(view(dpre_b, Cout, half, half), view(cols, K, half, half).t());
          }
        }
        if (d_in == nullptr) return;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (rounded_dx) {
            rounded_gemm(K, half, Cout, w_t_rounded.data_ptr<c10::BFloat16>() + c0 * k * Cout, Cout,
                         dpre_b, half, /*b_transposed=*/false, cols, half,
                         /*accumulate=*/false, rounded);
          }
        }
        if (!rounded_dx) {
          at::Tensor cols_view = view(cols, K, half, half);
          at::mm_out(cols_view, weight_2d.narrow(1, c0 * k, K).t(), view(dpre_b, Cout, half, half));
        }
        din_t* in_rows = d_in + (b * Cin + c0) * L;
        acc_t* row_sum = cols + most_k * half;  // [L] (bfloat16 d_in only)
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row;
          if constexpr (rounded_rows_out) {
            std::fill(row_sum, row_sum + L, acc_t(0));
            row = row_sum;
          } else {
            row = in_rows + r * L;
          }
          for (int64_t j = 0; j < k; ++j) {  // d_in[c, 2t + j - p] += cols[(c, j), t]
            const acc_t* from = cols + (r * k + j) * half;
            acc_t* to = row + j - p;
            const int64_t t0 = std::max<int64_t>(0, (p - j + 1) / 2);
            const int64_t t1 = std::min<int64_t>(half, (L - j + p + 1) / 2);
            for (int64_t t = t0; t < t1; ++t) to[2 * t] += from[t];
          }
          if constexpr (rounded_rows_out) cpu::add_rounded(row_sum, L, in_rows + r * L);
        }
      });
  return want_weight ? dw.view({Cout, Cin, k}) : dw;
}

// Backward of a stride-2 transposed conv (weight [Cin, Cout, k] in acc_t, padding k/2,
// output_padding 1) on input [B, Cin, Lin] from dpre [B, Cout, 2·Lin] (acc_t, contiguous):
// writes d_in [B, Cin, Lin] where given and returns dL/dweight [Cin, Cout, k] where
// want_weight. The transposed conv is the adjoint of a stride-2 conv with the same weight,
// so with cols = im2col_s2(dpre_b) [Cout·k, Lin]: d_in_b = W [Cin, Cout·k] cols and
// dW += in_b cols^T. Per (batch element, group of input channels). bf16_gemms: as for
// conv_s2_backward.
template <typename acc_t>
at::Tensor conv_transpose_s2_backward(const acc_t* input, int64_t B, int64_t Cin, int64_t Lin,
                                      const at::Tensor& weight, const at::Tensor& dpre, acc_t* d_in,
                                      bool want_weight, bool bf16_gemms) {
  const int64_t Cout = weight.size(1), k = weight.size(2), Lout = 2 * Lin;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t groups = channel_groups(B, Cin);
  const auto group_start = [&](int64_t g) { return g * Cin / groups; };
  const at::Tensor w_flat = weight.reshape({Cin, Cout * k});
  const int64_t macs = (want_weight + (d_in != nullptr)) * B * Cin * k * Cout * Lin;
  const int64_t Kc = Cout * k, most_rows = (Cin + groups - 1) / groups;
  const bool rounded_dw = bf16_gemms && Lin % 2 == 0, rounded_dx = bf16_gemms && Kc % 2 == 0;
  const at::Tensor w_rounded = rounded_rows(w_flat, rounded_dx && d_in != nullptr);
  const int64_t bf16_elements =
      std::max(rounded_dw ? rounded_gemm_elements(most_rows, Kc, Lin, false) : 0,
               rounded_dx ? rounded_gemm_elements(most_rows, Lin, Kc, true) : 0);
  const at::Tensor dw = for_each_item(
      B, groups, macs, want_weight, {Cin, Kc}, Kc * Lin, bf16_elements, acc,
      [&](int64_t b, int64_t g, at::Tensor& own, const at::Tensor& scratch,
          c10::BFloat16* rounded) {
        acc_t* cols = scratch.data_ptr<acc_t>();  // [Cout·k, Lin]
        const int64_t c0 = group_start(g), rows = group_start(g + 1) - c0;
        cpu::im2col_s2(dpre.data_ptr<acc_t>() + b * Cout * Lout, Lout, Cout, Lout, k, cols, Lin);
        const acc_t* in_rows = input + (b * Cin + c0) * Lin;
        if (want_weight) {
          if constexpr (std::is_same_v<acc_t, float>) {
            if (rounded_dw) {
              rounded_gemm(rows, Kc, Lin, in_rows, Lin, cols, Lin, /*b_transposed=*/true,
                           own.data_ptr<float>() + c0 * Kc, Kc, /*accumulate=*/true, rounded);
            }
          }
          if (!rounded_dw) {
            own.narrow(0, c0, rows)
                .addmm_(view(const_cast<acc_t*>(in_rows), rows, Lin, Lin),
                        view(cols, Kc, Lin, Lin).t());
          }
        }
        if (d_in == nullptr) return;
        const acc_t* w_rows = w_flat.data_ptr<acc_t>() + c0 * Kc;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (rounded_dx) {
            rounded_gemm(rows, Lin, Kc, w_rounded.data_ptr<c10::BFloat16>() + c0 * Kc, Kc, cols,
                         Lin, /*b_transposed=*/false, d_in + (b * Cin + c0) * Lin, Lin,
                         /*accumulate=*/false, rounded);
          }
        }
        if (!rounded_dx) {
          cpu::gemm(rows, Lin, Kc, w_rows, Kc, cols, Lin, d_in + (b * Cin + c0) * Lin, Lin,
                    /*accumulate=*/false);
        }
      });
  return want_weight ? dw.view({Cin, Cout, k}) : dw;
}

// One conv of the score network, for the backward through it.
struct ConvLayer {
  int weight;  // WeightIndex of its weight (the bias follows)
  int input;   // ActivationIndex of its input
  int output;  // ActivationIndex of its (ReLU'd) output
  bool transposed;
  const char* name;  // of its range in profiler traces
};

// The bottleneck from the top (h5) down to h1: dec1, dec0, enc2, enc1 (then the first conv).
constexpr ConvLayer kLayers[] = {
    {kDec1Weight, kDec0Out, kH5, true, "casa::cpu backward dec1"},
    {kDec0Weight, kEnc2Out, kDec0Out, true, "casa::cpu backward dec0"},
    {kEnc2Weight, kEnc1Out, kEnc2Out, false, "casa::cpu backward enc2"},
    {kEnc1Weight, kH1, kEnc1Out, false, "casa::cpu backward enc1"},
};

// The tail's parameter gradients from the workers' `total`, in x's dtype and the weights'
// layouts: out[1 + i] for value_weight, value_bias, dec2_weight, dec2_bias where needed.
template <typename scalar_t, typename acc_t>
void store_tail_grads(const Backward<scalar_t, acc_t>& plan, const ParameterGrads<acc_t>& total,
                      at::ScalarType dtype, std::vector<at::Tensor>& out) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const Needs& needs = plan.needs;
  const int64_t N = plan.s.n_vars, D = plan.s.d_model, C1 = D / 4;
  const at::Tensor ordered = at::tensor(plan.order, at::kLong);
  if (needs.w[kValueWeight]) {
    out[1 + kValueWeight] = at::empty({D, D}, at::TensorOptions(acc))
                                .index_copy_(0, ordered, total.value_weight)
                                .to(dtype);
  }
  if (needs.w[kValueBias]) {
    out[1 + kValueBias] =
        at::empty({D}, at::TensorOptions(acc)).index_copy_(0, ordered, total.value_bias).to(dtype);
  }
  if (needs.w[kDec2Weight]) {
    const at::Tensor dw = at::empty({C1, N, plan.s.kernel}, at::TensorOptions(acc));
    const at::Tensor by_tap = dw.permute({1, 2, 0});  // [N, k, C1]
    for (int q = 0; q < 2; ++q) {
      const int64_t taps = static_cast<int64_t>(plan.taps[q].size());
      const at::Tensor part = total.dec2[q].view({N, taps, C1});
      for (size_t jj = 0; jj < plan.taps[q].size(); ++jj) {
        by_tap.select(1, plan.taps[q][jj]).copy_(part.select(1, static_cast<int64_t>(jj)));
      }
    }
    out[1 + kDec2Weight] = dw.to(dtype);
  }
  if (needs.w[kDec2Bias]) out[1 + kDec2Bias] = total.dec2_bias.to(dtype);
}

// The tail's backward, its plan (the tail's weights in the tiles' layouts) and parameter
// accumulators alive only while it runs, not through the layers below: run(plan, total),
// where ds or dv is needed, adds to dx and dh5 and fills `total`, whose gradients then go
// to out (store_tail_grads, in dtype). Returns whether the backward's GEMMs round their
// operands to bfloat16 (Backward::bf16_gemms).
template <typename scalar_t, typename acc_t, typename Run>
bool tail_backward(const Sizes& s, const Weights& w, const Needs& needs, const at::Tensor& col_max,
                   const at::Tensor& col_sum, int64_t tile, at::TensorList prepared,
                   at::ScalarType dtype, std::vector<at::Tensor>& out, const Run& run) {
  const Backward<scalar_t, acc_t> plan(s, w, needs, col_max, col_sum, tile, prepared);
  ParameterGrads<acc_t> total;
  if (needs.ds() || needs.dv()) run(plan, total);
  store_tail_grads(plan, total, dtype, out);
  return plan.bf16_gemms;
}

// Whether the first conv's backward runs: x or its weight needs it.
bool head_needed(const Needs& needs) { return needs.x || needs.w[kEnc0Weight]; }

// A layer's ReLU backward in place on d_out (the caller's own), then its bias's gradient
// out[1 + bias] (dtype) where needed: as threshold_backward, the gradient where the
// layer's output is > 0 or NaN, else 0. Returns d_out, now dL/d(the pre-activation).
template <typename acc_t>
at::Tensor relu_bias_backward(at::Tensor& d_out, const at::Tensor& output, int bias,
                              const Needs& needs, at::ScalarType dtype,
                              std::vector<at::Tensor>& out) {
  TORCH_INTERNAL_ASSERT(d_out.is_contiguous() && output.is_contiguous() &&
                        d_out.sizes() == output.sizes());
  acc_t* d = d_out.data_ptr<acc_t>();
  const acc_t* o = output.data_ptr<acc_t>();
  at::parallel_for(0, d_out.numel(), kReluGrain, [&](int64_t begin, int64_t end) {
    cpu::relu_backward(d + begin, o + begin, end - begin);
  });
  if (needs.w[bias]) out[1 + bias] = d_out.sum({0, 2}).to(dtype);
  return d_out;
}

// The score network's backward from dh5 [B, D/4, D/2] (acc_t, handed over: changed in
// place and freed once the layer under it has its gradient, as is each layer's) down to h1,
// each layer's ReLU then its conv's backward, as far down as a gradient is needed: out[1 +
// i] (dtype) for the four middle convs' parameters where needed. Returns dL/dh1 [B, D/4,
// D/2] (acc_t) where the first conv's bias, its weight or x needs it (else undefined).
template <typename acc_t>
at::Tensor bottleneck_backward(at::Tensor&& dh5, const Weights& w,
                               const std::vector<at::Tensor>& act, const Needs& needs,
                               at::ScalarType dtype, bool bf16_gemms,
                               std::vector<at::Tensor>& out) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = dh5.size(0);
  const bool below_h1 = head_needed(needs) || needs.w[kEnc0Bias];
  at::Tensor d_out = std::move(dh5);
  for (size_t i = 0; i < std::size(kLayers); ++i) {
    const ConvLayer& layer = kLayers[i];
    bool below = below_h1;  // whether anything under this layer needs its input's gradient
    for (size_t j = i + 1; j < std::size(kLayers); ++j) {
      below = below || needs.any_of({kLayers[j].weight, kLayers[j].weight + 1});
    }
    RECORD_FUNCTION(layer.name, std::vector<c10::IValue>());
    const at::Tensor pre =
        relu_bias_backward<acc_t>(d_out, act[layer.output], layer.weight + 1, needs, dtype, out);
    const at::Tensor weight = w[layer.weight].to(acc).contiguous();
    const at::Tensor& input = act[layer.input];
    const int64_t Cin = input.size(1), L = input.size(2);
    at::Tensor d_in;
    if (below) d_in = layer.transposed ? at::empty_like(input) : at::zeros_like(input);
    acc_t* d_in_data = below ? d_in.data_ptr<acc_t>() : nullptr;
    const at::Tensor dw =
        layer.transposed
            ? conv_transpose_s2_backward<acc_t>(input.data_ptr<acc_t>(), B, Cin, L, weight, pre,
                                                d_in_data, needs.w[layer.weight], bf16_gemms)
            : conv_s2_backward<acc_t, acc_t>(input.data_ptr<acc_t>(), B, Cin, L, weight, pre,
                                             d_in_data, needs.w[layer.weight], bf16_gemms);
    if (dw.defined()) out[1 + layer.weight] = dw.to(dtype);
    if (!below) return at::Tensor();
    d_out = d_in;
  }
  return d_out;
}

// The first conv's backward from dpre1, dL/d(its output before bias and ReLU): out[1 +
// kEnc0Weight] (dtype) where needed, and its share added to dx [B, N, D] (x's dtype) where x
// needs it.
template <typename scalar_t, typename acc_t>
void head_backward(const at::Tensor& dpre1, const at::Tensor& x, const at::Tensor& enc0_weight,
                   const Needs& needs, bool bf16_gemms, at::Tensor& dx,
                   std::vector<at::Tensor>& out) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor dw = conv_s2_backward<scalar_t, acc_t>(
      x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), enc0_weight.to(acc).contiguous(),
      dpre1, needs.x ? dx.data_ptr<scalar_t>() : nullptr, needs.w[kEnc0Weight], bf16_gemms);
  if (dw.defined()) out[1 + kEnc0Weight] = dw.to(x.scalar_type());
}

// Empty tensors (x's options) for the gradients not computed.
void fill_empty(std::vector<at::Tensor>& out, const at::Tensor& x) {
  for (at::Tensor& t : out) {
    if (!t.defined()) t = at::empty({0}, x.options());
  }
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x, const Weights& w,
                                      const std::vector<at::Tensor>& act, const at::Tensor& col_max,
                                      const at::Tensor& col_sum, int64_t tile,
                                      at::TensorList prepared, const Needs& needs, const Sizes& s) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = s.batch, N = s.n_vars, D = s.d_model, C1 = D / 4;
  at::Tensor dx = needs.x ? at::zeros({B, N, D}, x.options()) : at::Tensor();
  at::Tensor dh5 = needs.dh5() ? at::zeros({B, C1, D / 2}, at::TensorOptions(acc)) : at::Tensor();
  std::vector<at::Tensor> out(1 + kNumWeights);
  const bool bf16_gemms = tail_backward<scalar_t, acc_t>(
      s, w, needs, col_max, col_sum, tile, prepared, x.scalar_type(), out,
      [&](const Backward<scalar_t, acc_t>& plan, ParameterGrads<acc_t>& total) {
        RECORD_FUNCTION("casa::cpu backward tail", std::vector<c10::IValue>());
        plan.tail(x, grad, act[kH5], dx, dh5, total);
      });
  at::Tensor dh1 = dh5.defined() ? bottleneck_backward<acc_t>(std::move(dh5), w, act, needs,
                                                              x.scalar_type(), bf16_gemms, out)
                                 : at::Tensor();
  if (dh1.defined()) {
    RECORD_FUNCTION("casa::cpu backward enc0", std::vector<c10::IValue>());
    const at::Tensor dpre1 =
        relu_bias_backward<acc_t>(dh1, act[kH1], kEnc0Bias, needs, x.scalar_type(), out);
    if (head_needed(needs))
      head_backward<scalar_t, acc_t>(dpre1, x, w[kEnc0Weight], needs, bf16_gemms, dx, out);
  }
  if (needs.x) out[0] = dx;
  fill_empty(out, x);
  return out;
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", received ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", received ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, received ", t.device());
}

// The arguments every backward op shares, checked: x, the weights (schema order), the
// problem's sizes, the requested gradients and the accumulation dtype.
struct Arguments {
  at::Tensor x;
  Weights w;
  Sizes s;
  Needs needs;
  at::ScalarType acc;
};

Arguments check_arguments(const at::Tensor& x_in, at::TensorList weights,
                          const c10::List<bool>& needs) {
  TORCH_CHECK(weights.size() == kNumWeights, "weights: expected ", kNumWeights,
              " tensors in schema order, received ", weights.size());
  Arguments a;
  for (int i = 0; i < kNumWeights; ++i) a.w[i] = weights[i].contiguous();
  a.x = x_in.contiguous();
  a.s = check_args(a.x, a.w);
  TORCH_CHECK(a.x.device().is_cpu(), "x: expected a CPU tensor, received device ", a.x.device());
  TORCH_CHECK(needs.size() == 1 + kNumWeights, "needs: expected ", 1 + kNumWeights,
              " flags (x, then the weights), received ", needs.size());
  a.needs = Needs{needs.get(0), {}};
  for (int i = 0; i < kNumWeights; ++i) a.needs.w[i] = needs.get(1 + i);
  a.acc = a.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return a;
}

// grad_y checked against x, contiguous.
at::Tensor checked_grad(const at::Tensor& grad_y, const Arguments& a) {
  check_like(grad_y, "grad_y", a.x.sizes(), a.x.scalar_type());
  return grad_y.contiguous();
}

// The column statistics, each [B, D] in the accumulation dtype, checked.
void check_stats(const at::Tensor& col_max, const at::Tensor& col_sum, const Arguments& a) {
  check_like(col_max, "col_max", {a.s.batch, a.s.d_model}, a.acc);
  check_like(col_sum, "col_sum", {a.s.batch, a.s.d_model}, a.acc);
}

// The saved activations (ActivationIndex order), checked, contiguous.
std::vector<at::Tensor> checked_activations(at::TensorList activations, const Arguments& a) {
  TORCH_CHECK(activations.size() == kNumActivations, "activations: expected ", kNumActivations,
              " tensors (h1, enc1, enc2, dec0 outputs, h5), received ", activations.size());
  const int64_t B = a.s.batch, D = a.s.d_model;
  const int64_t shapes[kNumActivations][2] = {
      {D / 4, D / 2}, {D / 2, D / 4}, {D, D / 8}, {D / 2, D / 4}, {D / 4, D / 2}};
  std::vector<at::Tensor> act(kNumActivations);
  for (int i = 0; i < kNumActivations; ++i) {
    check_like(activations[i], "activations", {B, shapes[i][0], shapes[i][1]}, a.acc);
    act[i] = activations[i].contiguous();
  }
  return act;
}

// Runs f(scalar_t{}, acc_t{}) for x's dtype: fp32, fp64, or bfloat16 with fp32 arithmetic.
template <typename F>
auto by_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kBFloat16: return f(c10::BFloat16{}, float{});
    default:
      TORCH_CHECK(false, "x: expected dtype float32, float64 or bfloat16 on the CPU, received ",
                  dtype);
  }
}

// The forward's tail tile width and its tail layouts for that width (cpu_prepare_tail's
// list, PreparedIndex), checked: the entries Backward reads have cpu_prepare_tail's shapes
// for these sizes, in the accumulation dtype, or in bfloat16 (the forward's on a CPU with
// bfloat16 GEMMs: dec2 by parity, and Wv^T packed by tile).
void check_layouts(int64_t tile, at::TensorList prepared, const Arguments& a) {
  TORCH_CHECK(tile >= 2 && tile <= a.s.d_model && tile % 2 == 0,
              "tile: expected an even width in [2, d_model = ", a.s.d_model, "], received ", tile);
  TORCH_CHECK(prepared.size() >= kNumPrepared, "prepared: expected cpu_prepare_tail's list, ",
              static_cast<int>(kNumPrepared), " tensors or more, received ", prepared.size());
  const at::ScalarType dtype = prepared[kDec2Even].scalar_type();
  TORCH_CHECK(dtype == a.acc || dtype == at::kBFloat16, "prepared[0]: expected dtype ", a.acc,
              " or BFloat16, received ", dtype);
  const int64_t N = a.s.n_vars, D = a.s.d_model;
  const char* names[] = {"prepared[0] (dec2_weight, even outputs)",
                         "prepared[1] (dec2_weight, odd outputs)", "prepared[2] (value_weight^T)",
                         "prepared[3] (value_bias)"};
  for (int q = 0; q < 2; ++q) {
    const int64_t taps = static_cast<int64_t>(cpu::parity_taps(a.s.kernel, q).size());
    check_like(prepared[kDec2Even + q], names[q], {N, taps * (D / 4)}, dtype);
  }
  std::vector<int> read = {kDec2Even, kDec2Odd, kValueWeightT};
  if (dtype == a.acc) {
    check_like(prepared[kValueWeightT], names[2], {D, D}, a.acc);
    check_like(prepared[kValueBiasOrdered], names[3], {D}, a.acc);
    read.push_back(kValueBiasOrdered);
  } else {
    const int64_t tiles = (D + tile - 1) / tile;
    check_like(prepared[kValueWeightT], names[2], {tiles * cpu::packed_bf16_size(D, tile)},
               at::kBFloat16);
  }
  for (int i : read) {
    TORCH_CHECK(prepared[i].is_contiguous(), names[i], ": expected a contiguous tensor");
  }
}

// The state of the variate-parallel tail backward, checked.
void check_state(const at::Tensor& state, const Arguments& a) {
  check_like(state, "state", {3 * a.s.batch * a.s.n_vars * a.s.d_model}, a.acc);
  TORCH_CHECK(state.is_contiguous(), "state: expected a contiguous tensor");
}

// casa::cpu_score_attention_backward: the gradients of the op at x (weights in schema
// order) for grad_y = dL/dy, from the forward's saved activations (ActivationIndex) and
// column statistics (casa::cpu_tail_fused's), with the forward's tail tile width and its
// tail layouts for it (prepared: cpu_prepare_tail's list). needs: 1 + 14 flags, x then the
// weights. Returns 1 + 14 tensors in x's dtype, in that order; those not needed are empty.
std::vector<at::Tensor> score_attention_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 at::TensorList weights, at::TensorList activations,
                                                 const at::Tensor& col_max,
                                                 const at::Tensor& col_sum, at::TensorList prepared,
                                                 int64_t tile, const c10::List<bool>& needs) {
  const Arguments a = check_arguments(x, weights, needs);
  const at::Tensor grad = checked_grad(grad_y, a);
  const std::vector<at::Tensor> act = checked_activations(activations, a);
  check_stats(col_max, col_sum, a);
  check_layouts(tile, prepared, a);
  const at::Tensor stats_max = col_max.contiguous(), stats_sum = col_sum.contiguous();
  return by_dtype(a.x.scalar_type(), [&](auto scalar, auto accumulate) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(accumulate);
    return backward_impl<scalar_t, acc_t>(grad, a.x, a.w, act, stats_max, stats_sum, tile, prepared,
                                          a.needs, a.s);
  });
}

// casa::cpu_tail_backward_colsum, part 1 of the tail's backward in a variate-parallel
// backward (docs/design.md §12.4), for this rank's N variates: returns (colsum [B, D],
// Σ_N P ⊙ dP over them, zero where ds is not due; state, the tiles' P, dP and σ' for
// part 2, 3·B·N·D), both in the accumulation dtype. col_max, col_sum: the global (merged)
// statistics; tile: the tail tile width, the same for both parts, and prepared the
// forward's tail layouts for it (cpu_prepare_tail's list).
std::tuple<at::Tensor, at::Tensor> tail_backward_colsum(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights, const at::Tensor& h5,
    const at::Tensor& col_max, const at::Tensor& col_sum, const c10::List<bool>& needs,
    at::TensorList prepared, int64_t tile) {
  const Arguments a = check_arguments(x, weights, needs);
  const at::Tensor grad = checked_grad(grad_y, a);
  check_like(h5, "h5", {a.s.batch, a.s.d_model / 4, a.s.d_model / 2}, a.acc);
  check_stats(col_max, col_sum, a);
  check_layouts(tile, prepared, a);
  const at::Tensor stats_max = col_max.contiguous(), stats_sum = col_sum.contiguous();
  at::Tensor colsum = at::zeros({a.s.batch, a.s.d_model}, at::TensorOptions(a.acc));
  at::Tensor state =
      at::empty({3 * a.s.batch * a.s.n_vars * a.s.d_model}, at::TensorOptions(a.acc));
  if (!a.needs.ds() && !a.needs.dv()) return {colsum, state};
  by_dtype(a.x.scalar_type(), [&](auto scalar, auto accumulate) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(accumulate);
    RECORD_FUNCTION("casa::cpu backward tail colsum", std::vector<c10::IValue>());
    const Backward<scalar_t, acc_t> plan(a.s, a.w, a.needs, stats_max, stats_sum, tile, prepared);
    plan.tail_colsum(a.x, grad, h5.contiguous(), state, colsum);
    return 0;
  });
  return {colsum, state};
}

// casa::cpu_tail_backward_rows, part 2 of a variate-parallel backward (docs/design.md §12.4):
// from part 1's state and colsum summed over every rank, the tail's rows and the score
// network down to h1. Returns 1 + 14 + 1 tensors: dx's share so far ([B, N, D], x's dtype;
// empty unless x needs a gradient), the weights' gradients in x's dtype
// (enc0_weight's empty: cpu_head_backward gives it; value and bottleneck parameters' are
// this rank's share), and dL/d(the first conv's output before bias and ReLU) from this
// rank's rows ([B, D/4, D/2], accumulation dtype; empty unless x or enc0_weight needs it).
// prepared, tile: as for cpu_tail_backward_colsum.
std::vector<at::Tensor> tail_backward_rows(const at::Tensor& grad_y, const at::Tensor& x,
                                           at::TensorList weights, at::TensorList activations,
                                           const at::Tensor& col_max, const at::Tensor& col_sum,
                                           const at::Tensor& colsum, const at::Tensor& state,
                                           const c10::List<bool>& needs, at::TensorList prepared,
                                           int64_t tile) {
  const Arguments a = check_arguments(x, weights, needs);
  const at::Tensor grad = checked_grad(grad_y, a);
  const std::vector<at::Tensor> act = checked_activations(activations, a);
  check_stats(col_max, col_sum, a);
  check_like(colsum, "colsum", {a.s.batch, a.s.d_model}, a.acc);
  check_layouts(tile, prepared, a);
  check_state(state, a);
  const at::Tensor stats_max = col_max.contiguous(), stats_sum = col_sum.contiguous();
  const int64_t B = a.s.batch, N = a.s.n_vars, D = a.s.d_model;
  std::vector<at::Tensor> out(1 + kNumWeights + 1);
  by_dtype(a.x.scalar_type(), [&](auto scalar, auto accumulate) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(accumulate);
    at::Tensor dx = a.needs.x ? at::zeros({B, N, D}, a.x.options()) : at::Tensor();
    at::Tensor dh5 =
        a.needs.dh5() ? at::zeros({B, D / 4, D / 2}, at::TensorOptions(a.acc)) : at::Tensor();
    const bool bf16_gemms = tail_backward<scalar_t, acc_t>(
        a.s, a.w, a.needs, stats_max, stats_sum, tile, prepared, a.x.scalar_type(), out,
        [&](const Backward<scalar_t, acc_t>& plan, ParameterGrads<acc_t>& total) {
          RECORD_FUNCTION("casa::cpu backward tail rows", std::vector<c10::IValue>());
          plan.tail_given_colsum(a.x, grad, act[kH5], state, colsum.contiguous(), dx, dh5, total);
        });
    at::Tensor dh1 = dh5.defined() ? bottleneck_backward<acc_t>(std::move(dh5), a.w, act, a.needs,
                                                                a.x.scalar_type(), bf16_gemms, out)
                                   : at::Tensor();
    if (dh1.defined()) {
      const at::Tensor dpre1 =
          relu_bias_backward<acc_t>(dh1, act[kH1], kEnc0Bias, a.needs, a.x.scalar_type(), out);
      if (head_needed(a.needs)) out[1 + kNumWeights] = dpre1;
    }
    out[0] = dx;
    return 0;
  });
  fill_empty(out, a.x);
  return out;
}

// casa::cpu_head_backward, the end of a variate-parallel backward (docs/design.md §12.4): the
// first conv's backward from dpre1 ([B, D/4, D/2], accumulation dtype, summed over every
// rank), adding x's share to dx (cpu_tail_backward_rows's, in x's dtype; empty unless x needs
// a gradient). Returns (dx, enc0_weight's gradient), each empty where not needed.
std::vector<at::Tensor> head_backward_op(const at::Tensor& dpre1, const at::Tensor& x_in,
                                         const at::Tensor& enc0_weight, at::Tensor& dx,
                                         const c10::List<bool>& needs) {
  TORCH_CHECK(needs.size() == 1 + kNumWeights, "needs: expected ", 1 + kNumWeights,
              " flags (x, then the weights), received ", needs.size());
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(),
              "x: expected a 3-D CPU tensor [batch, n_vars, d_model], received shape ", x.sizes(),
              " on ", x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(enc0_weight.dim() == 3 && enc0_weight.size(0) == D / 4 && enc0_weight.size(1) == N &&
                  enc0_weight.size(2) % 2 == 1,
              "enc0_weight: expected shape [", D / 4, ", ", N, ", odd k], received ",
              enc0_weight.sizes());
  check_like(dpre1, "dpre1", {B, D / 4, D / 2}, acc);
  Needs flags{needs.get(0), {}};
  for (int i = 0; i < kNumWeights; ++i) flags.w[i] = needs.get(1 + i);
  if (flags.x) check_like(dx, "dx", {B, N, D}, x.scalar_type());
  TORCH_CHECK(!flags.x || dx.is_contiguous(), "dx: expected a contiguous tensor");
  std::vector<at::Tensor> out(1 + kNumWeights);
  by_dtype(x.scalar_type(), [&](auto scalar, auto accumulate) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(accumulate);
    RECORD_FUNCTION("casa::cpu backward enc0", std::vector<c10::IValue>());
    head_backward<scalar_t, acc_t>(dpre1.contiguous(), x, enc0_weight, flags,
                                   rounds_to_bf16<scalar_t>(), dx, out);
    return 0;
  });
  std::vector<at::Tensor> result{flags.x ? dx : at::empty({0}, x.options()), out[1 + kEnc0Weight]};
  fill_empty(result, x);
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(casa, m) {
  m.def(
      "cpu_score_attention_backward(Tensor grad_y, Tensor x, Tensor[] weights, "
      "Tensor[] activations, Tensor col_max, Tensor col_sum, Tensor[] prepared, int tile, "
      "bool[] needs) -> Tensor[]");
  m.def(
      "cpu_tail_backward_colsum(Tensor grad_y, Tensor x, Tensor[] weights, Tensor h5, "
      "Tensor col_max, Tensor col_sum, bool[] needs, Tensor[] prepared, int tile) "
      "-> (Tensor, Tensor)");
  m.def(
      "cpu_tail_backward_rows(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] activations, "
      "Tensor col_max, Tensor col_sum, Tensor colsum, Tensor state, bool[] needs, "
      "Tensor[] prepared, int tile) -> Tensor[]");
  m.def(
      "cpu_head_backward(Tensor dpre1, Tensor x, Tensor enc0_weight, Tensor(a!) dx, "
      "bool[] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(casa, CPU, m) {
  m.impl("cpu_score_attention_backward", &score_attention_backward);
  m.impl("cpu_tail_backward_colsum", &tail_backward_colsum);
  m.impl("cpu_tail_backward_rows", &tail_backward_rows);
  m.impl("cpu_head_backward", &head_backward_op);
}

}  // namespace casa
