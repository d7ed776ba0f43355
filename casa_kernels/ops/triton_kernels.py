"""Triton kernels of ``casa::score_attention`` (docs/design.md §5) and their launcher.

Shapes: ``x: [B, N, D]``, ``C1 = D/4``, ``C2 = D/2``, k odd, ``p = k // 2``.

Stages:

1. **Encoder head** (``_head_kernel``): ``h1 = relu(conv1d(x, enc0, stride 2, pad p))``,
   ``[B, C1, D/2]``, as an implicit GEMM — for every tap j one ``tl.dot`` of
   ``enc0[:, n-chunk, j]`` (``[BLOCK_C, BLOCK_N]``) with the stride-2 gather
   ``x[b, n-chunk, 2t + j - p]`` (``[BLOCK_N, BLOCK_T]``, zero outside ``[0, D)``).
   Tiled over (batch, C1 tile, D/2 tile, N split): when the batch is small the N
   reduction is split over ``splits`` programs writing fp32 partials
   ``[splits, B, C1, D/2]`` that the launcher sums before bias and ReLU;
   with one split, bias and ReLU are fused in the kernel.
2. **Bottleneck**: the four N-independent convs on ``[B, C, L]`` tensors of D²/8
   elements per batch element; yields ``h5 = relu(dec1(...))``, ``[B, C1, D/2]``.
   For ``D <= FUSED_BOTTLENECK_MAX_D`` one Triton program per batch element runs
   all four (``_bottleneck_kernel``: the same tap GEMMs as stages 1 and 3, bias and
   ReLU fused, activations in an fp32 scratch ``[3, B, D²/8]``, a block barrier
   between convs); wider, ``F.conv1d`` / ``F.conv_transpose1d`` in fp32 spread the
   work over the device.
3. **Tail** (``_tail_kernel``): one program per (batch, tile of BLOCK_D output
   columns). The last transposed conv is done by output parity: column
   ``o0 + 2u + r`` of the tile takes the taps j with ``r + p - j`` even from
   ``h5[:, o0/2 + u + (r + p - j)/2]`` — one ``tl.dot`` ``[BLOCK_N, BLOCK_C] x
   [BLOCK_C, BLOCK_D/2]`` per tap and C1 chunk, no structural zeros; the two
   parity halves are interleaved back with ``tl.join``. Then bias, sigmoid and the
   ``x`` skip give the scores. The program walks N twice: pass 1 keeps an online
   column max and sum of ``exp(score)``; pass 2 recomputes the scores, computes
   the value tile ``x Wvᵀ + bv`` by ``tl.dot`` over D chunks and writes
   ``y = softmax * V + x``.

Memory contract: apart from x, y and the weights, temporaries are the fp32
``h1`` partials ``[splits, B, C1, D/2]`` (splits × output tiles ≈ two programs per
SM, so splits > 1 only when B·D² is small) and the bottleneck activations, all
O(B·D²). No ``[B, N, D]`` intermediate is written: the scores of a tile stay in
registers and are recomputed in pass 2.
Accumulation is fp32; fp32 dots use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is True (``"ieee"`` otherwise); fp16/bf16
dots take operands in the input dtype.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with one config each.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..weights import ScoreAttentionWeights

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Rows of N reduced per step by the head; fixed (not tuned) so the split count,
# hence the partial buffer, does not depend on the tuned config.
HEAD_BLOCK_N = 16 if _INTERPRET else 32


def _head_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_C": 16, "BLOCK_T": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_C": bc, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for bc, bt, w, s in [
            (32, 32, 4, 3),
            (32, 64, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 8, 3),
            (128, 64, 8, 3),
            (16, 64, 4, 4),
        ]
    ]


def _tail_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_C": 16, "BLOCK_E": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_C": bc, "BLOCK_E": be}, num_warps=w, num_stages=s)
        for bn, bd, bc, be, w, s in [
            (32, 64, 32, 32, 4, 2),
            (64, 64, 32, 32, 4, 2),
            (32, 128, 32, 32, 8, 2),
            (64, 128, 32, 32, 8, 2),
            (16, 64, 32, 64, 4, 3),
            (128, 32, 32, 32, 8, 2),
        ]
    ]


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32; UPCAST takes the operands to fp32 first (see ``_upcast_dots``)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _conv_s2_tile(
    in_base,  # input [CIN, LIN] of one batch element, rows LIN apart
    w_ptr,  # Conv1d weight [COUT, CIN, k]
    o_offs, o_mask, t_offs, t_mask, cin_start, n_chunks, CIN, LIN, acc,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + stride-2 conv (pad k//2, no bias) over the input rows
    [cin_start, cin_start + n_chunks·BLOCK_K) ∩ [0, CIN): output rows o_offs,
    columns t_offs; acc: [BLOCK_O, BLOCK_T] fp32.

    Implicit GEMM: per tap j, weights [BLOCK_O, BLOCK_K] times the gather
    in[c, 2t + j - p] ([BLOCK_K, BLOCK_T], zero outside [0, LIN)).
    (A chunk count rather than a program-dependent stop keeps the loop bound a
    plain integer, which older interpreters need.)"""
    P: tl.constexpr = KERNEL // 2
    for i in range(0, n_chunks):
        c_offs = cin_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for j in tl.static_range(KERNEL):
            w = tl.load(
                w_ptr + (o_offs[:, None] * CIN + c_offs[None, :]) * KERNEL + j,
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
            acc = _mma(w, xv.to(w.dtype), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _conv_transpose_parity(
    in_base,  # input [CIN, LIN] of one batch element, fp32
    w_ptr,  # ConvTranspose1d weight [CIN, COUT, k]
    o_offs, o_mask, u_offs, CIN, COUT, LIN,
    R: tl.constexpr,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    """Stride-2 transposed conv (pad k//2, output_padding 1, no bias) at output
    columns 2u + R for u in u_offs, rows o_offs: [BLOCK_O, BLOCK_U] fp32.

    Only the taps j with R + p - j even reach these columns, reading input column
    u + (R + p - j) / 2 — no structural zeros."""
    P: tl.constexpr = KERNEL // 2
    acc = tl.zeros((BLOCK_O, BLOCK_U), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_K):
        c_offs = c0 + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for j in tl.static_range(KERNEL):
            if (R + P - j) % 2 == 0:
                cols = u_offs + (R + P - j) // 2
                col_ok = (cols >= 0) & (cols < LIN)
                hv = tl.load(
                    in_base + c_offs[:, None] * LIN + cols[None, :],
                    mask=c_mask[:, None] & col_ok[None, :],
                    other=0.0,
                )
                wv = tl.load(
                    w_ptr + (c_offs[None, :] * COUT + o_offs[:, None]) * KERNEL + j,
                    mask=o_mask[:, None] & c_mask[None, :],
                    other=0.0,
                )
                acc = _mma(wv, hv.to(wv.dtype), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _conv_transpose_tile(
    in_base, w_ptr, o_offs, o_mask, u0, CIN, COUT, LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Transposed conv (no bias) at output columns 2·u0 + [0, BLOCK_L): [BLOCK_O, BLOCK_L] fp32."""
    BLOCK_U: tl.constexpr = BLOCK_L // 2
    u_offs = u0 + tl.arange(0, BLOCK_U)
    even = _conv_transpose_parity(in_base, w_ptr, o_offs, o_mask, u_offs, CIN, COUT, LIN,
                                  0, KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_U)
    odd = _conv_transpose_parity(in_base, w_ptr, o_offs, o_mask, u_offs, CIN, COUT, LIN,
                                 1, KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_U)
    # join -> [BLOCK_O, BLOCK_U, 2]; flattening puts column 2u + r at index 2u + r.
    return tl.reshape(tl.join(even, odd), (BLOCK_O, BLOCK_L))


@triton.autotune(configs=_head_configs(), key=["N", "D", "KERNEL"])
@triton.jit
def _head_kernel(
    x_ptr,  # [B, N, D], contiguous
    w_ptr,  # enc0 weight [C1, N, k], contiguous
    b_ptr,  # enc0 bias [C1]
    out_ptr,  # [splits, B, C1, D/2] fp32 (one split: bias + ReLU applied)
    B, N, D, C1, CHUNKS_PER_SPLIT,
    KERNEL: tl.constexpr,
    FUSE_EPILOGUE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
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
    acc = _conv_s2_tile(x_ptr + b.to(tl.int64) * N * D, w_ptr, c_offs, c_mask, t_offs, t_mask,
                        split * CHUNKS_PER_SPLIT * BLOCK_N, CHUNKS_PER_SPLIT, N, D, acc,
                        KERNEL, PRECISION, UPCAST, BLOCK_N)
    if FUSE_EPILOGUE:
        bias = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        acc = tl.maximum(acc + bias[:, None], 0.0)
    out = out_ptr + ((split * B + b).to(tl.int64) * C1 + c_offs[:, None]) * half + t_offs[None, :]
    tl.store(out, acc, mask=c_mask[:, None] & t_mask[None, :])


@triton.jit
def _conv_s2_relu_stage(
    in_base, w_ptr, b_ptr, out_base, CIN, COUT, LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
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
            acc = _conv_s2_tile(in_base, w_ptr, o_offs, o_mask, t_offs, t_mask, 0, tl.cdiv(CIN, BLOCK_K), CIN, LIN, acc,
                                KERNEL, PRECISION, UPCAST, BLOCK_K)
            acc = tl.maximum(acc + bias[:, None], 0.0)
            tl.store(out_base + o_offs[:, None] * LOUT + t_offs[None, :], acc,
                     mask=o_mask[:, None] & t_mask[None, :])


@triton.jit
def _conv_transpose_relu_stage(
    in_base, w_ptr, b_ptr, out_base, CIN, COUT, LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
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
            acc = _conv_transpose_tile(in_base, w_ptr, o_offs, o_mask, t0 // 2, CIN, COUT, LIN,
                                       KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_L)
            acc = tl.maximum(acc + bias[:, None], 0.0)
            tl.store(out_base + o_offs[:, None] * LOUT + t_offs[None, :], acc,
                     mask=o_mask[:, None] & (t_offs < LOUT)[None, :])


@triton.jit
def _bottleneck_kernel(
    h1_ptr,  # [B, C1, D/2] fp32
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,  # enc1, enc2, dec0, dec1
    s2_ptr,  # scratch [B, C2, D/4] fp32
    s3_ptr,  # scratch [B, D, D/8] fp32
    s4_ptr,  # scratch [B, C2, D/4] fp32
    out_ptr,  # [B, C1, D/2] fp32
    D,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One program per batch element runs the four middle convs in turn; a block-wide
    barrier separates a stage's stores from the next stage's loads."""
    b = tl.program_id(0).to(tl.int64)
    C1 = D // 4
    C2 = D // 2
    size = C1 * (D // 2)  # every activation here holds D²/8 elements per batch element
    _conv_s2_relu_stage(h1_ptr + b * size, w1_ptr, b1_ptr, s2_ptr + b * size, C1, C2, D // 2,
                        KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_L)
    tl.debug_barrier()
    _conv_s2_relu_stage(s2_ptr + b * size, w2_ptr, b2_ptr, s3_ptr + b * size, C2, D, D // 4,
                        KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_L)
    tl.debug_barrier()
    _conv_transpose_relu_stage(s3_ptr + b * size, w3_ptr, b3_ptr, s4_ptr + b * size, D, C2, D // 8,
                               KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_L)
    tl.debug_barrier()
    _conv_transpose_relu_stage(s4_ptr + b * size, w4_ptr, b4_ptr, out_ptr + b * size, C2, C1, D // 4,
                               KERNEL, PRECISION, UPCAST, BLOCK_K, BLOCK_O, BLOCK_L)


@triton.jit
def _scores(
    x_base, h_base, w_ptr, bias_ptr,
    n_offs, n_mask, o0, o_offs, o_mask, C1, N, D,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """score = sigmoid(convT(h5) + bias) + x for rows n_offs, columns o_offs: [BLOCK_N, BLOCK_D] fp32.

    Also returns the x tile (fp32) for the residual.
    """
    z = _conv_transpose_tile(h_base, w_ptr, n_offs, n_mask, o0 // 2, C1, N, D // 2,
                             KERNEL, PRECISION, UPCAST, BLOCK_C, BLOCK_N, BLOCK_D)
    bias = tl.load(bias_ptr + n_offs, mask=n_mask, other=0.0).to(tl.float32)
    z = z + bias[:, None]
    mask = n_mask[:, None] & o_mask[None, :]
    xv = tl.load(x_base + n_offs[:, None].to(tl.int64) * D + o_offs[None, :], mask=mask, other=0.0)
    xv = xv.to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-z)) + xv
    return score, xv


@triton.autotune(configs=_tail_configs(), key=["N", "D", "KERNEL"])
@triton.jit
def _tail_kernel(
    x_ptr,  # [B, N, D], contiguous
    h_ptr,  # h5 [B, C1, D/2] fp32
    w_ptr,  # dec2 weight [C1, N, k]
    bias_ptr,  # dec2 bias [N]
    wv_ptr,  # value weight [D, D]
    bv_ptr,  # value bias [D]
    y_ptr,  # [B, N, D]
    N, D, C1,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0)
    o0 = tl.program_id(1) * BLOCK_D
    o_offs = o0 + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    x_base = x_ptr + b.to(tl.int64) * N * D
    y_base = y_ptr + b.to(tl.int64) * N * D
    h_base = h_ptr + b.to(tl.int64) * C1 * (D // 2)

    # Pass 1: online column max and sum of exp(score) over N.
    col_max = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        score, _ = _scores(x_base, h_base, w_ptr, bias_ptr, n_offs, n_mask, o0, o_offs, o_mask,
                           C1, N, D, KERNEL, PRECISION, UPCAST, BLOCK_C, BLOCK_N, BLOCK_D)
        score = tl.where(n_mask[:, None], score, float("-inf"))
        new_max = tl.maximum(col_max, tl.max(score, axis=0))
        col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(score - new_max[None, :]), axis=0)
        col_max = new_max
    inv_sum = 1.0 / col_sum

    # Pass 2: recompute the scores, value tile, write y = softmax * V + x.
    bv = tl.load(bv_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < N
        score, xv = _scores(x_base, h_base, w_ptr, bias_ptr, n_offs, n_mask, o0, o_offs, o_mask,
                            C1, N, D, KERNEL, PRECISION, UPCAST, BLOCK_C, BLOCK_N, BLOCK_D)
        prob = tl.exp(score - col_max[None, :]) * inv_sum[None, :]
        value = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for e0 in range(0, D, BLOCK_E):
            e_offs = e0 + tl.arange(0, BLOCK_E)
            e_mask = e_offs < D
            xe = tl.load(
                x_base + n_offs[:, None].to(tl.int64) * D + e_offs[None, :],
                mask=n_mask[:, None] & e_mask[None, :],
                other=0.0,
            )
            wt = tl.load(  # Wvᵀ tile: [BLOCK_E, BLOCK_D], element (e, o) = Wv[o, e]
                wv_ptr + o_offs[None, :] * D + e_offs[:, None],
                mask=e_mask[:, None] & o_mask[None, :],
                other=0.0,
            )
            value = _mma(xe, wt, value, PRECISION, UPCAST)
        out = prob * (value + bv[None, :]) + xv
        mask = n_mask[:, None] & o_mask[None, :]
        tl.store(
            y_base + n_offs[:, None].to(tl.int64) * D + o_offs[None, :],
            out.to(y_ptr.dtype.element_ty),
            mask=mask,
        )


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 dot operands as their raw 16-bit patterns
    (numpy has no bfloat16), so under it bf16 dots run on fp32 copies of the operands —
    exact products, fp32 sums. Natively, bf16 dots take bf16 operands."""
    return _INTERPRET and dtype == torch.bfloat16


def _program_target(device: torch.device) -> int:
    """How many programs fill the device: two waves of SMs, or a few under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def head_splits(batch: int, n_vars: int, d_model: int, device: torch.device) -> int:
    """How many programs share the head's N reduction: enough to fill the device."""
    chunks = triton.cdiv(n_vars, HEAD_BLOCK_N)
    c1, half = d_model // 4, d_model // 2
    # Output tiles at the first config's size: an estimate, the tuned config may differ.
    block = _head_configs()[0].kwargs
    tiles = batch * triton.cdiv(c1, block["BLOCK_C"]) * triton.cdiv(half, block["BLOCK_T"])
    return max(1, min(chunks, triton.cdiv(_program_target(device), tiles)))


def encoder_head(x: torch.Tensor, w: ScoreAttentionWeights, splits: int | None = None) -> torch.Tensor:
    """Stage 1: ``relu(conv1d(x, enc0))`` for contiguous ``x: [B, N, D]``; returns fp32 ``[B, D/4, D/2]``."""
    B, N, D = x.shape
    C1, half = D // 4, D // 2
    if splits is None:
        splits = head_splits(B, N, D, x.device)
    splits = max(1, min(splits, triton.cdiv(N, HEAD_BLOCK_N)))
    chunks_per_split = triton.cdiv(triton.cdiv(N, HEAD_BLOCK_N), splits)
    splits = triton.cdiv(N, chunks_per_split * HEAD_BLOCK_N)  # no empty split
    out = torch.empty((splits, B, C1, half), device=x.device, dtype=torch.float32)
    grid = lambda meta: (B * triton.cdiv(C1, meta["BLOCK_C"]), triton.cdiv(half, meta["BLOCK_T"]), splits)  # noqa: E731
    _head_kernel[grid](
        x, w.enc0_weight, w.enc0_bias, out, B, N, D, C1, chunks_per_split,
        KERNEL=w.kernel, FUSE_EPILOGUE=splits == 1, PRECISION=_dot_precision(x.dtype), UPCAST=_upcast_dots(x.dtype),
        BLOCK_N=HEAD_BLOCK_N,
    )
    if splits == 1:
        return out[0]
    return out.sum(0).add_(w.enc0_bias.float()[:, None]).relu_()


# Widest d_model whose bottleneck runs as one fused Triton program per batch element:
# 3·k·D³/16 MACs on one SM stays small next to the launches it saves up to here;
# wider, the library convs spread that work over the whole device. A design
# estimate, not a measurement: the benchmarks on a GPU should settle it.
FUSED_BOTTLENECK_MAX_D = 128
_BOTTLENECK_BLOCKS = {"BLOCK_K": 16, "BLOCK_O": 16, "BLOCK_L": 16} if _INTERPRET else {
    "BLOCK_K": 32, "BLOCK_O": 32, "BLOCK_L": 32}


def bottleneck(h1: torch.Tensor, w: ScoreAttentionWeights, fused: bool | None = None) -> torch.Tensor:
    """Stage 2: the four N-independent convs on fp32 ``h1: [B, D/4, D/2]``; returns fp32 ``[B, D/4, D/2]``.

    ``fused`` picks the single Triton kernel (True) or library convs (False);
    None chooses by ``FUSED_BOTTLENECK_MAX_D``.
    """
    D = w.d_model
    if fused is None:
        fused = D <= FUSED_BOTTLENECK_MAX_D
    if fused:
        return _fused_bottleneck(h1, w)
    return _library_bottleneck(h1, w)


def _fused_bottleneck(h1: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    B, D = h1.shape[0], w.d_model
    scratch = torch.empty((3, B, D * D // 8), device=h1.device, dtype=torch.float32)
    out = torch.empty_like(h1)
    _bottleneck_kernel[(B,)](
        h1, w.enc1_weight, w.enc1_bias, w.enc2_weight, w.enc2_bias,
        w.dec0_weight, w.dec0_bias, w.dec1_weight, w.dec1_bias,
        scratch[0], scratch[1], scratch[2], out, D,
        KERNEL=w.kernel, PRECISION=_dot_precision(w.value_weight.dtype),
        UPCAST=_upcast_dots(w.value_weight.dtype), num_warps=4, **_BOTTLENECK_BLOCKS,
    )
    return out


def _library_bottleneck(h1: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    p = w.kernel // 2
    f = lambda t: t.float()  # noqa: E731
    cudnn = torch.backends.cudnn
    # Library convs follow the same TF32 switch as the Triton dots (cuDNN's own default is on).
    with cudnn.flags(
        enabled=cudnn.enabled,
        benchmark=cudnn.benchmark,
        deterministic=cudnn.deterministic,
        allow_tf32=torch.backends.cuda.matmul.allow_tf32,
    ):
        h = F.relu(F.conv1d(h1, f(w.enc1_weight), f(w.enc1_bias), stride=2, padding=p))
        h = F.relu(F.conv1d(h, f(w.enc2_weight), f(w.enc2_bias), stride=2, padding=p))
        h = F.relu(F.conv_transpose1d(h, f(w.dec0_weight), f(w.dec0_bias), stride=2, padding=p, output_padding=1))
        h = F.relu(F.conv_transpose1d(h, f(w.dec1_weight), f(w.dec1_bias), stride=2, padding=p, output_padding=1))
    return h.contiguous()


def tail(x: torch.Tensor, h5: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """Stage 3: ``y = softmax_N(sigmoid(convT(h5)) + x) * (x Wvᵀ + bv) + x``; ``y: [B, N, D]`` of x's dtype."""
    B, N, D = x.shape
    y = torch.empty_like(x)
    grid = lambda meta: (B, triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _tail_kernel[grid](
        x, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, y, N, D, D // 4,
        KERNEL=w.kernel, PRECISION=_dot_precision(x.dtype), UPCAST=_upcast_dots(x.dtype),
    )
    return y


def triton_score_attention(
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    *,
    splits: int | None = None,
    fused_bottleneck: bool | None = None,
) -> torch.Tensor:
    """``softmax_over_N(score(x)) * (x Wvᵀ + bv) + x`` for ``x: [B, N, D]``; returns ``[B, N, D]``, contiguous.

    ``splits`` overrides how many programs share the head's N reduction and
    ``fused_bottleneck`` the choice of bottleneck (see ``bottleneck``).
    """
    x = x.contiguous()
    w = ScoreAttentionWeights(*(t.contiguous() for t in weights))
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        h1 = encoder_head(x, w, splits)
        h5 = bottleneck(h1, w, fused_bottleneck)
        return tail(x, h5, w)

