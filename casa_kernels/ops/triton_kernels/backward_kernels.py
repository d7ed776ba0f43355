"""The tail's backward kernels of the Triton backend (docs/design.md §5.9), built from
:mod:`.tiles` on the forward's split-N tiles; launched by :mod:`.backward`.

For one batch element, with P the softmax over N (per column) of the scores
``s = σ(t) + x`` (t the last transposed conv's output), ``v = x Wvᵀ + bv``,
``y = P ⊙ v + x`` and ``g = dL/dy``:
``dv = P ⊙ g``, ``dP = v ⊙ g``, ``ds = P ⊙ (dP − colsum_N(P ⊙ dP))``, ``dt = ds ⊙ σ(1 − σ)``.

Programs = ⌈N/BLOCK_N⌉ × ⌈D/BLOCK_D⌉ × B, each a ``[BLOCK_N, BLOCK_D]`` tile. Every tile
recomputes its σ tile from h5 (the transposed conv by output parity, as the forward's
tail) and P from the forward's merged column statistics (max, Σexp), with no [B, N, D]
state saved:

1. ``_tail_colsum_kernel``: P, the value tile (K = D), dP, and the tile's column sums of
   ``P ⊙ dP`` into fp32 partials ``[B, ⌈N/BLOCK_N⌉, D]``;
2. ``_colsum_merge_kernel``: the partials summed over the N tiles in tile order (no
   atomics: the same sums every run) into ``colsum [B, D]``;
3. ``_tail_grads_kernel``: P, dP (where ds is due) and the tile's ``g + ds`` (dx's share
   before the value and head terms), dv and dt, each stored only where wanted.

Rows past N are masked out of P (P = 0 there), so they add nothing to the column sums.
"""

import triton
import triton.language as tl

from .kernels import _INTERPRET, _tuned
from .tiles import _decoder_sigmoid_tile, _round_to, _rows_tile, _value_tile


def _backward_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 32, "BLOCK_C": 16, "BLOCK_E": 16}, num_warps=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_D": bd, "BLOCK_C": bc, "BLOCK_E": be}, num_warps=w, num_stages=s)
            for bd, bc, be, w, s in [(64, 32, 32, 8, 3), (64, 32, 64, 8, 3), (32, 32, 64, 4, 3)]
        ]
    )


@triton.jit
def _softmax_backward_tile(
    x_ptr,
    g_ptr,
    h_ptr,
    w_ptr,
    bias_ptr,
    wvt_ptr,
    bv_ptr,
    max_ptr,
    sum_ptr,
    b,
    n_offs,
    n_mask,
    o0,
    o_offs,
    o_mask,
    N,
    D,
    C1,
    WANT_DP: tl.constexpr,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``(P, dP, g, σ)`` of one tile, each [BLOCK_N, BLOCK_D] fp32: P from the merged
    statistics (zero on rows past N); dP = (x Wvᵀ + bv) ⊙ g where WANT_DP, else zeros."""
    x_base = x_ptr + b * N * D
    sigma = _decoder_sigmoid_tile(
        h_ptr + b * C1 * (D // 2),
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
    g = _rows_tile(g_ptr + b * N * D, n_offs, n_mask, o_offs, o_mask, D)
    col_max = tl.load(max_ptr + b * D + o_offs, mask=o_mask, other=0.0)
    col_sum = tl.load(sum_ptr + b * D + o_offs, mask=o_mask, other=1.0)
    prob = tl.exp(sigma + xv - col_max[None, :]) / col_sum[None, :]
    prob = tl.where(n_mask[:, None], prob, 0.0)
    dp = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if WANT_DP:
        value = _value_tile(
            x_base,
            wvt_ptr,
            n_offs,
            n_mask,
            o_offs,
            o_mask,
            D,
            PRECISION,
            EMULATE_BF16,
            BLOCK_N,
            BLOCK_D,
            BLOCK_E,
        )
        bv = tl.load(bv_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
        dp = (value + bv[None, :]) * g
    return prob, dp, g, sigma


@triton.autotune(configs=_backward_configs(), key=["B", "N", "D", "KERNEL"])
@triton.jit
def _tail_colsum_kernel(
    x_ptr,  # [B, N, D], contiguous
    g_ptr,  # dL/dy [B, N, D], contiguous, x's dtype
    h_ptr,  # h5 [B, C1, D/2] fp32
    w_ptr,  # dec2 weight packed [k, N, C1]
    bias_ptr,  # dec2 bias [N]
    wvt_ptr,  # Wvᵀ [D(in), D(out)]
    bv_ptr,  # value bias [D]
    max_ptr,
    sum_ptr,  # the forward's merged column statistics [B, D] fp32
    part_ptr,  # [B, N_TILES, D] fp32: per N tile, Σ_rows P ⊙ dP
    B,
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
    BLOCK_E: tl.constexpr,
):
    tile = tl.program_id(0)
    o0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    n_offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    o_offs = o0 + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    prob, dp, _, _ = _softmax_backward_tile(
        x_ptr,
        g_ptr,
        h_ptr,
        w_ptr,
        bias_ptr,
        wvt_ptr,
        bv_ptr,
        max_ptr,
        sum_ptr,
        b,
        n_offs,
        n_mask,
        o0,
        o_offs,
        o_mask,
        N,
        D,
        C1,
        True,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_N,
        BLOCK_D,
        BLOCK_C,
        BLOCK_E,
    )
    tile_colsum = tl.sum(prob * dp, axis=0)
    tl.store(part_ptr + (b * N_TILES + tile) * D + o_offs, tile_colsum, mask=o_mask)


@triton.jit
def _colsum_merge_kernel(
    part_ptr,  # [B, N_TILES, D] fp32
    colsum_ptr,  # [B, D] fp32
    D,
    N_TILES,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``colsum[b, o] = Σ_t part[b, t, o]``, BLOCK_T tiles' partials loaded at once, in
    tile order. Programs: D tiles × B."""
    o_offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    b = tl.program_id(1).to(tl.int64)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, N_TILES, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        mask = (t_offs < N_TILES)[:, None] & o_mask[None, :]
        offs = (b * N_TILES + t_offs[:, None]) * D + o_offs[None, :]
        total += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(colsum_ptr + b * D + o_offs, total, mask=o_mask)


@triton.jit
def _store_rows_tile(base, n_offs, n_mask, o_offs, o_mask, D, v, EMULATE_BF16: tl.constexpr):
    """Stores the fp32 tile ``v`` at ``[n_offs, o_offs]`` of a ``[N, D]`` row-major matrix
    at ``base``, rounded to its dtype."""
    tl.store(
        base + n_offs[:, None].to(tl.int64) * D + o_offs[None, :],
        _round_to(v, base.dtype.element_ty, EMULATE_BF16),
        mask=n_mask[:, None] & o_mask[None, :],
    )


@triton.autotune(configs=_backward_configs(), key=["B", "N", "D", "KERNEL"])
@triton.jit
def _tail_grads_kernel(
    x_ptr,  # [B, N, D], contiguous
    g_ptr,  # dL/dy [B, N, D], contiguous, x's dtype
    h_ptr,  # h5 [B, C1, D/2] fp32
    w_ptr,  # dec2 weight packed [k, N, C1]
    bias_ptr,  # dec2 bias [N]
    wvt_ptr,  # Wvᵀ [D(in), D(out)]
    bv_ptr,  # value bias [D]
    max_ptr,
    sum_ptr,  # the forward's merged column statistics [B, D] fp32
    colsum_ptr,  # Σ_N P ⊙ dP [B, D] fp32 (read where WANT_DS)
    dx_ptr,  # out, where WANT_DX: g + ds [B, N, D]
    dv_ptr,  # out, where WANT_DV: P ⊙ g [B, N, D]
    dt_ptr,  # out, where WANT_DT: ds ⊙ σ(1 − σ) [B, N, D]
    B,
    N,
    D,
    C1,
    WANT_DX: tl.constexpr,
    WANT_DV: tl.constexpr,
    WANT_DT: tl.constexpr,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    WANT_DS: tl.constexpr = WANT_DX or WANT_DT
    tile = tl.program_id(0)
    o0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    n_offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    o_offs = o0 + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    prob, dp, g, sigma = _softmax_backward_tile(
        x_ptr,
        g_ptr,
        h_ptr,
        w_ptr,
        bias_ptr,
        wvt_ptr,
        bv_ptr,
        max_ptr,
        sum_ptr,
        b,
        n_offs,
        n_mask,
        o0,
        o_offs,
        o_mask,
        N,
        D,
        C1,
        WANT_DS,
        KERNEL,
        PRECISION,
        EMULATE_BF16,
        BLOCK_N,
        BLOCK_D,
        BLOCK_C,
        BLOCK_E,
    )
    rows = b * N * D
    if WANT_DV:
        _store_rows_tile(dv_ptr + rows, n_offs, n_mask, o_offs, o_mask, D, prob * g, EMULATE_BF16)
    if WANT_DS:
        colsum = tl.load(colsum_ptr + b * D + o_offs, mask=o_mask, other=0.0)
        ds = prob * (dp - colsum[None, :])
        if WANT_DX:
            _store_rows_tile(dx_ptr + rows, n_offs, n_mask, o_offs, o_mask, D, g + ds, EMULATE_BF16)
        if WANT_DT:
            dt = ds * sigma * (1.0 - sigma)
            _store_rows_tile(dt_ptr + rows, n_offs, n_mask, o_offs, o_mask, D, dt, EMULATE_BF16)
