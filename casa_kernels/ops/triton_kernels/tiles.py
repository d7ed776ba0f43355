"""Tile helpers of the Triton kernels (``@triton.jit`` device functions): ReLU, rounding,
the dot with fp32 accumulation, the stride-2 conv and transposed-conv tiles, the
bottleneck's per-program conv stages and the tail's score tile.

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
"""

import triton
import triton.language as tl


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
