"""Kernel mutants: small, plausible bugs applied one at a time; the tests must kill each.

``python -m tests.mutation`` applies every mutant in :data:`MUTANTS` to the working tree,
rebuilds the extension when a C++ file changed, runs the tests that guard that code, and
restores the file (also on Ctrl-C or an error), then prints one line per mutant: killed
(some test failed) or SURVIVED. It exits 1 if any mutant survived. ``--only NAME`` runs
the mutants whose name contains NAME; ``--list`` prints them.

Each mutant names the tests (files and a -k filter) that guard its code. CPU mutants
rebuild the extension; CUDA mutants run the host emulation (tests/ops/test_cuda_emulation.py,
which builds its own driver); Triton mutants change Python only (no rebuild) and run
under ``TRITON_INTERPRET=1`` (their ``env``, unless the environment sets it), with
filters narrow enough that the interpreter's slowness stays bounded.

A mutant whose text is not found exactly once is reported ``stale``: the code moved, and
the mutant must be rewritten (a stale mutant counts as a failure, not a kill).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CPU_TESTS = (
    "tests/ops/test_conformance.py",
    "tests/ops/test_cpu.py",
    "tests/ops/test_production.py",
    "tests/ops/test_stages.py",
)
EMULATION_TESTS = ("tests/ops/test_cuda_emulation.py",)
# The Triton kernels run under the interpreter (slow): each Triton mutant names the test
# file and -k filter that guard its code, not the whole suite.
TRITON_TILES = "casa_kernels/ops/triton_kernels/tiles.py"
TRITON_KERNELS = "casa_kernels/ops/triton_kernels/kernels.py"
TRITON_TESTS = ("tests/ops/test_triton.py",)
TRITON_CONFORMANCE_TESTS = ("tests/ops/test_conformance.py",)
TRITON_ENV = (("TRITON_INTERPRET", "1"),)
TRITON_BACKWARD_KERNELS = "casa_kernels/ops/triton_kernels/backward_kernels.py"
TRITON_BACKWARD_TESTS = ("tests/ops/test_triton_backward.py",)


# The tail's per-tile stats store through the merge of the output kernel (csrc/cuda), and
# the same with the merge chained through the stats launch: each stats block folds the
# previous N tile's (already folded) stats into its own and the merge reads the last
# tile's, which is right only if the blocks of tile n - 1 ran before those of tile n.
TAIL_MERGE = """\
  if (threadIdx.x < t.cols) {
    a.stats[(static_cast<int64_t>(t.b) * a.n_tiles + t.n_tile) * a.D + t.o0 + threadIdx.x] = st;
  }
}
"""
TAIL_MERGE_CHAINED = """\
  if (threadIdx.x < t.cols) {
    const int64_t at = (static_cast<int64_t>(t.b) * a.n_tiles + t.n_tile) * a.D + t.o0 + threadIdx.x;
    float2 folded = st;
    if (t.n_tile > 0) {
      const float2 prev = a.stats[at - a.D];
      folded = merge_stats<T>(2, [&](int i) { return i == 0 ? prev : st; });
    }
    a.stats[at] = folded;
  }
}
"""
MERGE_ALL_TILES = """\
  const float2 st = merge_column<T, kCols>(
      a.n_tiles, t.cols, reinterpret_cast<float2*>(ops),
      [&](int i, int o) { return stats_b[static_cast<int64_t>(i) * D + o]; });
"""
MERGE_LAST_TILE = """\
  const float2 st = threadIdx.x < t.cols
                        ? stats_b[static_cast<int64_t>(a.n_tiles - 1) * D + threadIdx.x]
                        : make_float2(0.f, 0.f);
"""


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once
    mutated: str
    tests: tuple[str, ...]
    pytest_args: tuple[str, ...] = ("-k", "not triton")
    env: tuple[tuple[str, str], ...] = ()  # set for the test run (a given value wins)
    more: tuple[tuple[str, str], ...] = ()  # further (original, mutated) pairs, same file

    def replacements(self) -> tuple[tuple[str, str], ...]:
        return ((self.original, self.mutated), *self.more)


CPU_BACKWARD_TESTS = ("tests/ops/test_cpu_backward.py",)
FINITE_TESTS = ("tests/ops/test_finite_weights.py",)

MUTANTS = [
    Mutant(
        "cpu backward: softmax backward without the colsum term",
        "csrc/cpu/vectorised.cpp",
        "const acc_t ds = p * (dp[i] - colsum[j]);",
        "const acc_t ds = p * dp[i];",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: the column sums keep only each row block's last row",
        "csrc/cpu/vectorised.cpp",
        "colsum[i] += p * d;",
        "colsum[i] = p * d;",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: a column tile's dx rows overwrite the other tiles' partial sums",
        "csrc/cpu/vectorised.cpp",
        "for (int64_t c = 0; c < D; ++c) d[c] += f[c];",
        "for (int64_t c = 0; c < D; ++c) d[c] = f[c];",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: a bfloat16 dx's additions overwrite what was there",
        "csrc/cpu/vectorised.cpp",
        "for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(load(out, i) + in[i]);",
        "for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits(in[i]);",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: a tile's block of d dec2 overwrites the shared accumulator's rows",
        "csrc/cpu/backward.cpp",
        "grads.dec2[q].narrow(0, r0, rows).add_(block);",
        "grads.dec2[q].narrow(0, r0, rows).copy_(block);",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: a shared tile's column sums drop the last worker's range of rows",
        "csrc/cpu/backward.cpp",
        "for (int64_t id = 0; id < threads; ++id) {",
        "for (int64_t id = 0; id + 1 < threads; ++id) {",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: a shared tile's workers' accumulators, only the first's added",
        "csrc/cpu/backward.cpp",
        "if (w) w->own.add_to(total);",
        "if (w) {\n        w->own.add_to(total);\n        break;\n      }",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: a conv's weight gradient keeps only the first worker's accumulator",
        "csrc/cpu/backward.cpp",
        "total = total.defined() ? total.add_(own) : own;\n  });\n  return total;",
        "total = total.defined() ? total : own;\n  });\n  return total;",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: the tail's shared value accumulators added to themselves",
        "csrc/cpu/backward.cpp",
        "if (!from.defined() || from.is_same(to)) return;",
        "if (!from.defined()) return;",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: the tail's weights laid out again instead of the forward's taken",
        "csrc/cpu/backward.cpp",
        "    if (prepared[kDec2Even].scalar_type() != acc) {",
        "    if (true) {",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu bottleneck: the training forward's convs read h1 in its [B, channels] order",
        "csrc/cpu/score_attention_cpu.cpp",
        "h1.permute({1, 0, 2}).contiguous(), out[0],",
        "h1.contiguous(), out[0],",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu bottleneck: the first transposed conv adds the first conv's bias",
        "csrc/cpu/score_attention_cpu.cpp",
        "conv_transpose_relu<acc_t>(operands[2], biases[2], enc2_out, k, cols, dec0_out);",
        "conv_transpose_relu<acc_t>(operands[2], biases[0], enc2_out, k, cols, dec0_out);",
        (*CPU_TESTS, *CPU_BACKWARD_TESTS),
    ),
    Mutant(
        "cpu finiteness check: each range keeps only its last element's verdict",
        "csrc/cpu/finite.cpp",
        "found |= static_cast<Bits>((bits[i] & exponent) == exponent);",
        "found = static_cast<Bits>((bits[i] & exponent) == exponent);",
        FINITE_TESTS,
    ),
    Mutant(
        "cpu finiteness check: a thread's range skips the tensor it starts inside",
        "csrc/cpu/finite.cpp",
        "std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;",
        "std::lower_bound(starts.begin(), starts.end(), begin) - starts.begin();",
        FINITE_TESTS,
    ),
    Mutant(
        "cpu backward: a transposed copy of the head's weight for the input gradient",
        "csrc/cpu/backward.cpp",
        "  const at::Tensor weight_2d = weight.reshape({Cout, Cin * k});\n",
        "  const at::Tensor weight_2d = weight.reshape({Cout, Cin * k});\n"
        "  const at::Tensor w_t_copy = d_in != nullptr ? cpu::transposed(weight_2d) : at::Tensor();\n",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu backward: the value weight's gradient transposed",
        "casa_kernels/ops/backends/cpu_backward.py",
        "return tuple(g if need else None for g, need in zip(grads, needs))",
        "return tuple((g.mT if g.dim() == 2 else g) if need else None for g, need in zip(grads, needs))",
        CPU_BACKWARD_TESTS,
    ),
    Mutant(
        "cpu: softmax without its shift",
        "csrc/cpu/vectorised.cpp",
        "exp_vectorisable(-(s[c] + b))) +\n                                          x_even - shift[c]);",
        "exp_vectorisable(-(s[c] + b))) +\n                                          x_even);",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: block merge ignores every block's maximum but the first",
        "csrc/cpu/vectorised.cpp",
        "for (int64_t i = 1; i < blocks; ++i) {\n    for (int64_t c = 0; c < T; ++c) top[c] =",
        "for (int64_t i = 1; i < 1; ++i) {\n    for (int64_t c = 0; c < T; ++c) top[c] =",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: ReLU that turns NaN into 0",
        "csrc/cpu/vectorised.cpp",
        "return v < acc_t(0) ? acc_t(0) : v;",
        "return v > acc_t(0) ? v : acc_t(0);",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: exp clamps -inf to a tiny number",
        "csrc/cpu/vectorised.cpp",
        "return x < -87.0f ? 0.0f :",
        "return x < -87.0f ? 1e-38f :",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: value bias dropped",
        "csrc/cpu/vectorised.cpp",
        "store_pair(yr, c, e[c] * scale[c] * (v[c] + value_bias[c]) + x_even,",
        "store_pair(yr, c, e[c] * scale[c] * v[c] + x_even,",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: head chunk offset by one row",
        "csrc/cpu/score_attention_cpu.cpp",
        "head_chunk(x.data_ptr<scalar_t>() + (b * N + n0) * D, n0, rows, scratch,",
        "head_chunk(x.data_ptr<scalar_t>() + (b * N + n0) * D, n0 > 0 ? n0 - 1 : 0, rows, scratch,",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: every 64-row block of a value GEMM reads the block's first rows",
        "csrc/cpu/score_attention_cpu.cpp",
        "cpu::softmax_output(S + r0 * ld, ld, V + (r0 - v0) * T, T, tile_value_bias,",
        "cpu::softmax_output(S + r0 * ld, ld, V, T, tile_value_bias,",
        CPU_TESTS,
        ("-k", "matches_the_reference and cpu"),
    ),
    Mutant(
        "cpu: tail statistics in the wrong parity",
        "csrc/cpu/score_attention_cpu.cpp",
        "if (writes_stats)\n            row[2 * c + q] = common[i][q * half + c];",
        "if (writes_stats)\n            row[2 * c + q] = common[i][(1 - q) * half + c];",
        ("tests/ops/test_stages.py",),
    ),
    Mutant(
        "cpu: block epilogue without the residual",
        "csrc/cpu/vectorised.cpp",
        "for (int64_t c = 0; c < D; ++c) o[c] += bias[c] + z[c];",
        "for (int64_t c = 0; c < D; ++c) o[c] += bias[c];",
        ("tests/ops/test_cpu.py",),
    ),
    Mutant(
        "cuda: ReLU that turns NaN into 0",
        "csrc/cuda/score_attention_kernels.cu",
        "return v < 0.f ? 0.f : v;",
        "return fmaxf(v, 0.f);",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: split merge ignores one split's maximum",
        "csrc/cuda/score_attention_kernels.cu",
        "for (int u = 0; u < kMergeBatch; ++u) m_all = max_nan(",
        "for (int u = 1; u < kMergeBatch; ++u) m_all = max_nan(",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: tail stats written one column past the tile edge",
        "csrc/cuda/score_attention_kernels.cu",
        "  if (threadIdx.x < t.cols) {\n    a.stats[",
        "  if (threadIdx.x <= t.cols) {\n    a.stats[",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: 16-bit scores' skip term left in natural units",
        "csrc/cuda/score_attention_kernels.cu",
        "return fmaf(x, kLog2e, fast_rcp(fmaf(e, kLn2, kLn2)));",
        "return x + fast_rcp(fmaf(e, kLn2, kLn2));",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: column statistics from the first thread group only",
        "csrc/cuda/score_attention_kernels.cu",
        "mine = merge_stats<T>(kGroups,",
        "mine = merge_stats<T>(1,",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: split merge chained through the stats launch (block order)",
        "csrc/cuda/score_attention_kernels.cu",
        TAIL_MERGE,
        TAIL_MERGE_CHAINED,
        EMULATION_TESTS,
        (),
        more=((MERGE_ALL_TILES, MERGE_LAST_TILE),),
    ),
    Mutant(
        "triton backward: softmax backward without the colsum term",
        TRITON_BACKWARD_KERNELS,
        "ds = prob * (dp - colsum[None, :])",
        "ds = prob * dp",
        TRITON_BACKWARD_TESTS,
        ("-k", "every_gradient and fp32"),
        TRITON_ENV,
    ),
    Mutant(
        "triton backward: the column-sum merge drops the first N tile's partial sum",
        TRITON_BACKWARD_KERNELS,
        "mask = (t_offs < N_TILES)[:, None] & o_mask[None, :]",
        "mask = ((t_offs < N_TILES) & (t_offs > 0))[:, None] & o_mask[None, :]",
        TRITON_BACKWARD_TESTS,
        ("-k", "every_gradient and fp32"),
        TRITON_ENV,
    ),
    Mutant(
        "triton backward: the value weight's gradient transposed",
        "casa_kernels/ops/backends/triton_backward.py",
        'grads["value_weight"] = tail.dv.view(rows, D).t() @ x.view(rows, D)',
        'grads["value_weight"] = x.view(rows, D).t() @ tail.dv.view(rows, D)',
        TRITON_BACKWARD_TESTS,
        ("-k", "every_gradient and fp32"),
        TRITON_ENV,
    ),
    Mutant(
        "cuda: split-K sum without the last split's partial",
        "csrc/cuda/score_attention_kernels.cu",
        "      if (s < a.splits) {\n        const float4 p",
        "      if (s < a.splits - 1) {\n        const float4 p",
        EMULATION_TESTS,
        ("-k", "split_k"),
    ),
    Mutant(
        "cuda: split-K tile written by the first split to arrive",
        "csrc/cuda/score_attention_kernels.cu",
        "if (arrived != a.splits - 1) return false;",
        "if (arrived != 0) return false;",
        EMULATION_TESTS,
        ("-k", "split_k"),
    ),
    Mutant(
        "cuda: split-K arrival counts never cleared",
        "csrc/cuda/score_attention_kernels.cu",
        "i < a.clear_arrivals; i += kConvThreads) a.arrivals[i] = 0;",
        "i < 0; i += kConvThreads) a.arrivals[i] = 0;",
        EMULATION_TESTS,
        ("-k", "split_k"),
    ),
    Mutant(
        "cuda: conv halo tile reads left of the row start",
        "csrc/cuda/score_attention_kernels.cu",
        "const bool ok = c < c_end && pos >= 0 && pos < a.in_ld;",
        "const bool ok = c < c_end && pos < a.in_ld;",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: activation row padding written with values, not zeros",
        "csrc/cuda/score_attention_kernels.cu",
        "T(pos < a.lout ? relu(v + to_float(a.bias[co])) : 0.f);",
        "T(relu(v + to_float(a.bias[co])));",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: pipeline stage refilled without the barrier",
        "csrc/cuda/score_attention_kernels.cu",
        "    landed();\n"
        "    __syncthreads();  // everyone's have; everyone is done with step - 1\n"
        "    const int next = step + kStages - 1;\n"
        "    if (next < steps) load(",
        "    landed();\n    const int next = step + kStages - 1;\n    if (next < steps) load(",
        EMULATION_TESTS,
        ("-k", "data_races"),
    ),
    Mutant(
        "triton: softmax without its max shift",
        TRITON_KERNELS,
        "prob = tl.exp(score - col_max[None, :]) / col_sum[None, :]",
        "prob = tl.exp(score) / (col_sum * tl.exp(col_max))[None, :]",
        TRITON_CONFORMANCE_TESTS,
        ("-k", "far_beyond and triton"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: stats merge ignores the first N tile's maximum",
        TRITON_KERNELS,
        'block_max = tl.where(has_nan, float("nan"), tl.max(m, axis=0))',
        'block_max = tl.where(has_nan, float("nan"), '
        'tl.max(tl.where(t_offs[:, None] >= 1, m, float("-inf")), axis=0))',
        TRITON_CONFORMANCE_TESTS,
        ("-k", "far_beyond and triton"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: padding rows of the last N tile counted in the softmax",
        TRITON_KERNELS,
        '    score = tl.where(n_mask[:, None], score, float("-inf"))\n',
        "",
        TRITON_TESTS,
        ("-k", "tail_split_over_n"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: stride-2 conv reads one column past the row end",
        TRITON_TILES,
        "in_ok = (cols >= 0) & (cols < LIN)",
        "in_ok = (cols >= 0) & (cols <= LIN)",
        TRITON_CONFORMANCE_TESTS,
        ("-k", "matches_the_reference and triton"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: value bias dropped",
        TRITON_KERNELS,
        "out = prob * (value + bv[None, :]) + xv",
        "out = prob * value + xv",
        TRITON_CONFORMANCE_TESTS,
        ("-k", "matches_the_reference and triton"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: head partials summed with the [B, S] stride, not [S, B]",
        TRITON_KERNELS,
        "parts_ptr + (s * B + b) * C1 * HALF + src,",
        "parts_ptr + (b * SPLITS + s) * C1 * HALF + src,",
        (*TRITON_CONFORMANCE_TESTS, *TRITON_TESTS),
        ("-k", "(matches_the_reference and triton) or head_split_over_n"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: GEMM accumulator rounded to the input dtype (fp16/bf16 accumulation)",
        TRITON_TILES,
        'return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")\n'
        "    return tl.dot(a, b, acc, input_precision=PRECISION)",
        'acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")\n'
        "        return _round_to(acc, a.dtype, EMULATE_BF16).to(tl.float32)\n"
        "    return tl.dot(a, b, acc, input_precision=PRECISION).to(a.dtype).to(tl.float32)",
        TRITON_TESTS,
        ("-k", "low_precision"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: ReLU that turns NaN into 0 (tl.maximum)",
        TRITON_TILES,
        "return tl.where(a < 0.0, 0.0, a)",
        "return tl.maximum(a, 0.0)",
        TRITON_TESTS,
        ("-k", "nan_weight_pattern"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: transposed-conv taps outside the input multiplied (0 * w)",
        TRITON_TILES,
        "acc += tl.where(col_ok[None, :], part, 0.0)",
        "acc += part",
        TRITON_TESTS,
        ("-k", "nan_weight_pattern"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: bottleneck transposed-conv rows outside the input multiplied (0 * w)",
        TRITON_TILES,
        "acc += tl.where(row_ok[:, None], part, 0.0)",
        "acc += part",
        TRITON_TESTS,
        ("-k", "nan_weight_pattern"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: an all -inf tile column shifted by -inf",
        TRITON_KERNELS,
        'shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)',
        "shift = tile_max",
        TRITON_TESTS,
        ("-k", "neg_inf"),
        TRITON_ENV,
    ),
    # Each guarded by the test written for it (the -k filter names it).
    Mutant(
        "cpu: sigmoid as exp(z) / (1 + exp(z)) (inf / inf past exp's range)",
        "csrc/cpu/vectorised.cpp",
        "exp_vectorisable(acc_t(1) / (acc_t(1) + exp_vectorisable(-(s[c] + b))) +",
        "exp_vectorisable(exp_vectorisable(s[c] + b) / (acc_t(1) + exp_vectorisable(s[c] + b)) +",
        ("tests/ops/test_conformance.py",),
        ("-k", "sigmoid_input and cpu-cpu"),
        more=(
            (
                "acc_t(1) / (acc_t(1) + exp_vectorisable(-(s[half + c] + b))) + x_odd",
                "exp_vectorisable(s[half + c] + b) / (acc_t(1) + exp_vectorisable(s[half + c] + b))"
                " + x_odd",
            ),
        ),
    ),
    Mutant(
        "cpu: LayerNorm eps outside the square root",
        "csrc/cpu/vectorised.cpp",
        "1.0f / std::sqrt(squares / static_cast<float>(D) + eps);",
        "1.0f / (std::sqrt(squares / static_cast<float>(D)) + eps);",
        ("tests/ops/test_cpu.py",),
        ("-k", "constant_and_near_constant"),
    ),
    Mutant(
        "cpu: LayerNorm eps dropped",
        "csrc/cpu/vectorised.cpp",
        "1.0f / std::sqrt(squares / static_cast<float>(D) + eps);",
        "1.0f / std::sqrt(squares / static_cast<float>(D));",
        ("tests/ops/test_cpu.py",),
        ("-k", "constant_and_near_constant"),
    ),
    Mutant(
        "cpu: ReLU before the conv bias (head and bottleneck)",
        "csrc/cpu/vectorised.cpp",
        "o[c] = relu(o[c] + b);",
        "o[c] = relu(o[c]) + b;",
        ("tests/ops/test_conformance.py",),
        ("-k", "attention_term and cpu-cpu"),
    ),
    Mutant(
        "cpu: a worker's head chunks overwrite each other",
        "csrc/cpu/score_attention_cpu.cpp",
        "/*accumulate=*/c != g);",
        "/*accumulate=*/false);",
        ("tests/test_verify.py",),
        ("-k", "head_split"),
    ),
    Mutant(
        "cpu: head bias and ReLU on every worker group's partial sum too",
        "csrc/cpu/score_attention_cpu.cpp",
        "if (groups == 1 && bias_relu) {  // b's sum is complete",
        "if (bias_relu) {  // b's sum is complete",
        ("tests/test_verify.py",),
        ("-k", "head_split"),
    ),
    Mutant(
        "triton: sigmoid as exp(z) / (1 + exp(z)) (inf / inf past exp's range)",
        TRITON_TILES,
        "return 1.0 / (1.0 + tl.exp(-z))",
        "return tl.exp(z) / (1.0 + tl.exp(z))",
        TRITON_CONFORMANCE_TESTS,
        ("-k", "sigmoid_input and triton"),
        TRITON_ENV,
    ),
    Mutant(
        "triton: ReLU before the head bias",
        TRITON_KERNELS,
        "    h = _relu(acc + bias[None, :])\n",
        "    h = _relu(acc) + bias[None, :]\n",
        TRITON_CONFORMANCE_TESTS,
        ("-k", "attention_term and triton"),
        TRITON_ENV,
    ),
    Mutant(
        "autocast: weight casts cached without their dtype",
        "casa_kernels/ops/score_attention.py",
        'return cached(f"autocast.{dtype}", (w,), lambda: w.to(dtype))',
        'return cached("autocast", (w,), lambda: w.to(dtype))',
        ("tests/ops/test_production.py",),
        ("-k", "in_turn"),
        TRITON_ENV,
    ),
]


def _rebuild() -> None:
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _needs_build(path: str) -> bool:
    return path.startswith("csrc/cpu/") or path == "csrc/score_attention.cpp"


def run_mutant(mutant: Mutant) -> str:
    """'killed', 'SURVIVED' or 'stale' for one mutant; the tree is restored afterwards."""
    file = ROOT / mutant.path
    original = file.read_text()
    if any(original.count(before) != 1 for before, _ in mutant.replacements()):
        return "stale"
    mutated = original
    for before, after in mutant.replacements():
        mutated = mutated.replace(before, after)
    try:
        file.write_text(mutated)
        if _needs_build(mutant.path):
            try:
                _rebuild()
            except RuntimeError:
                return "killed (does not build)"
        env = {**os.environ, **{k: os.environ.get(k, v) for k, v in mutant.env}}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                *mutant.pytest_args,
                *mutant.tests,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        return "killed" if result.returncode != 0 else "SURVIVED"
    finally:
        file.write_text(original)
        if _needs_build(mutant.path):
            _rebuild()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path}; {' '.join(m.tests)})")
        return 0
    failures = 0
    for m in chosen:
        start = time.perf_counter()
        verdict = run_mutant(m)
        failures += not verdict.startswith("killed")
        print(f"{verdict:<24} {time.perf_counter() - start:6.0f} s  {m.name}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutants killed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
