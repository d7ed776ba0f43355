"""Triton kernels of ``casa::score_attention`` (docs/design.md §5), as the four stages of
:mod:`casa_kernels.reference.stages`, and the single-device op as their composition.

Shapes: ``x: [B, N, D]``, ``C1 = D/4``, ``C2 = D/2``, k odd, ``p = k // 2``.

Stages and launches (five per call, no host synchronisation, no ``.item()``: a call
is capturable in a CUDA graph):

1. ``head_partial`` — ``_head_kernel``: the first conv without bias, a split-K
   implicit GEMM over N·k. Programs = (B × C1 tiles) × D/2 tiles × splits; split s
   reduces its own range of variates into fp32 partials ``[S, B, C1, D/2]`` (S is
   chosen from the shape alone so the device fills; one launch).
2. ``bottleneck`` — ``_bottleneck_kernel``: sums the S head partials, adds the bias,
   ReLU, then the four N-independent convs with bias and ReLU, one program per batch
   element, each conv a tap-wise ``tl.dot`` in the input dtype with fp32
   accumulation, for every D (activations in an fp32 scratch of ``[4, B, D²/8]``,
   a block barrier between convs; one launch).
3. ``tail_stats`` — ``_tail_stats_kernel``: programs = ⌈N/BLOCK_N⌉ × ⌈D/BLOCK_D⌉ × B;
   each computes its score tile ``s = sigmoid(convT(h5) + b) + x`` (the transposed
   conv by output parity: K = C1 × the taps reaching each parity, no structural zeros)
   and writes the tile's column max and ``Σ exp(s − max)`` to fp32 partials
   ``[B, ⌈N/BLOCK_N⌉, D]``; ``_stats_merge_kernel`` merges them over the N tiles
   (log-sum-exp) into ``[B, D]`` (two launches).
4. ``tail_output`` — ``_tail_output_kernel``: same grid; recomputes the score tile,
   computes the value tile ``x Wvᵀ`` as one ``[BLOCK_N, BLOCK_D]`` ``tl.dot`` over K = D
   and writes ``exp(s − max)/sum · (v + bv) + x`` (one launch).

The bottleneck's parallelism is B programs. At D = 512, k = 3 each runs 3kD³/16 =
75 M MACs on one SM (~20 µs at an H100 SM's ~7.5 TFLOP/s dense bf16 peak, several
times that in practice), whatever B is: it, not the tail, bounds small-batch latency.
Spreading each conv over output tiles needs a device-wide handoff between convs,
i.e. a launch per conv (eight launches per call, over the budget of six); two launches
of two convs each, recomputing the halo columns, is the next step.

Recompute rather than rescale. The output pass needs the score tile again. Recomputing
it costs the last transposed conv a second time, N·D²·k/8 MACs (k = 3: 0.375·N·D², +18%
of the op's N·D²·(k/4 + 1) + 3kD³/16 MACs at the Traffic shape; there, bf16, B = 16: ~+4 µs of
tensor-core time at ~790 TFLOP/s) and keeps every intermediate on chip. Writing the
unnormalised products and rescaling them in place reads and writes y once more:
2·B·N·D·2 bytes = 28 MB there, ~9 µs at ~3 TB/s, plus a launch. The op is
compute-bound (15.1 GFLOP ≈ 19 µs vs 28 MB compulsory traffic ≈ 9 µs), so the
recompute is the cheaper of the two; it also gives the stage contract (stats, then
output from the merged stats) directly.

Weights are prepared once per weight version (:func:`.weight_cache.cached`), in their
own dtype (no per-call casts: the op's weights share x's dtype): every conv weight
packed tap-major ``[k, COUT, CIN]`` (the head's ``enc0`` as ``[k, C1, N]``, the tail's
``dec2`` as ``[k, N, C1]``), so each tap's weight tile loads along contiguous rows, and
the value weight transposed to ``Wvᵀ [D(in), D(out)]``.

Non-finite values follow the reference exactly: ReLU is ``where(a < 0, 0, a)`` (NaN
stays NaN), the column max propagates NaN, a tile whose column is all −inf contributes
a zero sum (its shift is taken as 0, so no ``−inf − (−inf)``), the merge is the two-pass
``merge_stats`` of the reference (a NaN/+inf or all −inf column gives NaN, as
``torch.softmax`` does), and a transposed-conv tap whose input column lies outside
``[0, L)`` adds nothing (not ``0·w``, which a NaN weight would turn into NaN; the
library computes transposed convs as col2im and never forms that product). Zero
padding of the stride-2 convs *is* multiplied, as in the library's im2col.

Accumulation is fp32; fp32 dots use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is True (``"ieee"`` otherwise); fp16/bf16
dots take operands in the input dtype, fp32 activations rounded to it (nearest even).

Autotuning: each kernel tunes over a few configs per (N, D, k) key. With the
environment variable ``CASA_TRITON_SINGLE_CONFIG=1`` (read at import) every kernel
uses its first config only — for tests and ``verify`` on a GPU, where each new key
would otherwise cost seconds of tuning. Under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors with one small config each.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..weights import ScoreAttentionWeights
from .weight_cache import cached

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SINGLE_CONFIG = os.environ.get("CASA_TRITON_SINGLE_CONFIG") == "1"

# Rows of N reduced per step by the head; fixed (not tuned) so the split count,
# hence the partial buffer, does not depend on the tuned config.
HEAD_BLOCK_N = 16 if _INTERPRET else 32
# Largest tail tile in N (fixed, not tuned: both tail kernels and the statistics
# partials must agree on it); smaller N get the next power of two >= 16. 64 rows:
# a 128 x 128 output tile spills ~0.9-1.3 KB per thread on sm_90 (ptxas, 8 warps),
# 64 x 128 ~0.1 KB (see tests/ops/triton_compile_check.py).
TAIL_BLOCK_N = 16 if _INTERPRET else 64
_MERGE_BLOCK_D = 32 if _INTERPRET else 128
_BOTTLENECK_BLOCKS = (
    {"BLOCK_K": 16, "BLOCK_O": 16, "BLOCK_L": 16}
    if _INTERPRET
    else {"BLOCK_K": 32, "BLOCK_O": 64, "BLOCK_L": 64}
)
# 64 x 64 tiles, 8 warps, no software pipelining: no spills on sm_90 bf16 (with 2-3 stages
# ptxas spills 0.3-0.5 KB per thread; the bottleneck's short loops gain little from it).
_BOTTLENECK_WARPS, _BOTTLENECK_STAGES = (1, 1) if _INTERPRET else (8, 1)


def _tuned(configs: list) -> list:
    """``configs``, or only the first when ``CASA_TRITON_SINGLE_CONFIG=1``."""
    return configs[:1] if SINGLE_CONFIG else configs


def _head_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_C": 16, "BLOCK_T": 16}, num_warps=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_C": bc, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bc, bt, w, s in [
                (64, 64, 8, 3),
                (32, 64, 4, 3),
                (64, 128, 8, 3),
                (128, 64, 8, 3),
                (128, 128, 8, 3),
            ]
        ]
    )


def _stats_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 32, "BLOCK_C": 16}, num_warps=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_D": bd, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bd, bc, w, s in [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)]
        ]
    )


def _output_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 32, "BLOCK_C": 16, "BLOCK_E": 16}, num_warps=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_D": bd, "BLOCK_C": bc, "BLOCK_E": be}, num_warps=w, num_stages=s)
            for bd, bc, be, w, s in [(128, 16, 32, 8, 3), (128, 32, 64, 8, 3), (64, 32, 64, 8, 2)]
        ]
    )


@triton.jit
def _relu(a):
    """max(a, 0) that keeps NaN (``tl.maximum`` would return 0 for a NaN)."""
    return tl.where(a < 0.0, 0.0, a)


@triton.jit
def _round_to(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` to nearest even. EMULATE_BF16 does the bf16
    rounding by integer ops: the interpreter's own fp32→bf16 cast truncates, the
    GPU's (``cvt.rn``) rounds; this keeps the interpreter faithful to the GPU."""
    if EMULATE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(v != v, 0x7FC00000, rounded)  # keep NaN a NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + a @ b in fp32, b rounded to a's dtype first. Under EMULATE_BF16 the
    operands go to fp32 (the interpreter multiplies bf16 as raw 16-bit patterns)."""
    b = _round_to(b.to(tl.float32), a.dtype, EMULATE_BF16)
    if EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _conv_s2_tile(
    in_base,  # input [CIN, LIN] of one batch element, rows LIN apart
    w_ptr,  # Conv1d weight packed tap-major, [k, COUT, CIN]
    o_offs,
    o_mask,
    t_offs,
    t_mask,
    cin_start,
    n_chunks,
    CIN,
    COUT,
    LIN,
    acc,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + stride-2 conv (pad k//2, no bias) over the input rows
    [cin_start, cin_start + n_chunks·BLOCK_K) ∩ [0, CIN): output rows o_offs,
    columns t_offs; acc: [BLOCK_O, BLOCK_T] fp32.

    Implicit GEMM: per tap j, weights [BLOCK_O, BLOCK_K] times the gather
    in[c, 2t + j - p] ([BLOCK_K, BLOCK_T], zero outside [0, LIN) — padding is
    multiplied, as in the library's im2col)."""
    P: tl.constexpr = KERNEL // 2
    for i in range(0, n_chunks):
        c_offs = cin_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for j in tl.static_range(KERNEL):
            w = tl.load(
                w_ptr + (j * COUT + o_offs[:, None]) * CIN + c_offs[None, :],
                mask=o_mask[:, None] & c_mask[None, :],
                other=0.0,
            )
            cols = 2 * t_offs + (j - P)
            col_ok = t_mask & (cols >= 0) & (cols < LIN)
            xv = tl.load(
                in_base + c_offs[:, None].to(tl.int64) * LIN + cols[None, :],
                mask=c_mask[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = _mma(w, xv, acc, PRECISION, EMULATE_BF16)
    return acc


@triton.jit
def _conv_transpose_parity(
    in_base,  # input [CIN, LIN] of one batch element, fp32
    w_ptr,  # ConvTranspose1d weight packed tap-major, [k, COUT, CIN]
    o_offs,
    o_mask,
    u0,
    CIN,
    COUT,
    LIN,
    R: tl.constexpr,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    """Stride-2 transposed conv (pad k//2, output_padding 1, no bias) at output
    columns 2u + R for u in [u0, u0 + BLOCK_U), rows o_offs: [BLOCK_O, BLOCK_U] fp32.

    Only the taps j with R + p - j even reach these columns, reading input column
    u + (R + p - j) / 2 — no structural zeros. A tap's input column outside
    [0, LIN) contributes nothing (col2im semantics): in a tile that reaches the
    edge the tap's product is formed apart and selected per column."""
    P: tl.constexpr = KERNEL // 2
    u_offs = u0 + tl.arange(0, BLOCK_U)
    acc = tl.zeros((BLOCK_O, BLOCK_U), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_K):
        c_offs = c0 + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for j in tl.static_range(KERNEL):
            if (R + P - j) % 2 == 0:
                shift = (R + P - j) // 2
                cols = u_offs + shift
                col_ok = (cols >= 0) & (cols < LIN)
                hv = tl.load(
                    in_base + c_offs[:, None] * LIN + cols[None, :],
                    mask=c_mask[:, None] & col_ok[None, :],
                    other=0.0,
                )
                wv = tl.load(
                    w_ptr + (j * COUT + o_offs[:, None]) * CIN + c_offs[None, :],
                    mask=o_mask[:, None] & c_mask[None, :],
                    other=0.0,
                )
                if (u0 + shift >= 0) & (u0 + BLOCK_U + shift <= LIN):
                    acc = _mma(wv, hv, acc, PRECISION, EMULATE_BF16)
                else:
                    part = _mma(
                        wv,
                        hv,
                        tl.zeros((BLOCK_O, BLOCK_U), dtype=tl.float32),
                        PRECISION,
                        EMULATE_BF16,
                    )
                    acc += tl.where(col_ok[None, :], part, 0.0)
    return acc


@triton.jit
def _conv_transpose_tile(
    in_base,
    w_ptr,
    o_offs,
    o_mask,
    u0,
    CIN,
    COUT,
    LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Transposed conv (no bias) at output columns 2·u0 + [0, BLOCK_L): [BLOCK_O, BLOCK_L] fp32."""
    BLOCK_U: tl.constexpr = BLOCK_L // 2
    even = _conv_transpose_parity(
        in_base,
        w_ptr,
        o_offs,
        o_mask,
        u0,
        CIN,
        COUT,
        LIN,
        0,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_K,
        BLOCK_O,
        BLOCK_U,
    )
    odd = _conv_transpose_parity(
        in_base,
        w_ptr,
        o_offs,
        o_mask,
        u0,
        CIN,
        COUT,
        LIN,
        1,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_K,
        BLOCK_O,
        BLOCK_U,
    )
    # join -> [BLOCK_O, BLOCK_U, 2]; flattening puts column 2u + r at index 2u + r.
    return tl.reshape(tl.join(even, odd), (BLOCK_O, BLOCK_L))


@triton.autotune(configs=_head_configs(), key=["N", "D", "KERNEL"])
@triton.jit
def _head_kernel(
    x_ptr,  # [B, N, D], contiguous
    w_ptr,  # enc0 weight packed [k, C1, N]
    out_ptr,  # [splits, B, C1, D/2] fp32 partial sums, no bias
    B,
    N,
    D,
    C1,
    CHUNKS_PER_SPLIT,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_bc = tl.program_id(0)  # batch × C1 tiles
    pid_t = tl.program_id(1)  # D/2 tiles
    split = tl.program_id(2)
    n_ctiles = tl.cdiv(C1, BLOCK_C)
    b = pid_bc // n_ctiles
    c_offs = (pid_bc % n_ctiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    half = D // 2
    c_mask = c_offs < C1
    t_mask = t_offs < half
    # Split `split` reduces rows [split·CHUNKS_PER_SPLIT·BLOCK_N, ...) ∩ [0, N).
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    acc = _conv_s2_tile(
        x_ptr + b.to(tl.int64) * N * D,
        w_ptr,
        c_offs,
        c_mask,
        t_offs,
        t_mask,
        split * CHUNKS_PER_SPLIT * BLOCK_N,
        CHUNKS_PER_SPLIT,
        N,
        C1,
        D,
        acc,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_N,
    )
    out = out_ptr + ((split * B + b).to(tl.int64) * C1 + c_offs[:, None]) * half + t_offs[None, :]
    tl.store(out, acc, mask=c_mask[:, None] & t_mask[None, :])


@triton.jit
def _sum_splits_relu(parts_ptr, b_ptr, out_base, SPLITS, B, C1, HALF, b, BLOCK: tl.constexpr):
    """out [C1, HALF] = relu(Σ_s parts[s, b] + bias) for batch element b, fp32."""
    size = C1 * HALF
    for i0 in range(0, size, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < size
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(parts_ptr + (s * B + b) * size + offs, mask=mask, other=0.0)
        bias = tl.load(b_ptr + offs // HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_base + offs, _relu(acc + bias), mask=mask)


@triton.jit
def _conv_s2_relu_stage(
    in_base,
    w_ptr,
    b_ptr,
    out_base,
    CIN,
    COUT,
    LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out [COUT, LIN/2] = relu(conv_s2(in [CIN, LIN]) + bias), fp32, by one program."""
    LOUT = LIN // 2
    for o0 in range(0, COUT, BLOCK_O):
        o_offs = o0 + tl.arange(0, BLOCK_O)
        o_mask = o_offs < COUT
        bias = tl.load(b_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
        for t0 in range(0, LOUT, BLOCK_L):
            t_offs = t0 + tl.arange(0, BLOCK_L)
            t_mask = t_offs < LOUT
            acc = tl.zeros((BLOCK_O, BLOCK_L), dtype=tl.float32)
            acc = _conv_s2_tile(
                in_base,
                w_ptr,
                o_offs,
                o_mask,
                t_offs,
                t_mask,
                0,
                tl.cdiv(CIN, BLOCK_K),
                CIN,
                COUT,
                LIN,
                acc,
                KERNEL,
                PRECISION,
                EMULATE_BF16,
                BLOCK_K,
            )
            tl.store(
                out_base + o_offs[:, None] * LOUT + t_offs[None, :],
                _relu(acc + bias[:, None]),
                mask=o_mask[:, None] & t_mask[None, :],
            )


@triton.jit
def _conv_transpose_relu_stage(
    in_base,
    w_ptr,
    b_ptr,
    out_base,
    CIN,
    COUT,
    LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out [COUT, 2·LIN] = relu(conv_transpose_s2(in [CIN, LIN]) + bias), fp32, by one program."""
    LOUT = 2 * LIN
    for o0 in range(0, COUT, BLOCK_O):
        o_offs = o0 + tl.arange(0, BLOCK_O)
        o_mask = o_offs < COUT
        bias = tl.load(b_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
        for t0 in range(0, LOUT, BLOCK_L):
            t_offs = t0 + tl.arange(0, BLOCK_L)
            acc = _conv_transpose_tile(
                in_base,
                w_ptr,
                o_offs,
                o_mask,
                t0 // 2,
                CIN,
                COUT,
                LIN,
                KERNEL,
                PRECISION,
                EMULATE_BF16,
                BLOCK_K,
                BLOCK_O,
                BLOCK_L,
            )
            tl.store(
                out_base + o_offs[:, None] * LOUT + t_offs[None, :],
                _relu(acc + bias[:, None]),
                mask=o_mask[:, None] & (t_offs < LOUT)[None, :],
            )


@triton.jit
def _bottleneck_kernel(
    parts_ptr,  # head partial sums [SPLITS, B, C1, D/2] fp32 (no bias)
    b0_ptr,  # enc0 bias [C1]
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    w4_ptr,
    b4_ptr,  # enc1, enc2, dec0, dec1, weights packed [k, COUT, CIN]
    scratch_ptr,  # [4, B, D²/8] fp32
    out_ptr,  # h5 [B, C1, D/2] fp32
    SPLITS,
    B,
    D,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per batch element: h1 = relu(Σ partials + b0), then the four middle
    convs in turn; a block-wide barrier separates a stage's stores from the next's loads."""
    b = tl.program_id(0).to(tl.int64)
    C1 = D // 4
    C2 = D // 2
    size = C1 * (D // 2)  # every activation here holds D²/8 elements per batch element
    s1 = scratch_ptr + b * size
    s2 = scratch_ptr + (B + b) * size
    s3 = scratch_ptr + (2 * B + b) * size
    s4 = scratch_ptr + (3 * B + b) * size
    _sum_splits_relu(parts_ptr, b0_ptr, s1, SPLITS, B, C1, D // 2, b, BLOCK_O * BLOCK_L)
    tl.debug_barrier()
    _conv_s2_relu_stage(
        s1,
        w1_ptr,
        b1_ptr,
        s2,
        C1,
        C2,
        D // 2,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_K,
        BLOCK_O,
        BLOCK_L,
    )
    tl.debug_barrier()
    _conv_s2_relu_stage(
        s2,
        w2_ptr,
        b2_ptr,
        s3,
        C2,
        D,
        D // 4,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_K,
        BLOCK_O,
        BLOCK_L,
    )
    tl.debug_barrier()
    _conv_transpose_relu_stage(
        s3,
        w3_ptr,
        b3_ptr,
        s4,
        D,
        C2,
        D // 8,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_K,
        BLOCK_O,
        BLOCK_L,
    )
    tl.debug_barrier()
    _conv_transpose_relu_stage(
        s4,
        w4_ptr,
        b4_ptr,
        out_ptr + b * size,
        C2,
        C1,
        D // 4,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_K,
        BLOCK_O,
        BLOCK_L,
    )


@triton.jit
def _score_tile(
    x_base,
    h_base,
    w_ptr,
    bias_ptr,
    n_offs,
    n_mask,
    o0,
    o_offs,
    o_mask,
    C1,
    N,
    D,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """score = sigmoid(convT(h5) + bias) + x for rows n_offs, columns o_offs:
    [BLOCK_N, BLOCK_D] fp32, and the x tile (fp32) for the residual."""
    z = _conv_transpose_tile(
        h_base,
        w_ptr,
        n_offs,
        n_mask,
        o0 // 2,
        C1,
        N,
        D // 2,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_C,
        BLOCK_N,
        BLOCK_D,
    )
    bias = tl.load(bias_ptr + n_offs, mask=n_mask, other=0.0).to(tl.float32)
    z = z + bias[:, None]
    mask = n_mask[:, None] & o_mask[None, :]
    xv = tl.load(x_base + n_offs[:, None].to(tl.int64) * D + o_offs[None, :], mask=mask, other=0.0)
    xv = xv.to(tl.float32)
    return 1.0 / (1.0 + tl.exp(-z)) + xv, xv


@triton.autotune(configs=_stats_configs(), key=["N", "D", "KERNEL"])
@triton.jit
def _tail_stats_kernel(
    x_ptr,  # [B, N, D], contiguous
    h_ptr,  # h5 [B, C1, D/2] fp32
    w_ptr,  # dec2 weight packed [k, N, C1]
    bias_ptr,  # dec2 bias [N]
    max_ptr,  # [B, N_TILES, D] fp32: per N tile, column max of the scores
    sum_ptr,  # [B, N_TILES, D] fp32: per N tile, Σ exp(score − tile max)
    N,
    D,
    C1,
    N_TILES,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    o0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    n_offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    o_offs = o0 + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    score, _ = _score_tile(
        x_ptr + b * N * D,
        h_ptr + b * C1 * (D // 2),
        w_ptr,
        bias_ptr,
        n_offs,
        n_mask,
        o0,
        o_offs,
        o_mask,
        C1,
        N,
        D,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_C,
        BLOCK_N,
        BLOCK_D,
    )
    score = tl.where(n_mask[:, None], score, float("-inf"))
    has_nan = tl.max((score != score).to(tl.int32), axis=0) > 0
    tile_max = tl.where(has_nan, float("nan"), tl.max(score, axis=0))
    shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)  # an all −inf column sums to 0
    tile_sum = tl.sum(tl.exp(score - shift[None, :]), axis=0)
    offs = (b * N_TILES + tile) * D + o_offs
    tl.store(max_ptr + offs, tile_max, mask=o_mask)
    tl.store(sum_ptr + offs, tile_sum, mask=o_mask)


@triton.jit
def _stats_merge_kernel(
    part_max_ptr,
    part_sum_ptr,  # [B, N_TILES, D] fp32
    max_ptr,
    sum_ptr,  # [B, D] fp32
    D,
    N_TILES,
    BLOCK_D: tl.constexpr,
):
    """The reference's ``merge_stats`` over the N tiles, per column: max (NaN wins),
    then Σ_t sum_t · exp(max_t − max)."""
    o_offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    b = tl.program_id(1).to(tl.int64)
    base = b * N_TILES * D + o_offs
    col_max = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
    for t in range(0, N_TILES):
        m = tl.load(part_max_ptr + base + t * D, mask=o_mask, other=0.0)
        col_max = tl.maximum(col_max, m, propagate_nan=tl.PropagateNan.ALL)
    col_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t in range(0, N_TILES):
        m = tl.load(part_max_ptr + base + t * D, mask=o_mask, other=0.0)
        s = tl.load(part_sum_ptr + base + t * D, mask=o_mask, other=0.0)
        col_sum += s * tl.exp(m - col_max)
    tl.store(max_ptr + b * D + o_offs, col_max, mask=o_mask)
    tl.store(sum_ptr + b * D + o_offs, col_sum, mask=o_mask)


@triton.autotune(configs=_output_configs(), key=["N", "D", "KERNEL"])
@triton.jit
def _tail_output_kernel(
    x_ptr,  # [B, N, D], contiguous
    h_ptr,  # h5 [B, C1, D/2] fp32
    w_ptr,  # dec2 weight packed [k, N, C1]
    bias_ptr,  # dec2 bias [N]
    wvt_ptr,  # value weight transposed, Wvᵀ [D(in), D(out)]
    bv_ptr,  # value bias [D]
    max_ptr,
    sum_ptr,  # merged column statistics [B, D] fp32
    y_ptr,  # [B, N, D]
    N,
    D,
    C1,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    tile = tl.program_id(0)
    o0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    n_offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    o_offs = o0 + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    x_base = x_ptr + b * N * D
    # Value tile x Wvᵀ: [BLOCK_N, BLOCK_D], K = D in BLOCK_E chunks.
    value = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for e0 in range(0, D, BLOCK_E):
        e_offs = e0 + tl.arange(0, BLOCK_E)
        e_mask = e_offs < D
        xe = tl.load(
            x_base + n_offs[:, None].to(tl.int64) * D + e_offs[None, :],
            mask=n_mask[:, None] & e_mask[None, :],
            other=0.0,
        )
        wt = tl.load(
            wvt_ptr + e_offs[:, None] * D + o_offs[None, :],
            mask=e_mask[:, None] & o_mask[None, :],
            other=0.0,
        )
        value = _mma(xe, wt, value, PRECISION, EMULATE_BF16)
    bv = tl.load(bv_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
    col_max = tl.load(max_ptr + b * D + o_offs, mask=o_mask, other=0.0)
    col_sum = tl.load(sum_ptr + b * D + o_offs, mask=o_mask, other=1.0)
    score, xv = _score_tile(
        x_base,
        h_ptr + b * C1 * (D // 2),
        w_ptr,
        bias_ptr,
        n_offs,
        n_mask,
        o0,
        o_offs,
        o_mask,
        C1,
        N,
        D,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_C,
        BLOCK_N,
        BLOCK_D,
    )
    prob = tl.exp(score - col_max[None, :]) / col_sum[None, :]
    out = prob * (value + bv[None, :]) + xv
    tl.store(
        y_ptr + b * N * D + n_offs[:, None].to(tl.int64) * D + o_offs[None, :],
        _round_to(out, y_ptr.dtype.element_ty, EMULATE_BF16),
        mask=n_mask[:, None] & o_mask[None, :],
    )


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Every kernel launch of this module goes through here (tests count them)."""
    kernel[grid](*args, **kwargs)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _emulate_bf16(dtype: torch.dtype) -> bool:
    """Under the interpreter bf16 dots run on fp32 copies of the operands (numpy has no
    bfloat16: it would multiply the raw 16-bit patterns) and fp32→bf16 rounding is done
    by integer ops (its own cast truncates). Natively neither is needed."""
    return _INTERPRET and dtype == torch.bfloat16


def _common(dtype: torch.dtype, kernel: int) -> dict:
    return {
        "KERNEL": kernel,
        "PRECISION": _dot_precision(dtype),
        "EMULATE_BF16": _emulate_bf16(dtype),
    }


def program_target(sm_count: int) -> int:
    """How many programs fill a device of ``sm_count`` SMs: two waves."""
    return 2 * sm_count


def _program_target(device: torch.device) -> int:
    """How many programs fill the device, or a few under the interpreter."""
    if device.type == "cuda":
        return program_target(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4


def head_split_count(batch: int, n_vars: int, d_model: int, programs: int) -> int:
    """How many programs share the head's N reduction so that about ``programs`` programs
    run: the launch plan, a pure function of the sizes (the static cost model,
    bench/cost_model, calls it with an H100's SM count)."""
    chunks = triton.cdiv(n_vars, HEAD_BLOCK_N)
    c1, half = d_model // 4, d_model // 2
    # Output tiles at the first config's size: an estimate, the tuned config may differ.
    block = _head_configs()[0].kwargs
    tiles = batch * triton.cdiv(c1, block["BLOCK_C"]) * triton.cdiv(half, block["BLOCK_T"])
    return max(1, min(chunks, triton.cdiv(programs, tiles)))


def head_splits(batch: int, n_vars: int, d_model: int, device: torch.device) -> int:
    """How many programs share the head's N reduction: enough to fill the device."""
    return head_split_count(batch, n_vars, d_model, _program_target(device))


def tail_block_n(n_vars: int) -> int:
    """The tail's tile height: ``TAIL_BLOCK_N``, or the next power of two >= 16 below it."""
    return min(TAIL_BLOCK_N, max(16, triton.next_power_of_2(n_vars)))


def _packed(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A conv weight ``[COUT, CIN, k]`` (``transposed``: ``[CIN, COUT, k]``) packed tap-major,
    ``[k, COUT, CIN]`` contiguous, so a weight tile loads along CIN; prepared once per
    weight version."""
    order = (2, 1, 0) if transposed else (2, 0, 1)
    tag = "triton.packed_transposed" if transposed else "triton.packed"
    return cached(tag, (weight,), lambda: weight.permute(order).contiguous())


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _head_partials(x: torch.Tensor, enc0_packed: torch.Tensor, splits: int | None) -> torch.Tensor:
    """fp32 ``[S, B, C1, D/2]``: partial sums of the first conv over S ranges of variates
    (``enc0_packed``: ``[k, C1, N]``)."""
    B, N, D = x.shape
    C1, half = D // 4, D // 2
    if splits is None:
        splits = head_splits(B, N, D, x.device)
    chunks = triton.cdiv(N, HEAD_BLOCK_N)
    chunks_per_split = triton.cdiv(chunks, max(1, min(splits, chunks)))
    splits = triton.cdiv(chunks, chunks_per_split)  # no empty split
    out = torch.empty((splits, B, C1, half), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (B * triton.cdiv(C1, meta["BLOCK_C"]), triton.cdiv(half, meta["BLOCK_T"]), splits)

    _launch(
        _head_kernel,
        grid,
        x,
        enc0_packed,
        out,
        B,
        N,
        D,
        C1,
        chunks_per_split,
        BLOCK_N=HEAD_BLOCK_N,
        **_common(x.dtype, enc0_packed.shape[0]),
    )
    return out


def head_partial(
    x: torch.Tensor, enc0_weight: torch.Tensor, *, splits: int | None = None
) -> torch.Tensor:
    """Stage 1: ``conv1d(x, enc0_weight, stride 2, pad k//2)`` without bias, summed over
    the variates of ``x: [B, N, D]`` (``enc0_weight: [C1, N, k]``); fp32 ``[B, C1, D/2]``."""
    B, _, D = x.shape
    if B == 0:
        return x.new_empty((0, D // 4, D // 2), dtype=torch.float32)
    x = x.contiguous()
    with _device_guard(x):
        parts = _head_partials(x, _packed(enc0_weight, False), splits)
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def _bottleneck_from_parts(parts: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """h5 fp32 ``[B, C1, D/2]`` from head partials ``[S, B, C1, D/2]`` (one launch)."""
    S, B = parts.shape[:2]
    D = w.d_model
    scratch = torch.empty((4, B, D * D // 8), device=parts.device, dtype=torch.float32)
    out = torch.empty(parts.shape[1:], device=parts.device, dtype=torch.float32)
    packed = (
        _packed(w.enc1_weight, False),
        w.enc1_bias,
        _packed(w.enc2_weight, False),
        w.enc2_bias,
        _packed(w.dec0_weight, True),
        w.dec0_bias,
        _packed(w.dec1_weight, True),
        w.dec1_bias,
    )
    _launch(
        _bottleneck_kernel,
        (B,),
        parts,
        w.enc0_bias,
        *packed,
        scratch,
        out,
        S,
        B,
        D,
        num_warps=_BOTTLENECK_WARPS,
        num_stages=_BOTTLENECK_STAGES,
        **_BOTTLENECK_BLOCKS,
        **_common(w.value_weight.dtype, w.kernel),
    )
    return out


def bottleneck(h1_partial: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """Stage 2: ``h5 = relu(dec1(relu(dec0(relu(enc2(relu(enc1(relu(h1 + b0)))))))))``
    for fp32 ``h1_partial: [B, C1, D/2]`` (the summed head); fp32 ``[B, C1, D/2]``."""
    if h1_partial.shape[0] == 0:
        return h1_partial.new_empty(h1_partial.shape, dtype=torch.float32)
    with _device_guard(h1_partial):
        return _bottleneck_from_parts(h1_partial.float().contiguous()[None], w)


def _tail_partial_stats(x, h5, dec2_packed, dec2_bias, block_n):
    """Per-N-tile column (max, Σexp), each fp32 ``[B, ⌈N/block_n⌉, D]`` (one launch;
    ``dec2_packed``: ``[k, N, C1]``)."""
    B, N, D = x.shape
    n_tiles = triton.cdiv(N, block_n)
    part_max = torch.empty((B, n_tiles, D), device=x.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    grid = lambda meta: (n_tiles, triton.cdiv(D, meta["BLOCK_D"]), B)  # noqa: E731
    _launch(
        _tail_stats_kernel,
        grid,
        x,
        h5,
        dec2_packed,
        dec2_bias,
        part_max,
        part_sum,
        N,
        D,
        D // 4,
        n_tiles,
        BLOCK_N=block_n,
        **_common(x.dtype, dec2_packed.shape[0]),
    )
    return part_max, part_sum


def _merge_tile_stats(
    part_max: torch.Tensor, part_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, D]`` per-tile statistics merged over T into ``[B, D]`` each (one launch)."""
    B, T, D = part_max.shape
    col_max = torch.empty((B, D), device=part_max.device, dtype=torch.float32)
    col_sum = torch.empty_like(col_max)
    _launch(
        _stats_merge_kernel,
        (triton.cdiv(D, _MERGE_BLOCK_D), B),
        part_max,
        part_sum,
        col_max,
        col_sum,
        D,
        T,
        BLOCK_D=_MERGE_BLOCK_D,
    )
    return col_max, col_sum


def tail_stats(
    x: torch.Tensor,
    h5: torch.Tensor,
    dec2_weight: torch.Tensor,
    dec2_bias: torch.Tensor,
    *,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: per column, ``max_N s`` and ``Σ_N exp(s − max)`` over the variates of
    ``x: [B, N, D]`` (``s = sigmoid(convT(h5, dec2) + b) + x``); each fp32 ``[B, D]``.
    ``block_n`` (a power of two >= 16) overrides the tile height."""
    if x.shape[0] == 0:
        empty = x.new_empty((0, x.shape[2]), dtype=torch.float32)
        return empty, empty.clone()
    x, h5 = x.contiguous(), h5.float().contiguous()
    with _device_guard(x):
        parts = _tail_partial_stats(
            x,
            h5,
            _packed(dec2_weight, True),
            dec2_bias.contiguous(),
            block_n or tail_block_n(x.shape[1]),
        )
        return _merge_tile_stats(*parts)


def _value_weight_t(value_weight: torch.Tensor) -> torch.Tensor:
    """``Wvᵀ`` contiguous, prepared once per version of ``value_weight``."""
    return cached("triton.value_weight_t", (value_weight,), lambda: value_weight.t().contiguous())


def tail_output(
    x: torch.Tensor,
    h5: torch.Tensor,
    dec2_weight: torch.Tensor,
    dec2_bias: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor,
    col_max: torch.Tensor,
    col_sum: torch.Tensor,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """Stage 4: ``exp(s − col_max)/col_sum · (x Wvᵀ + bv) + x`` for ``x: [B, N, D]`` with
    merged statistics ``[B, D]``; returns ``[B, N, D]`` of x's dtype, contiguous."""
    x = x.contiguous()
    B, N, D = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B == 0:
        return y
    block_n = block_n or tail_block_n(N)
    grid = lambda meta: (triton.cdiv(N, block_n), triton.cdiv(D, meta["BLOCK_D"]), B)  # noqa: E731
    with _device_guard(x):
        _launch(
            _tail_output_kernel,
            grid,
            x,
            h5.float().contiguous(),
            _packed(dec2_weight, True),
            dec2_bias.contiguous(),
            _value_weight_t(value_weight),
            value_bias.contiguous(),
            col_max.float().contiguous(),
            col_sum.float().contiguous(),
            y,
            N,
            D,
            D // 4,
            BLOCK_N=block_n,
            **_common(x.dtype, dec2_weight.shape[2]),
        )
    return y


def triton_score_attention(
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    *,
    splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``softmax_over_N(score(x)) * (x Wvᵀ + bv) + x`` for ``x: [B, N, D]``; returns
    ``[B, N, D]``, contiguous. The composition of the four stages in five launches;
    B = 0 returns an empty result without a launch.

    ``splits`` overrides how many programs share the head's N reduction and
    ``block_n`` the tail's tile height (a power of two >= 16).
    """
    if x.shape[0] == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    x = x.contiguous()
    w = weights
    with _device_guard(x):
        h5 = _bottleneck_from_parts(_head_partials(x, _packed(w.enc0_weight, False), splits), w)
        block_n = block_n or tail_block_n(x.shape[1])
        parts = _tail_partial_stats(
            x, h5, _packed(w.dec2_weight, True), w.dec2_bias.contiguous(), block_n
        )
        col_max, col_sum = _merge_tile_stats(*parts)
        return tail_output(
            x,
            h5,
            w.dec2_weight,
            w.dec2_bias,
            w.value_weight,
            w.value_bias,
            col_max,
            col_sum,
            block_n=block_n,
        )
