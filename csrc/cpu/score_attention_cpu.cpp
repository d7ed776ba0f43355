// Fused CPU implementation of casa::fused_score_attention (docs/design.md §5).
//
// Every convolution is a GEMM on the weight as stored or re-laid out once per call:
//
// * stride-2 conv: weight [Cout, Cin, k] viewed as [Cout, Cin·k] times the columns
//   of the input (im2col_s2, K = Cin·k, zeros only at the two borders);
// * stride-2 transposed conv (output_padding 1), in the bottleneck: weight [Cin, Cout, k]
//   viewed as [Cin, Cout·k], transposed, times the input gives one row per (output
//   channel, tap); col2im_relu_s2 adds each tap into output column 2i - p + j;
// * the last transposed conv, in the tail: one GEMM per output parity q, on the taps
//   that reach it (parity_taps): output 2u + q takes tap j from input u + (q + p - j)/2.
// No structural zeros are multiplied.
//
// Stages (activations of the bottleneck are laid out [channels, batch, length]):
//   1. head: conv N -> D/4 per batch element, reducing over N in chunks of at most
//      kHeadChunk rows, so x is only ever copied one chunk at a time. Work items are
//      (batch element, group of chunks): the N reduction is split when B is small.
//   2. bottleneck: the four N-independent convs, O(B·D^2), each one GEMM over the
//      whole batch, its columns (large B) or rows (small B) split across threads; for
//      bfloat16 with bfloat16 GEMMs, channels-last GEMMs in bfloat16 instead
//      (channels_last.h).
//   3. tail, per (batch element, tile of T output columns), kTailRows rows at a time:
//      pass 1 runs the last transposed conv into S[N, T] and turns it into softmax
//      numerators, each block on its own shift (vectorised.h); pass 2 runs the value
//      GEMM on value_rows() rows at a time and writes y block by block, each block
//      rescaled to the common shift.
//
// The GEMMs (gemm.h) run inside torch's parallel workers with the BLAS single-threaded
// (sequential_blas.h), so only one pool of threads ever runs. For bfloat16 input on a CPU
// with bfloat16 GEMMs (cpu::bf16_gemm: AMX or avx512_bf16) they take bfloat16 operands
// (activations rounded to bfloat16 between layers, as in PyTorch's own bfloat16
// convolutions) and accumulate in fp32; elsewhere bfloat16 input is computed in fp32.
//
// Temporary memory: O(B·D^2) for the head's and bottleneck's activations (one block,
// Activations) and h5, min(kHeadChunk, N)·k·D/2 per head worker,
// and per tail worker S[N, T] (T <= D, tail_tile_width), the blocks' softmax statistics
// (2·T per kTailRows rows), a [value_rows(), T] value block and O(D^2) more (for bfloat16
// input without bfloat16 GEMMs this includes a [value_rows(), D] fp32 block of x rows).
// Accumulation is fp32 for fp32/bf16 input, fp64 for fp64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <optional>
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
using cpu::parity_taps;
using cpu::tail_tile_width;
using cpu::threads_for;
using cpu::tile_parity_order;

constexpr int64_t kHeadChunk = 256;            // rows of x turned into GEMM columns at a time
constexpr int64_t kTailRows = 64;              // rows of a tail tile per GEMM + softmax step
constexpr int64_t kValueRows = 512;            // rows per value GEMM on fp32 GEMMs (§5.3)
constexpr int64_t kMinColumnsPerThread = 128;  // parallel_mm: split columns, else rows

// out = a @ b, then relu(out + bias[:, None]) when bias is given, split across threads:
// the kernel keeps to one pool of threads (torch's workers) instead of handing the BLAS
// its own. The columns are split where each thread gets kMinColumnsPerThread or more
// (large B), else the rows: at B = 1 the bottleneck's GEMMs have 32 to 128 columns, too
// few to split. a, b and out: contiguous.
template <typename acc_t>
void parallel_mm(const at::Tensor& out, const at::Tensor& a, const acc_t* b,
                 const at::Tensor* bias) {
  const int64_t M = out.size(0), K = a.size(1), n = out.size(1);
  const int64_t threads = threads_for(M * K * n);
  const bool by_rows = n < kMinColumnsPerThread * threads;
  const int64_t extent = by_rows ? M : n;
  const int64_t grain =
      threads == 1 ? extent : std::max<int64_t>(32, (extent + threads - 1) / threads);
  acc_t* const c = out.data_ptr<acc_t>();
  parallel_for_aten(extent, grain, [&](int64_t i0, int64_t i1) {
    const int64_t r0 = by_rows ? i0 : 0, rows = by_rows ? i1 - i0 : M;
    const int64_t c0 = by_rows ? 0 : i0, cols = by_rows ? n : i1 - i0;
    acc_t* const block = c + r0 * n + c0;
    cpu::gemm(rows, cols, K, a.data_ptr<acc_t>() + r0 * K, K, b + c0, n, block, n,
              /*accumulate=*/false);
    if (bias != nullptr) cpu::add_bias_relu(block, n, rows, cols, bias->data_ptr<acc_t>() + r0);
  });
}

// out = relu(conv(in) + bias) for a stride-2 conv, every batch element in one GEMM:
// in [Cin, B, L] -> out [Cout, B, L/2]. a: the weight as the GEMM's left operand,
// [Cout, Cin·k]. cols: room for the im2col columns, Cin·k·B·L/2 elements.
template <typename acc_t>
void conv_relu(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& in, int64_t k,
               acc_t* cols, const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(in.is_contiguous() && out.is_contiguous());
  const int64_t Cin = in.size(0), B = in.size(1), L = in.size(2), Cout = a.size(0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      cpu::im2col_s2(in.data_ptr<acc_t>() + b * L, B * L, Cin, L, k, cols + b * (L / 2),
                     B * (L / 2));
    }
  });
  parallel_mm<acc_t>(out.view({Cout, B * L / 2}), a, cols, &bias);
}

// out = relu(conv_transpose(in) + bias) for a stride-2 transposed conv, every batch
// element in one GEMM: in [Cin, B, L] -> out [Cout, B, 2L]. a: the weight [Cin, Cout, k] as
// the GEMM's left operand, [Cout·k, Cin]. cols: room for the GEMM's output, Cout·k·B·L
// elements.
template <typename acc_t>
void conv_transpose_relu(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& in,
                         int64_t k, acc_t* cols, const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(in.is_contiguous() && out.is_contiguous());
  const int64_t B = in.size(1), L = in.size(2), Cout = bias.size(0);
  const at::Tensor cols_2d = at::from_blob(cols, {Cout * k, B * L}, in.options());
  parallel_mm<acc_t>(cols_2d, a, in.data_ptr<acc_t>(), nullptr);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      cpu::col2im_relu_s2(cols + b * L, B * L, Cout, k, L, bias.data_ptr<acc_t>(),
                          out.data_ptr<acc_t>() + b * 2 * L, B * 2 * L);
    }
  });
}

// The bottleneck convs' weights (enc1, enc2, dec0, dec1; acc_t) as their GEMMs' left
// operands (PreparedIndex kEnc1Gemm … kDec1Gemm): the stride-2 convs' [Cout, Cin·k] views,
// the transposed convs' [Cout·k, Cin] transposes.
std::array<at::Tensor, 4> bottleneck_operands(const at::Tensor& enc1, const at::Tensor& enc2,
                                              const at::Tensor& dec0, const at::Tensor& dec1) {
  const auto flat = [](const at::Tensor& w) { return w.reshape({w.size(0), -1}); };
  return {flat(enc1), flat(enc2), cpu::transposed(flat(dec0)), cpu::transposed(flat(dec1))};
}

// The bottleneck's four convs with their biases and ReLUs on im2col/col2im GEMMs, h1
// [D/4, B, D/2] -> enc1_out [D/2, B, D/4] -> enc2_out [D, B, D/8] -> dec0_out [D/2, B, D/4]
// -> h5 [D/4, B, D/2]; an output may take the place of an input spent by then (Plan::
// bottleneck's regions). operands: bottleneck_operands; cols: k·B·D^2/16 elements.
template <typename acc_t>
void bottleneck_convs(const std::array<at::Tensor, 4>& operands,
                      const std::array<at::Tensor, 4>& biases, int64_t k, const at::Tensor& h1,
                      const at::Tensor& enc1_out, const at::Tensor& enc2_out,
                      const at::Tensor& dec0_out, const at::Tensor& h5, acc_t* cols) {
  conv_relu<acc_t>(operands[0], biases[0], h1, k, cols, enc1_out);
  conv_relu<acc_t>(operands[1], biases[1], enc1_out, k, cols, enc2_out);
  conv_transpose_relu<acc_t>(operands[2], biases[2], enc2_out, k, cols, dec0_out);
  conv_transpose_relu<acc_t>(operands[3], biases[3], dec0_out, k, cols, h5);
}

// The activations of the head and the bottleneck (Plan::run), carved from one allocation
// per call. The head writes h1 [D/4, B, D/2] into io. Then, for the convs on im2col and
// col2im (fp32 GEMMs), the stages reuse three regions:
//   io   [D/4, B, D/2]: h1, then enc2's output [D, B, D/8];
//   mid  [D/2, B, D/4]: enc1's output, then dec0's;
//   cols [k·B·D^2/16]:  the stride-2 convs' im2col columns, then the transposed convs'
//                       GEMM outputs [Cout·k, B·L].
// For the channels-last convs (bfloat16 GEMMs, channels_last.h), three bfloat16
// activations follow io:
//   rows[0] [B, D/2, D/4]: h1; rows[1] [B, D/4, D/2]: enc1's output, then dec0's;
//   rows[2] [B, D/8, D]: enc2's output.
// dec1's output h5, which the tail reads, has an allocation of its own. One block, because
// with one allocation per activation glibc returned the memory after every call and the
// next call faulted it back in (docs/design.md §5.6).
template <typename acc_t>
struct Activations {
  at::Tensor memory;
  at::Tensor io, mid;  // [D/4, B, D/2] and (im2col path) [D/2, B, D/4]
  acc_t* cols = nullptr;
  cpu::PaddedRows rows[3] = {};  // channels-last path

  Activations(int64_t B, int64_t D, int64_t k, at::ScalarType acc, bool channels_last) {
    const int64_t quarter = B * D * D / 8;  // elements of io and of mid
    const at::TensorOptions options(acc);
    if (!channels_last) {
      memory = at::empty({2 * quarter + k * B * D * D / 16}, options);
      io = memory.narrow(0, 0, quarter).view({D / 4, B, D / 2});
      mid = memory.narrow(0, quarter, quarter).view({D / 2, B, D / 4});
      cols = memory.data_ptr<acc_t>() + 2 * quarter;
      return;
    }
    const int64_t p = k / 2, L[3] = {D / 2, D / 4, D / 8}, C[3] = {D / 4, D / 2, D};
    int64_t bytes = quarter * static_cast<int64_t>(sizeof(acc_t));
    for (int i = 0; i < 3; ++i) bytes += 2 * cpu::PaddedRows::elements(B, L[i], C[i], p);
    memory = at::empty({bytes}, at::kByte);
    io = at::from_blob(memory.data_ptr(), {D / 4, B, D / 2}, options);
    auto* next = reinterpret_cast<c10::BFloat16*>(io.data_ptr<acc_t>() + quarter);
    for (int i = 0; i < 3; ++i) {
      rows[i] = {next, B, L[i], C[i], p};
      next += cpu::PaddedRows::elements(B, L[i], C[i], p);
    }
  }
};

// Scratch of one head worker (Plan::head_scratch): the columns of a chunk of x in the
// accumulation type, and with bfloat16 GEMMs also in bfloat16 and packed.
struct HeadScratch {
  at::Tensor cols, cols_bf16, packed;
};

// Scratch of one tail worker (Plan::tail_scratch): views of one acc_t buffer (and, with
// bfloat16 GEMMs, one bfloat16 buffer), taken once per worker.
template <typename acc_t>
struct TailScratch {
  at::Tensor memory, packed_memory;  // own what the pointers below point into
  acc_t* rhs[2];                     // [max taps · D/4, T/2]: Plan::parity_rhs for each parity
  c10::BFloat16* rhs_packed[2];      // rhs in bfloat16 packed, with bfloat16 GEMMs
  acc_t* scores;                     // [N, T]
  acc_t* values;                     // [value_rows(), T]
  acc_t* shift;                      // [row blocks, T]: each block's softmax shift, then scale
  acc_t* sum;                        // [row blocks, T]: each block's column sums
  acc_t* common[2];                  // [T] each: the common shift and the column totals
  acc_t* x_rows;  // [value_rows(), D]: a block of x[b] rows in fp32 (bfloat16 input without
                  // bfloat16 GEMMs)
};

// The prepared list: PreparedIndex (tail_layout.h).

enum class TailMode { kFused, kStats, kOutput };

template <typename scalar_t, typename acc_t>
struct Plan {
  Sizes s;
  at::ScalarType acc;
  Weights w;     // in acc_t: the caller's tensors for fp32/fp64, fp32 copies for bf16
  int64_t tile;  // tail tile width T
  // bfloat16 input on a CPU with bfloat16 GEMMs (cpu::bf16_gemm: AMX or avx512_bf16): the
  // GEMMs take bfloat16 operands (as PyTorch's own bfloat16 GEMMs do), fp32 accumulation;
  // the bottleneck's convs run channels-last (channels_last.h, docs/design.md §11.4).
  bool bf16_gemm;
  std::vector<int64_t> taps[2];      // parity_taps(k, q)
  std::vector<at::Tensor> prepared;  // PreparedIndex
  int64_t packed_tile;     // elements between the tiles of prepared[kValueWeightT] (bf16_gemm)
  at::Tensor enc0_weight;  // with bf16_gemm: the caller's bfloat16 first-conv weight

  Plan(const Sizes& sizes, const Weights& weights, std::vector<at::Tensor> prepared_weights,
       int64_t tile_width, cpu::Bf16Gemm tier)
      : s(sizes),
        acc(c10::CppTypeToScalarType<acc_t>::value),
        tile(tile_width),
        bf16_gemm(tier != cpu::Bf16Gemm::kNone),
        prepared(std::move(prepared_weights)),
        packed_tile(cpu::packed_bf16_size(sizes.d_model, tile_width)) {
    const bool copies = !std::is_same_v<scalar_t, acc_t>;
    TORCH_CHECK(prepared.size() == kNumPrepared + (copies ? kNumWeights : 0),
                "prepared: expected the tensors of cpu_prepare_weights, received ",
                prepared.size());
    for (int i = 0; i < kNumWeights; ++i) w[i] = copies ? prepared[kNumPrepared + i] : weights[i];
    for (int64_t q = 0; q < 2; ++q) taps[q] = parity_taps(s.kernel, q);
    if (bf16_gemm) enc0_weight = weights[kEnc0Weight];
  }

  // The prepared list for `weights` (the caller's, in scalar_t).
  static std::vector<at::Tensor> prepare(const Sizes& s, const Weights& weights, int64_t tile,
                                         cpu::Bf16Gemm tier) {
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const bool bf16_gemm = tier != cpu::Bf16Gemm::kNone;
    const at::ScalarType gemm_type = bf16_gemm ? at::kBFloat16 : acc;
    const int64_t N = s.n_vars, D = s.d_model, C1 = D / 4, k = s.kernel;
    // Entries whose weights a stage does not pass (undefined) stay empty placeholders.
    std::vector<at::Tensor> out(kNumPrepared, at::empty({0}, at::TensorOptions(acc)));
    const auto has = [&](std::initializer_list<int> indices) {
      return std::all_of(indices.begin(), indices.end(),
                         [&](int i) { return weights[i].defined(); });
    };
    // The GEMMs' operands from the weights in their dtype (a no-op cast where it matches).
    const auto gemm_weight = [&](int i) { return weights[i].to(gemm_type); };
    std::vector<int64_t> channels(C1), inputs(D), order = tile_parity_order(D, tile);
    std::iota(channels.begin(), channels.end(), 0);
    std::iota(inputs.begin(), inputs.end(), 0);
    for (int64_t q = 0; q < 2 && has({kDec2Weight}); ++q) {
      out[kDec2Even + q] =
          relayout(gemm_weight(kDec2Weight), N * k, channels, cpu::dec2_parity_columns(N, k, q))
              .view({N, -1});
    }
    if (has({kValueWeight, kValueBias})) {
      const at::Tensor wv_t = relayout(gemm_weight(kValueWeight), D, order, inputs);
      out[kValueWeightT] = bf16_gemm ? packed_by_tile(wv_t, D, tile) : wv_t;
      out[kValueBiasOrdered] =
          weights[kValueBias].to(acc).index_select(0, at::tensor(order, at::kLong));
    }
    if (has({kEnc1Weight, kEnc2Weight, kDec0Weight, kDec1Weight})) {
      if (bf16_gemm) {  // the channels-last bottleneck's (channels_last.h)
        out[kEnc1Gemm] = cpu::pack_conv_s2_weight(weights[kEnc1Weight]);
        out[kEnc2Gemm] = cpu::pack_conv_s2_weight(weights[kEnc2Weight]);
        out[kDec0Gemm] = cpu::pack_conv_transpose_s2_weight(weights[kDec0Weight]);
        out[kDec1Gemm] = cpu::pack_conv_transpose_s2_weight(weights[kDec1Weight]);
      } else {
        const auto operand = [&](int i) { return weights[i].to(acc); };
        const auto operands = bottleneck_operands(operand(kEnc1Weight), operand(kEnc2Weight),
                                                  operand(kDec0Weight), operand(kDec1Weight));
        std::copy(operands.begin(), operands.end(), out.begin() + kEnc1Gemm);
      }
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int i = 0; i < kNumWeights; ++i) {
        out.push_back(weights[i].defined() ? weights[i].to(acc)
                                           : at::empty({0}, at::TensorOptions(acc)));
      }
    }
    return out;
  }

  // transpose_gather in the type of src (the GEMMs' operand type).
  static at::Tensor relayout(const at::Tensor& src, int64_t ld, const std::vector<int64_t>& row_of,
                             const std::vector<int64_t>& column_of) {
    if (src.scalar_type() == at::kBFloat16) {
      return cpu::transpose_gather<c10::BFloat16>(src, ld, row_of, column_of);
    }
    return cpu::transpose_gather<acc_t>(src, ld, row_of, column_of);
  }

  // wv_t [D, D] in bfloat16 packed for the bfloat16 GEMMs, one tail tile of columns at a time.
  static at::Tensor packed_by_tile(const at::Tensor& wv_t, int64_t D, int64_t tile) {
    const int64_t tiles = (D + tile - 1) / tile, packed_tile = cpu::packed_bf16_size(D, tile);
    at::Tensor packed = at::empty({tiles * packed_tile}, wv_t.options());
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t o0 = t * tile;
      cpu::pack_bf16(D, std::min(tile, D - o0), wv_t.data_ptr<c10::BFloat16>() + o0, D,
                     packed.data_ptr<c10::BFloat16>() + t * packed_tile);
    }
    return packed;
  }

  // Stage 1: h1 = relu(conv(x) + bias) for every batch element: x [B, N, D] -> h1 [D/4, B,
  // D/2] (contiguous); without bias_relu, the conv's partial sums over these variates alone.
  void head(const at::Tensor& x, bool bias_relu, at::Tensor h1) const {
    const int64_t B = s.batch, N = s.n_vars, D = s.d_model, C1 = D / 4;
    const int64_t threads = at::get_num_threads();
    const int64_t fewest_chunks = (N + kHeadChunk - 2) / (kHeadChunk - 1);
    const int64_t groups = std::min(fewest_chunks, std::max<int64_t>(1, (threads + B - 1) / B));
    // Chunks of at most kHeadChunk rows, a multiple of the groups in number and as near
    // equal in size as even starts allow (the bfloat16 GEMMs take K in pairs), so the
    // groups' shares are even too: N = 862 in 2 groups gives 432 + 430 rows, where chunks
    // of 256 rows gave 512 + 350.
    const int64_t chunks = (fewest_chunks + groups - 1) / groups * groups;
    const auto chunk_start = [&](int64_t c) { return c == chunks ? N : c * N / chunks / 2 * 2; };
    TORCH_INTERNAL_ASSERT(h1.is_contiguous() && h1.numel() == C1 * B * D / 2);
    // The groups' partial sums: h1 itself for one group.
    const at::Tensor partial =
        groups == 1 ? h1.view({1, C1, B, D / 2}) : at::empty({groups, C1, B, D / 2}, h1.options());
    const int64_t ld = B * D / 2;  // of partial[g, :, b]
    const bool parallel = threads_for(B * N * s.kernel * C1 * D / 2) > 1;
    parallel_for_aten(B * groups, parallel ? 1 : B * groups, [&](int64_t begin, int64_t end) {
      HeadScratch scratch = head_scratch();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / groups, g = item % groups;
        acc_t* out = partial.data_ptr<acc_t>() + g * C1 * ld + b * D / 2;
        for (int64_t c = g; c < chunks; c += groups) {
          const int64_t n0 = chunk_start(c), rows = chunk_start(c + 1) - n0;
          TORCH_INTERNAL_ASSERT(0 < rows && rows <= kHeadChunk);  // the scratch's capacity
          head_chunk(x.data_ptr<scalar_t>() + (b * N + n0) * D, n0, rows, scratch, out, ld,
                     /*accumulate=*/c != g);
        }
        if (groups == 1 && bias_relu) {  // b's sum is complete
          cpu::add_bias_relu(out, ld, C1, D / 2, w[kEnc0Bias].data_ptr<acc_t>());
        }
      }
      if (bf16_gemm) cpu::release_bf16_gemm();
    });
    if (groups == 1) return;
    at::sum_out(h1, partial, {0});
    if (!bias_relu) return;
    cpu::add_bias_relu(h1.data_ptr<acc_t>(), B * D / 2, C1, B * D / 2,
                       w[kEnc0Bias].data_ptr<acc_t>());
  }

  HeadScratch head_scratch() const {  // for chunks of up to min(kHeadChunk, N) rows
    const int64_t K = std::min(kHeadChunk, s.n_vars) * s.kernel, L = s.d_model / 2;
    HeadScratch scratch{at::empty({K, L}, at::TensorOptions(acc))};
    if (bf16_gemm) {
      scratch.cols_bf16 = at::empty({K, L}, at::kBFloat16);
      scratch.packed = at::empty({cpu::packed_bf16_size(K, L)}, at::kBFloat16);
    }
    return scratch;
  }

  // out[D/4, D/2] (row stride ldo) (+)= the first conv over rows [n0, n0 + rows) of x[b]
  // (x_rows points at row n0): enc0_weight[:, n0·k : (n0 + rows)·k] · im2col(x rows).
  void head_chunk(const scalar_t* x_rows, int64_t n0, int64_t rows, HeadScratch& scratch,
                  acc_t* out, int64_t ldo, bool accumulate) const {
    const int64_t N = s.n_vars, D = s.d_model, C1 = D / 4, k = s.kernel, K = rows * k;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_gemm && K % 2 == 0) {  // the bfloat16 GEMMs take pairs of K
        c10::BFloat16* cols = scratch.cols_bf16.data_ptr<c10::BFloat16>();
        cpu::im2col_s2(x_rows, D, rows, D, k, cols, D / 2);
        cpu::pack_bf16(K, D / 2, cols, D / 2, scratch.packed.data_ptr<c10::BFloat16>());
        cpu::gemm_bf16(C1, D / 2, K, enc0_weight.data_ptr<c10::BFloat16>() + n0 * k, N * k,
                       scratch.packed.data_ptr<c10::BFloat16>(), out, ldo, accumulate);
        return;
      }
    }
    acc_t* cols = scratch.cols.data_ptr<acc_t>();
    cpu::im2col_s2(x_rows, D, rows, D, k, cols, D / 2);
    cpu::gemm(C1, D / 2, K, w[kEnc0Weight].data_ptr<acc_t>() + n0 * k, N * k, cols, D / 2, out, ldo,
              accumulate);
  }

  // Stage 2: the four N-independent convs from h1 = a.io [D/4, B, D/2] to h5 [D/4, B, D/2]
  // (a new tensor); a's regions serve the convs in between (Activations). With bfloat16
  // GEMMs the convs run channels-last in bfloat16 (channels_last.h), else on im2col/col2im
  // GEMMs in acc_t.
  at::Tensor bottleneck(const Activations<acc_t>& a) const {
    const int64_t B = s.batch, D = s.d_model, k = s.kernel;
    at::Tensor h5 = at::empty({D / 4, B, D / 2}, at::TensorOptions(acc));
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_gemm) {
        const auto packed = [&](int i) { return prepared[i].data_ptr<c10::BFloat16>(); };
        const auto bias = [&](int i) { return w[i].data_ptr<float>(); };
        cpu::to_padded_rows(a.io.template data_ptr<float>(), a.rows[0]);
        cpu::conv_s2_relu(a.rows[0], packed(kEnc1Gemm), bias(kEnc1Bias), k, a.rows[1]);
        cpu::conv_s2_relu(a.rows[1], packed(kEnc2Gemm), bias(kEnc2Bias), k, a.rows[2]);
        cpu::conv_transpose_s2_relu(a.rows[2], packed(kDec0Gemm), bias(kDec0Bias), k, D / 2,
                                    &a.rows[1], nullptr);
        cpu::conv_transpose_s2_relu(a.rows[1], packed(kDec1Gemm), bias(kDec1Bias), k, D / 4,
                                    nullptr, h5.data_ptr<float>());
        return h5;
      }
    }
    const at::Tensor enc2_out = a.io.view({-1}).view({D, B, D / 8});  // h1 is spent by then
    bottleneck_convs<acc_t>(
        {prepared[kEnc1Gemm], prepared[kEnc2Gemm], prepared[kDec0Gemm], prepared[kDec1Gemm]},
        {w[kEnc1Bias], w[kEnc2Bias], w[kDec0Bias], w[kDec1Bias]}, k, a.io, a.mid, enc2_out, a.mid,
        h5, a.cols);
    return h5;
  }

  // Rows of x per value GEMM in pass 2, a multiple of kTailRows or all N: kValueRows on
  // fp32 GEMMs, where 512 rows ran the op 4–7% faster than 64 at T = 128 on an AVX2 CPU
  // (docs/design.md §5.3); kTailRows on the bfloat16 GEMMs, whose operand is packed once.
  int64_t value_rows() const { return std::min(bf16_gemm ? kTailRows : kValueRows, s.n_vars); }

  TailScratch<acc_t> tail_scratch() const {
    const int64_t T = tile, rhs = (s.kernel + 1) / 2 * (s.d_model / 4) * (T / 2);
    const int64_t blocks = (s.n_vars + kTailRows - 1) / kTailRows, values = value_rows();
    const int64_t x_rows = std::is_same_v<scalar_t, acc_t> || bf16_gemm ? 0 : values * s.d_model;
    TailScratch<acc_t> scratch;
    scratch.memory = at::empty({2 * rhs + (s.n_vars + values + 2 * blocks + 2) * T + x_rows},
                               at::TensorOptions(acc));
    acc_t* next = scratch.memory.template data_ptr<acc_t>();
    const auto take = [&](int64_t n) { return std::exchange(next, next + n); };
    for (acc_t*& part : scratch.rhs) part = take(rhs);
    scratch.scores = take(s.n_vars * T);
    scratch.values = take(values * T);
    scratch.shift = take(blocks * T);
    scratch.sum = take(blocks * T);
    for (acc_t*& part : scratch.common) part = take(T);
    scratch.x_rows = take(x_rows);
    scratch.rhs_packed[0] = scratch.rhs_packed[1] = nullptr;
    if (bf16_gemm) {
      const int64_t packed = cpu::packed_bf16_size(rhs / (T / 2), T / 2);
      scratch.packed_memory = at::empty({2 * packed}, at::kBFloat16);
      scratch.rhs_packed[0] = scratch.packed_memory.template data_ptr<c10::BFloat16>();
      scratch.rhs_packed[1] = scratch.rhs_packed[0] + packed;
    }
    return scratch;
  }

  // The right operand of the last transposed conv for outputs o0 + 2c + q, c < half,
  // written to rhs (row stride ld): row block jj holds h5_b[:, o0/2 + c + (q + p -
  // taps[q][jj]) / 2], zero outside [0, D/2). h5_b: [D/4, D/2], rows h5_ld apart. Returns K.
  int64_t parity_rhs(const acc_t* h5_b, int64_t h5_ld, int64_t q, int64_t o0, int64_t half,
                     acc_t* rhs, int64_t ld) const {
    return cpu::gather_parity_window(h5_b, h5_ld, taps[q], q, o0, half, s.padding, s.d_model / 4,
                                     s.d_model / 2, rhs, ld);
  }

  // The right operand of one parity's GEMM in a tail tile: K rows of parity_rhs (acc_t,
  // row stride ldb) and, with bfloat16 GEMMs, the same packed in bfloat16.
  struct ScoresRhs {
    int64_t K;
    const acc_t* rhs;
    int64_t ldb;
    const c10::BFloat16* packed;
  };

  // S_q[rows, half] (row stride ld) = dec2 by parity q, rows [r0, r0 + rows) · rhs, the last
  // transposed conv for outputs of parity q.
  void scores_gemm(int64_t q, int64_t r0, int64_t rows, int64_t half, const ScoresRhs& rhs,
                   acc_t* S_q, int64_t ld) const {
    const int64_t K = rhs.K;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_gemm) {
        cpu::gemm_bf16(rows, half, K, prepared[kDec2Even + q].data_ptr<scalar_t>() + r0 * K, K,
                       rhs.packed, S_q, ld, /*accumulate=*/false);
        return;
      }
    }
    cpu::gemm(rows, half, K, prepared[kDec2Even + q].data_ptr<acc_t>() + r0 * K, K, rhs.rhs,
              rhs.ldb, S_q, ld, /*accumulate=*/false);
  }

  // V[rows, T] = x_b[r0 : r0 + rows] · Wv^T for the tile starting at o0 (no bias).
  // x_b: x[b], [N, D] contiguous.
  void values_gemm(const scalar_t* x_b, int64_t r0, int64_t rows, int64_t o0, int64_t T,
                   const TailScratch<acc_t>& scratch, acc_t* V) const {
    const int64_t D = s.d_model;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_gemm) {
        cpu::gemm_bf16(rows, T, D, x_b + r0 * D, D,
                       prepared[kValueWeightT].data_ptr<scalar_t>() + o0 / tile * packed_tile, V, T,
                       /*accumulate=*/false);
        return;
      }
    }
    cpu::gemm(rows, T, D, x_rows_acc(x_b + r0 * D, rows * D, scratch.x_rows), D,
              prepared[kValueWeightT].data_ptr<acc_t>() + o0, D, V, T, /*accumulate=*/false);
  }

  // The n elements at src as acc_t: in place for fp32/fp64, else converted into `buffer`.
  static const acc_t* x_rows_acc(const scalar_t* src, int64_t n, acc_t* buffer) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      std::transform(src, src + n, buffer, [](scalar_t v) { return static_cast<acc_t>(v); });
      return buffer;
    }
  }

  // Stage 3 for batch element b, output columns [o0, o0 + T): writes y[b, :, o0 : o0 + T].
  // h5_b: [D/4, D/2], the bottleneck's output for b. Scores and values are computed in
  // parity order (even output columns, then odd), as the softmax functions take them:
  // pass 1 turns the scores into softmax numerators and sums them, kTailRows rows at a
  // time so that each block's GEMM output is used while in cache; pass 2 computes the
  // values value_rows() rows at a time and writes y, kTailRows rows at a time. The column
  // statistics are the tile's own (TailMode::kFused, which also writes them to stats unless
  // stats[0] is null: the backward's), or pass 1 only writes them to stats (kStats), or pass 2
  // takes them from stats (kOutput). stats: col_max and col_sum, each [B, D] in natural column
  // order. x_b, y_b: x[b] and y[b], [N, D] contiguous (y_b unused for kStats).
  void tail_tile(const scalar_t* x_b, const acc_t* h5_b, int64_t h5_ld, int64_t b, int64_t o0,
                 const TailScratch<acc_t>& scratch, TailMode mode, acc_t* const stats[2],
                 scalar_t* y_b) const {
    const int64_t N = s.n_vars, D = s.d_model, T = std::min(tile, D - o0), half = T / 2;
    const scalar_t* x_tile = x_b + o0;
    scalar_t* y_tile = mode == TailMode::kStats ? nullptr : y_b + o0;
    acc_t* S = scratch.scores;
    acc_t* V = scratch.values;
    acc_t* shift = scratch.shift;  // [blocks, T] (tile columns)
    acc_t* sum = scratch.sum;
    const int64_t ld = tile;  // of S
    const acc_t* score_bias = w[kDec2Bias].data_ptr<acc_t>();
    const acc_t* tile_value_bias = prepared[kValueBiasOrdered].data_ptr<acc_t>() + o0;
    ScoresRhs rhs[2];
    for (int64_t q = 0; q < 2; ++q) {
      acc_t* rhs_q = scratch.rhs[q];
      const int64_t ldb = tile / 2;
      const int64_t K = parity_rhs(h5_b, h5_ld, q, o0, half, rhs_q, ldb);
      rhs[q] = {K, rhs_q, ldb, nullptr};
      if constexpr (std::is_same_v<acc_t, float>) {
        if (bf16_gemm && K > 0) {
          c10::BFloat16* packed = scratch.rhs_packed[q];
          cpu::pack_bf16(K, half, rhs_q, ldb, packed);
          rhs[q].packed = packed;
        }
      }
    }

    for (int64_t r0 = 0; r0 < N; r0 += kTailRows) {
      const int64_t rows = std::min(kTailRows, N - r0);
      for (int64_t q = 0; q < 2; ++q) {
        acc_t* S_q = S + r0 * ld + q * half;
        if (rhs[q].K == 0) {  // k = 1: odd outputs take the bias alone
          for (int64_t r = 0; r < rows; ++r) std::fill(S_q + r * ld, S_q + r * ld + half, acc_t(0));
          continue;
        }
        scores_gemm(q, r0, rows, half, rhs[q], S_q, ld);
      }
      cpu::softmax_numerators(S + r0 * ld, ld, score_bias + r0, rows, T, x_tile + r0 * D, D,
                              shift + r0 / kTailRows * T, sum + r0 / kTailRows * T);
    }
    const int64_t blocks = (N + kTailRows - 1) / kTailRows;
    acc_t* const* common = scratch.common;
    if (mode != TailMode::kOutput)
      cpu::softmax_merge_blocks(shift, sum, blocks, T, common[0], common[1]);
    const bool writes_stats = mode != TailMode::kOutput && stats[0] != nullptr;
    for (int i = 0; (writes_stats || mode == TailMode::kOutput) && i < 2; ++i) {  // parity order
      acc_t* row = stats[i] + b * D + o0;                                         // <-> natural
      for (int64_t c = 0; c < half; ++c) {
        for (int64_t q = 0; q < 2; ++q) {
          if (writes_stats)
            row[2 * c + q] = common[i][q * half + c];
          else
            common[i][q * half + c] = row[2 * c + q];
        }
      }
    }
    if (mode == TailMode::kStats) return;
    cpu::softmax_scales(shift, blocks, T, common[0], common[1]);
    const int64_t value_block = value_rows();
    for (int64_t v0 = 0; v0 < N; v0 += value_block) {
      const int64_t v_end = std::min(v0 + value_block, N);
      values_gemm(x_b, v0, v_end - v0, o0, T, scratch, V);
      for (int64_t r0 = v0; r0 < v_end; r0 += kTailRows) {
        const int64_t rows = std::min(kTailRows, v_end - r0);
        cpu::softmax_output(S + r0 * ld, ld, V + (r0 - v0) * T, T, tile_value_bias,
                            shift + r0 / kTailRows * T, rows, T, x_tile + r0 * D, y_tile + r0 * D,
                            D);
      }
    }
  }

  // Stage 3 over every (batch element, tile): h5 [D/4, B, D/2] (any strides).
  void tail(const at::Tensor& x, const at::Tensor& h5, TailMode mode, acc_t* const stats[2],
            at::Tensor& y) const {
    const int64_t tiles = (s.d_model + tile - 1) / tile, items = s.batch * tiles;
    // Per row and output column: the scores' K and the value GEMM's D multiply-adds.
    const int64_t taps = (s.kernel + 1) / 2 * (s.d_model / 4) + s.d_model;
    const bool parallel = threads_for(s.batch * s.n_vars * s.d_model * taps) > 1;
    TORCH_INTERNAL_ASSERT(h5.stride(2) == 1 && x.is_contiguous());
    const int64_t ND = s.n_vars * s.d_model;
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    scalar_t* y_data = mode == TailMode::kStats ? nullptr : y.data_ptr<scalar_t>();
    const acc_t* h5_data = h5.data_ptr<acc_t>();
    parallel_for_aten(items, parallel ? 1 : items, [&](int64_t begin, int64_t end) {
      const TailScratch<acc_t> scratch = tail_scratch();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles;
        tail_tile(x_data + b * ND, h5_data + b * h5.stride(1), h5.stride(0), b,
                  (item % tiles) * tile, scratch, mode, stats, y_data ? y_data + b * ND : nullptr);
      }
      if (bf16_gemm) cpu::release_bf16_gemm();
    });
  }

  // The three stages, each a named range in torch.profiler traces.
  void run(const at::Tensor& x, at::Tensor& y) const {
    acc_t* const no_stats[2] = {nullptr, nullptr};
    at::Tensor h5;
    {
      Activations<acc_t> activations(s.batch, s.d_model, s.kernel, acc, bf16_gemm);
      {
        RECORD_FUNCTION("casa::cpu head", std::vector<c10::IValue>());
        head(x, /*bias_relu=*/true, activations.io);
      }
      RECORD_FUNCTION("casa::cpu bottleneck", std::vector<c10::IValue>());
      h5 = bottleneck(activations);
    }
    RECORD_FUNCTION("casa::cpu tail", std::vector<c10::IValue>());
    tail(x, h5, TailMode::kFused, no_stats, y);
  }
};

// The input and accumulation types of a call, for dispatch_dtype's body.
template <typename Scalar, typename Acc>
struct Types {
  using scalar_t = Scalar;
  using acc_t = Acc;
};

// Runs body(Types<scalar_t, acc_t>{}) for the dtype.
template <typename Body>
auto dispatch_dtype(at::ScalarType dtype, const Body& body) {
  switch (dtype) {
    case at::kFloat: return body(Types<float, float>{});
    case at::kDouble: return body(Types<double, double>{});
    case at::kBFloat16: return body(Types<c10::BFloat16, float>{});
    default:
      TORCH_CHECK(false, "x: expected dtype float32, float64 or bfloat16 on the CPU, received ",
                  dtype);
  }
}

Weights weights_of(const at::TensorList& list) {
  TORCH_CHECK(list.size() == kNumWeights, "weights: expected ", kNumWeights,
              " tensors in schema order, received ", list.size());
  Weights w;
  std::copy(list.begin(), list.end(), w.begin());
  return w;
}

// The bfloat16 GEMM tier of a call in `dtype`, for the tier the caller names (kNone but for
// bfloat16 input).
cpu::Bf16Gemm gemm_tier_for(at::ScalarType dtype, const std::string& bf16_gemm) {
  const cpu::Bf16Gemm tier = cpu::bf16_gemm_from_name(bf16_gemm);
  return dtype == at::kBFloat16 ? tier : cpu::Bf16Gemm::kNone;
}

}  // namespace

namespace cpu_ops {

// casa::cpu_prepare_weights: the prepared list (PreparedIndex) for `weights` and tile width.
std::vector<at::Tensor> prepare_weights(at::TensorList weights, int64_t tile,
                                        const std::string& bf16_gemm) {
  const Weights w = weights_of(weights);
  const Sizes s = check_args(
      at::empty({0, w[kEnc0Weight].size(1), w[kValueWeight].size(0)}, w[kValueWeight].options()),
      w);
  TORCH_CHECK(tile >= 2 && tile % 2 == 0 && tile <= s.d_model,
              "tile: expected an even width in [2, d_model], received ", tile);
  const cpu::Bf16Gemm bf16 = gemm_tier_for(w[kValueWeight].scalar_type(), bf16_gemm);
  return dispatch_dtype(w[kValueWeight].scalar_type(), [&](auto types) {
    using T = decltype(types);
    return Plan<typename T::scalar_t, typename T::acc_t>::prepare(s, w, tile, bf16);
  });
}

// casa::cpu_score_attention: the op on weights prepared by prepare_weights (same tile, tier).
at::Tensor score_attention_prepared(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList prepared, int64_t tile,
                                    const std::string& bf16_gemm) {
  const Weights w = weights_of(weights);
  const Sizes s = check_args(x, w);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, received device ", x.device());
  at::Tensor y = at::empty_like(x);
  if (s.batch == 0) return y;
  const cpu::Bf16Gemm bf16 = gemm_tier_for(x.scalar_type(), bf16_gemm);
  dispatch_dtype(x.scalar_type(), [&](auto types) {
    using T = decltype(types);
    Plan<typename T::scalar_t, typename T::acc_t>(s, w, prepared.vec(), tile, bf16).run(x, y);
  });
  return y;
}

// The stages of the op for variate parallelism (casa_kernels/reference/stages.py: head
// partial sums, tail statistics, tail output), on the given variates' slice of the
// per-variate weights; the bottleneck stage stays in ATen (O(B·D^2), independent of N).

// Sizes of a stage call from x [B, N, D] and a per-variate weight [D/4, N, k].
Sizes stage_sizes(const at::Tensor& x, const at::Tensor& per_variate_weight, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(),
              "x: expected a 3-D CPU tensor [batch, n_vars, d_model], received shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(2) % 8 == 0,
              "x: expected n_vars > 0 and d_model a positive multiple of 8, received shape ",
              x.sizes());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(per_variate_weight.dim() == 3 && per_variate_weight.size(0) == D / 4 &&
                  per_variate_weight.size(1) == N && per_variate_weight.size(2) % 2 == 1,
              name, ": expected [d_model/4, n_vars, odd kernel] = [", D / 4, ", ", N,
              ", k], received shape ", per_variate_weight.sizes());
  const int64_t k = per_variate_weight.size(2);
  return {B, N, D, k, k / 2};
}

void check_stage_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                        at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", received ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", received ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, received ", t.device());
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// casa::cpu_head_partial: the first conv without bias, summed over x's variates,
// [B, D/4, D/2] in the accumulation dtype.
at::Tensor head_partial(const at::Tensor& x_in, const at::Tensor& enc0_weight) {
  const Sizes s = stage_sizes(x_in, enc0_weight, "enc0_weight");
  check_stage_tensor(enc0_weight, "enc0_weight", enc0_weight.sizes(), x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  Weights w;
  w[kEnc0Weight] = enc0_weight.contiguous();
  const std::string tier = cpu::bf16_gemm_name(cpu::bf16_gemm());
  const cpu::Bf16Gemm bf16 = gemm_tier_for(x.scalar_type(), tier);
  if (s.batch == 0) {
    return at::empty({0, s.d_model / 4, s.d_model / 2},
                     x.options().dtype(accumulation_type(x.scalar_type())));
  }
  return dispatch_dtype(x.scalar_type(), [&](auto types) {
    using T = decltype(types);
    using P = Plan<typename T::scalar_t, typename T::acc_t>;
    const P plan(s, w, P::prepare(s, w, 2, bf16), 2, bf16);
    const at::Tensor h1 =
        at::empty({s.d_model / 4, s.batch, s.d_model / 2}, at::TensorOptions(plan.acc));
    plan.head(x, /*bias_relu=*/false, h1);
    return h1.permute({1, 0, 2}).contiguous();
  });
}

// casa::cpu_bottleneck: the bottleneck's four convs with their biases and ReLUs, from h1
// [B, D/4, D/2] (the head's output after its bias and ReLU), in h1's dtype (float32 or
// float64; the weights, any floating dtype, cast to it). Returns the four outputs, enc1's
// [B, D/2, D/4], enc2's [B, D, D/8], dec0's [B, D/2, D/4] and h5 [B, D/4, D/2]: the
// activations the fused backward saves (backward.cpp, ActivationIndex), contiguous. The
// GEMM operands are laid out on every call (bottleneck_operands: two transposes, O(D^2)).
std::vector<at::Tensor> bottleneck(const at::Tensor& h1, const at::Tensor& enc1_weight,
                                   const at::Tensor& enc1_bias, const at::Tensor& enc2_weight,
                                   const at::Tensor& enc2_bias, const at::Tensor& dec0_weight,
                                   const at::Tensor& dec0_bias, const at::Tensor& dec1_weight,
                                   const at::Tensor& dec1_bias) {
  TORCH_CHECK(h1.dim() == 3 && h1.device().is_cpu(),
              "h1: expected a 3-D CPU tensor [batch, d_model/4, d_model/2], received shape ",
              h1.sizes(), " on ", h1.device());
  TORCH_CHECK(h1.scalar_type() == at::kFloat || h1.scalar_type() == at::kDouble,
              "h1: expected dtype float32 or float64 (the accumulation dtype), received ",
              h1.scalar_type());
  const int64_t B = h1.size(0), C1 = h1.size(1), D = 4 * C1, C2 = D / 2;
  TORCH_CHECK(C1 > 0 && C1 % 2 == 0 && h1.size(2) == D / 2,
              "h1: expected [batch, d_model/4, d_model/2] with d_model a positive multiple of 8, "
              "received shape ",
              h1.sizes());
  const int64_t k = enc1_weight.dim() == 3 ? enc1_weight.size(2) : 0;
  TORCH_CHECK(k % 2 == 1, "enc1_weight: expected [d_model/2, d_model/4, odd kernel], received ",
              enc1_weight.sizes());
  const auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", received ", t.sizes());
    TORCH_CHECK(t.is_floating_point() && t.device().is_cpu(), name,
                ": expected a floating-point CPU tensor, received ", t.scalar_type(), " on ",
                t.device());
  };
  check(enc1_weight, "enc1_weight", {C2, C1, k});
  check(enc1_bias, "enc1_bias", {C2});
  check(enc2_weight, "enc2_weight", {D, C2, k});
  check(enc2_bias, "enc2_bias", {D});
  check(dec0_weight, "dec0_weight", {D, C2, k});
  check(dec0_bias, "dec0_bias", {C2});
  check(dec1_weight, "dec1_weight", {C2, C1, k});
  check(dec1_bias, "dec1_bias", {C1});
  const at::TensorOptions options = h1.options();
  std::vector<at::Tensor> out = {
      at::empty({C2, B, D / 4}, options), at::empty({D, B, D / 8}, options),
      at::empty({C2, B, D / 4}, options), at::empty({C1, B, D / 2}, options)};
  if (B > 0) {
    const auto acc = [&](const at::Tensor& t) { return t.to(h1.scalar_type()).contiguous(); };
    const auto operands =
        bottleneck_operands(acc(enc1_weight), acc(enc2_weight), acc(dec0_weight), acc(dec1_weight));
    const at::Tensor cols = at::empty({k * B * D * D / 16}, options);
    AT_DISPATCH_FLOATING_TYPES(h1.scalar_type(), "cpu_bottleneck", [&] {
      bottleneck_convs<scalar_t>(operands,
                                 {acc(enc1_bias), acc(enc2_bias), acc(dec0_bias), acc(dec1_bias)},
                                 k, h1.permute({1, 0, 2}).contiguous(), out[0], out[1], out[2],
                                 out[3], cols.data_ptr<scalar_t>());
    });
  }
  // To [B, channels, length], one at a time (a copy where B > 1, none at B = 1), so that
  // the backward takes them as they are rather than copying all four while they are saved.
  for (at::Tensor& t : out) t = t.permute({1, 0, 2}).contiguous();
  return out;
}

// The tail weights as a Weights with the rest undefined, checked against the sizes. The
// value projection is absent for the statistics stage.
Weights tail_weights(const Sizes& s, at::ScalarType dtype, const at::Tensor& dec2_weight,
                     const at::Tensor& dec2_bias, const std::optional<at::Tensor>& value_weight,
                     const std::optional<at::Tensor>& value_bias) {
  const int64_t N = s.n_vars, D = s.d_model;
  check_stage_tensor(dec2_weight, "dec2_weight", {D / 4, N, s.kernel}, dtype);
  check_stage_tensor(dec2_bias, "dec2_bias", {N}, dtype);
  Weights w;
  w[kDec2Weight] = dec2_weight.contiguous();
  w[kDec2Bias] = dec2_bias.contiguous();
  TORCH_CHECK(value_weight.has_value() == value_bias.has_value(),
              "value_weight, value_bias: expected both or neither");
  if (value_weight.has_value()) {
    check_stage_tensor(*value_weight, "value_weight", {D, D}, dtype);
    check_stage_tensor(*value_bias, "value_bias", {D}, dtype);
    w[kValueWeight] = value_weight->contiguous();
    w[kValueBias] = value_bias->contiguous();
  }
  return w;
}

// casa::cpu_prepare_tail: the prepared list for the tail stages (tile, bf16_gemm as in
// cpu_prepare_weights).
std::vector<at::Tensor> prepare_tail(const at::Tensor& dec2_weight, const at::Tensor& dec2_bias,
                                     const std::optional<at::Tensor>& value_weight,
                                     const std::optional<at::Tensor>& value_bias, int64_t tile,
                                     const std::string& bf16_gemm) {
  TORCH_CHECK(dec2_weight.dim() == 3,
              "dec2_weight: expected [d_model/4, n_vars, k], received shape ", dec2_weight.sizes());
  const at::Tensor x_like =
      at::empty({0, dec2_weight.size(1), 4 * dec2_weight.size(0)}, dec2_weight.options());
  const Sizes s = stage_sizes(x_like, dec2_weight, "dec2_weight");
  const at::ScalarType dtype = dec2_weight.scalar_type();
  const Weights w = tail_weights(s, dtype, dec2_weight, dec2_bias, value_weight, value_bias);
  TORCH_CHECK(tile >= 2 && tile % 2 == 0 && tile <= s.d_model,
              "tile: expected an even width in [2, d_model], received ", tile);
  const cpu::Bf16Gemm bf16 = gemm_tier_for(dtype, bf16_gemm);
  return dispatch_dtype(dtype, [&](auto types) {
    using T = decltype(types);
    return Plan<typename T::scalar_t, typename T::acc_t>::prepare(s, w, tile, bf16);
  });
}

// The tail stage in `mode` on h5 [B, D/4, D/2]; stats [2, B, D] (accumulation dtype) are
// written (kStats) or read (kOutput); y is written for kOutput.
void run_tail(const at::Tensor& x_in, const at::Tensor& h5, const at::Tensor& dec2_weight,
              const at::Tensor& dec2_bias, const std::optional<at::Tensor>& value_weight,
              const std::optional<at::Tensor>& value_bias, at::TensorList prepared, int64_t tile,
              const std::string& bf16_gemm, TailMode mode, at::Tensor& stats, at::Tensor& y) {
  const Sizes s = stage_sizes(x_in, dec2_weight, "dec2_weight");
  const at::Tensor x = x_in.contiguous();
  const Weights w =
      tail_weights(s, x.scalar_type(), dec2_weight, dec2_bias, value_weight, value_bias);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  check_stage_tensor(h5, "h5", {s.batch, s.d_model / 4, s.d_model / 2}, h5.scalar_type());
  check_stage_tensor(stats, "stats", {2, s.batch, s.d_model}, acc);
  if (s.batch == 0) return;
  const cpu::Bf16Gemm bf16 = gemm_tier_for(x.scalar_type(), bf16_gemm);
  const at::Tensor h5_acc = h5.to(acc).permute({1, 0, 2});
  dispatch_dtype(x.scalar_type(), [&](auto types) {
    using T = decltype(types);
    using acc_t = typename T::acc_t;
    acc_t* const stat_rows[2] = {stats[0].data_ptr<acc_t>(), stats[1].data_ptr<acc_t>()};
    Plan<typename T::scalar_t, acc_t>(s, w, prepared.vec(), tile, bf16)
        .tail(x, h5_acc, mode, stat_rows, y);
  });
}

// casa::cpu_tail_stats: (col_max, col_sum), each [B, D] in the accumulation dtype. col_max
// is the kernel's shift (1 + the max of x over a block of rows, at least the scores' max).
std::tuple<at::Tensor, at::Tensor> tail_stats(const at::Tensor& x, const at::Tensor& h5,
                                              const at::Tensor& dec2_weight,
                                              const at::Tensor& dec2_bias, at::TensorList prepared,
                                              int64_t tile, const std::string& bf16_gemm) {
  at::Tensor stats =
      at::empty({2, x.size(0), x.size(2)}, x.options().dtype(accumulation_type(x.scalar_type())));
  at::Tensor unused;
  run_tail(x, h5, dec2_weight, dec2_bias, std::nullopt, std::nullopt, prepared, tile, bf16_gemm,
           TailMode::kStats, stats, unused);
  return {stats[0], stats[1]};
}

// casa::cpu_tail_output: y [B, N, D] in x's dtype from the merged statistics.
at::Tensor tail_output(const at::Tensor& x, const at::Tensor& h5, const at::Tensor& dec2_weight,
                       const at::Tensor& dec2_bias, const at::Tensor& value_weight,
                       const at::Tensor& value_bias, at::TensorList prepared, int64_t tile,
                       const std::string& bf16_gemm, const at::Tensor& col_max,
                       const at::Tensor& col_sum) {
  at::Tensor stats =
      at::stack({col_max, col_sum}).to(accumulation_type(x.scalar_type())).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  run_tail(x, h5, dec2_weight, dec2_bias, value_weight, value_bias, prepared, tile, bf16_gemm,
           TailMode::kOutput, stats, y);
  return y;
}

// casa::cpu_tail_fused: the single-device tail (each tile's own statistics) on h5, returning
// y and the statistics it used, (col_max, col_sum) each [B, D] in the accumulation dtype:
// what the backward (backward.cpp) recomputes the softmax from.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tail_fused(
    const at::Tensor& x, const at::Tensor& h5, const at::Tensor& dec2_weight,
    const at::Tensor& dec2_bias, const at::Tensor& value_weight, const at::Tensor& value_bias,
    at::TensorList prepared, int64_t tile, const std::string& bf16_gemm) {
  at::Tensor stats =
      at::empty({2, x.size(0), x.size(2)}, x.options().dtype(accumulation_type(x.scalar_type())));
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  run_tail(x, h5, dec2_weight, dec2_bias, value_weight, value_bias, prepared, tile, bf16_gemm,
           TailMode::kFused, stats, y);
  return {y, stats[0], stats[1]};
}

int64_t tail_tile(int64_t batch, int64_t n_vars, int64_t d_model, bool for_backward) {
  return tail_tile_width(batch, n_vars, d_model, at::get_num_threads(), for_backward);
}

std::string bf16_gemm_now() { return cpu::bf16_gemm_name(cpu::bf16_gemm()); }

std::string vector_isa_now() { return cpu::vector_isa_name(cpu::vector_isa()); }

// casa::fused_score_attention on the CPU: prepares the weights on every call (the Python
// backend calls the two ops above instead, preparing once per weight version).
at::Tensor fused_score_attention_cpu(const at::Tensor& x, const Weights& w) {
  const bool batched = x.dim() == 3;
  const int64_t tile = tail_tile(batched ? x.size(0) : 0, batched ? x.size(1) : 0,
                                 w[kValueWeight].size(0), /*for_backward=*/false);
  const std::string tier = bf16_gemm_now();
  const std::vector<at::Tensor> weights(w.begin(), w.end());
  return score_attention_prepared(x, weights, prepare_weights(weights, tile, tier), tile, tier);
}

}  // namespace cpu_ops

}  // namespace casa
