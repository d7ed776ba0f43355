"""The stage kernels of the Triton backend (``@triton.jit``, autotuned where tiles are
tuned), built from :mod:`.tiles`; launched by :mod:`.launch`.

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

Autotuning: each kernel tunes over a few configs per (N, D, k) key. With the
environment variable ``CASA_TRITON_SINGLE_CONFIG=1`` (read at import) every kernel
uses its first config only — for tests and ``verify`` on a GPU, where each new key
would otherwise cost seconds of tuning. Under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors with one small config each.
"""

import os

import triton
import triton.language as tl

from .tiles import (
    _conv_s2_relu_stage,
    _conv_s2_tile,
    _conv_transpose_relu_stage,
    _mma,
    _round_to,
    _score_tile,
    _sum_splits_relu,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SINGLE_CONFIG = os.environ.get("CASA_TRITON_SINGLE_CONFIG") == "1"


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
