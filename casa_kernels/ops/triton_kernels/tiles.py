"""Tile helpers of the Triton kernels (``@triton.jit`` device functions): ReLU, rounding,
the dot with fp32 accumulation, the stride-2 conv and transposed-conv tiles (over
channels-first inputs for the head and the tail, over channels-last slabs for the
bottleneck's layers) and the tail's score tile.

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
def _tap_weight(w_ptr, j, o_offs, o_mask, c_offs, c_mask, COUT, CIN):
    """Tap j's weight block ``[BLOCK_O, BLOCK_K]`` of a weight packed ``[k, COUT, CIN]``."""
    return tl.load(
        w_ptr + (j * COUT + o_offs[:, None]) * CIN + c_offs[None, :],
        mask=o_mask[:, None] & c_mask[None, :],
        other=0.0,
    )


@triton.jit
def _conv_s2_tile(
    in_base,  # input [CIN, LIN] of one batch element, rows LIN apart
    w_ptr,  # Conv1d weight packed tap-major, [k, COUT, CIN]
    o_offs,
    o_mask,
    t0,
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
    BLOCK_T: tl.constexpr,
):
    """acc + stride-2 conv (pad k//2, no bias) over the input rows
    [cin_start, cin_start + n_chunks·BLOCK_K) ∩ [0, CIN): output rows o_offs, columns
    t0 + [0, BLOCK_T); acc: [BLOCK_O, BLOCK_T] fp32.

    Implicit GEMM without gathers: tap j reads in[c, 2t + j - p] = column parity r of
    the slab in[c, 2(t0 + s) + [0, 2·BLOCK_T)) with j - p = 2s + r. Per chunk of rows and
    shift s, one contiguous slab load (zero outside [0, LIN): padding is multiplied, as
    in the library's im2col) split into its even and odd columns, the operands of the
    taps p + 2s and p + 2s + 1."""
    P: tl.constexpr = KERNEL // 2
    S_LO: tl.constexpr = -((P + 1) // 2)
    SHIFTS: tl.constexpr = (KERNEL - 1 - P) // 2 - S_LO + 1
    for i in range(0, n_chunks):
        c_offs = cin_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for sh in tl.static_range(SHIFTS):
            cols = 2 * (t0 + S_LO + sh) + tl.arange(0, 2 * BLOCK_T)
            in_ok = (cols >= 0) & (cols < LIN)
            slab = tl.load(
                in_base + c_offs[:, None].to(tl.int64) * LIN + cols[None, :],
                mask=c_mask[:, None] & in_ok[None, :],
                other=0.0,
            )
            even, odd = tl.split(tl.reshape(slab, (BLOCK_K, BLOCK_T, 2)))
            j = P + 2 * (S_LO + sh)  # the even columns' tap; j + 1 the odd's
            if j >= 0:
                w = _tap_weight(w_ptr, j, o_offs, o_mask, c_offs, c_mask, COUT, CIN)
                acc = _mma(w, even, acc, PRECISION, EMULATE_BF16)
            if j + 1 < KERNEL:
                w = _tap_weight(w_ptr, j + 1, o_offs, o_mask, c_offs, c_mask, COUT, CIN)
                acc = _mma(w, odd, acc, PRECISION, EMULATE_BF16)
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
    [0, LIN) contributes nothing (col2im semantics): a shifted tap's product is formed
    apart and selected per column (no branch in the loop, so its loads pipeline)."""
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
                if shift == 0:  # columns past LIN only reach outputs past 2·LIN
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
def _conv_s2_rows(
    in_base,  # input [LIN, CIN] of one batch element, channels-last (rows CIN apart)
    w_ptr,  # Conv1d weight packed [k, CIN, COUT]
    t_offs,
    o_offs,
    o_mask,
    CIN,
    COUT,
    LIN,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Stride-2 conv (pad k//2, no bias) at output positions t_offs, channels o_offs:
    ``[BLOCK_L, BLOCK_O]`` fp32, ``Σ_j in[2t + j - p, :] · W[j]``.

    Per BLOCK_K chunk of input channels and tap j, the activation operand is the slab of
    rows ``2t + j - p`` (each row BLOCK_K contiguous channels; the tap is a row offset),
    zero outside ``[0, LIN)`` (padding is multiplied, as in the library's im2col), and
    the weight operand the contiguous ``[BLOCK_K, BLOCK_O]`` block of tap j."""
    P: tl.constexpr = KERNEL // 2
    acc = tl.zeros((BLOCK_L, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_K):
        c_offs = c0 + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for j in tl.static_range(KERNEL):
            rows = 2 * t_offs + (j - P)
            row_ok = (rows >= 0) & (rows < LIN)
            xv = tl.load(
                in_base + rows[:, None] * CIN + c_offs[None, :],
                mask=row_ok[:, None] & c_mask[None, :],
                other=0.0,
            )
            wv = tl.load(
                w_ptr + (j * CIN + c_offs[:, None]) * COUT + o_offs[None, :],
                mask=c_mask[:, None] & o_mask[None, :],
                other=0.0,
            )
            acc = _mma(xv, wv, acc, PRECISION, EMULATE_BF16)
    return acc


@triton.jit
def _conv_transpose_rows(
    in_base,  # input [LIN, CIN] of one batch element, channels-last
    w_ptr,  # ConvTranspose1d weight packed [k, CIN, COUT]
    u_offs,
    o_offs,
    o_mask,
    CIN,
    COUT,
    LIN,
    R: tl.constexpr,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Stride-2 transposed conv (pad k//2, output_padding 1, no bias) at output positions
    ``2u + R`` for u in u_offs, channels o_offs: ``[BLOCK_U, BLOCK_O]`` fp32.

    Only the taps j with ``R + p - j`` even reach these positions, each reading the slab
    of input rows ``u + (R + p - j) / 2`` (the tap a row offset). An input row outside
    ``[0, LIN)`` contributes nothing (col2im semantics, not ``0 · w``): a shifted tap's
    product is formed apart and selected per row."""
    P: tl.constexpr = KERNEL // 2
    acc = tl.zeros((BLOCK_U, BLOCK_O), dtype=tl.float32)
    for c0 in range(0, CIN, BLOCK_K):
        c_offs = c0 + tl.arange(0, BLOCK_K)
        c_mask = c_offs < CIN
        for j in tl.static_range(KERNEL):
            if (R + P - j) % 2 == 0:
                rows = u_offs + (R + P - j) // 2
                row_ok = (rows >= 0) & (rows < LIN)
                xv = tl.load(
                    in_base + rows[:, None] * CIN + c_offs[None, :],
                    mask=row_ok[:, None] & c_mask[None, :],
                    other=0.0,
                )
                wv = tl.load(
                    w_ptr + (j * CIN + c_offs[:, None]) * COUT + o_offs[None, :],
                    mask=c_mask[:, None] & o_mask[None, :],
                    other=0.0,
                )
                if (R + P - j) // 2 == 0:  # rows past LIN only reach outputs past 2·LIN
                    acc = _mma(xv, wv, acc, PRECISION, EMULATE_BF16)
                else:
                    part = _mma(
                        xv,
                        wv,
                        tl.zeros((BLOCK_U, BLOCK_O), dtype=tl.float32),
                        PRECISION,
                        EMULATE_BF16,
                    )
                    acc += tl.where(row_ok[:, None], part, 0.0)
    return acc


@triton.jit
def _decoder_sigmoid_tile(
    h_base,
    w_ptr,
    bias_ptr,
    n_offs,
    n_mask,
    o0,
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
    """σ(t), t = convT(h5) + bias, the score network's output, for rows n_offs, columns
    o0 + [0, BLOCK_D): [BLOCK_N, BLOCK_D] fp32."""
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
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _rows_tile(base, n_offs, n_mask, o_offs, o_mask, D):
    """The fp32 tile ``[n_offs, o_offs]`` of a ``[N, D]`` row-major matrix at ``base``
    (zero outside the masks)."""
    ptrs = base + n_offs[:, None].to(tl.int64) * D + o_offs[None, :]
    return tl.load(ptrs, mask=n_mask[:, None] & o_mask[None, :], other=0.0).to(tl.float32)


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
    sigma = _decoder_sigmoid_tile(
        h_base,
        w_ptr,
        bias_ptr,
        n_offs,
        n_mask,
        o0,
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
    xv = _rows_tile(x_base, n_offs, n_mask, o_offs, o_mask, D)
    return sigma + xv, xv


@triton.jit
def _value_tile(
    x_base,
    wvt_ptr,
    n_offs,
    n_mask,
    o_offs,
    o_mask,
    D,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """The value projection without bias, ``x Wvᵀ`` for rows n_offs, columns o_offs:
    [BLOCK_N, BLOCK_D] fp32, K = D in BLOCK_E chunks (``wvt_ptr``: Wvᵀ, [D(in), D(out)])."""
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
    return value
