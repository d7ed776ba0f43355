"""The stage kernels of the Triton backend (``@triton.jit``, autotuned where tiles are
tuned), built from :mod:`.tiles`; launched by :mod:`.launch`.

The bottleneck is N-independent: 3kD³/16 MACs per batch element (75 M at D = 512,
k = 3). Each middle conv needs the whole previous activation, so each is its own launch
(the device-wide handoff between layers), tiled over (positions, output channels,
batch): at B = 16, D = 512 every layer runs 256 programs of 64 × 32 outputs; at B = 1,
128 programs of 16 × 16. The activations between layers are channels-last in the
input dtype: rounding them when stored is what rounding them at the dot would do.

Recompute rather than rescale. The output pass needs the score tile again. Recomputing
it costs the last transposed conv a second time, N·D²·k/8 MACs (k = 3: 0.375·N·D², +18%
of the op's N·D²·(k/4 + 1) + 3kD³/16 MACs at the Traffic shape; there, bf16, B = 16: ~+4 µs of
tensor-core time at ~790 TFLOP/s) and keeps every intermediate on chip. Writing the
unnormalised products and rescaling them in place reads and writes y once more:
2·B·N·D·2 bytes = 28 MB there, ~9 µs at ~3 TB/s, plus a launch. The op is
compute-bound (15.1 GFLOP ≈ 19 µs vs 28 MB compulsory traffic ≈ 9 µs), so the
recompute is the cheaper of the two; it also gives the stage contract (stats, then
output from the merged stats) directly.

Autotuning: each kernel tunes over a few configs per key (N, D, k; a bottleneck layer its sizes and B). With the
environment variable ``CASA_TRITON_SINGLE_CONFIG=1`` (read at import) every kernel
uses its first config only — for tests and ``verify`` on a GPU, where each new key
would otherwise cost seconds of tuning. Under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors with one small config each.
"""

import os

import triton
import triton.language as tl

from .tiles import (
    _conv_s2_rows,
    _conv_s2_tile,
    _conv_transpose_rows,
    _relu,
    _round_to,
    _score_tile,
    _value_tile,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SINGLE_CONFIG = os.environ.get("CASA_TRITON_SINGLE_CONFIG") == "1"


def _tuned(configs: list) -> list:
    """``configs``, or only the first when ``CASA_TRITON_SINGLE_CONFIG=1``."""
    return configs[:1] if SINGLE_CONFIG else configs


def _head_configs() -> list:
    """The head's launch options; its tile comes from the launch plan (launch.HEAD_TILE),
    so the split count planned for it is the one every config runs."""
    if _INTERPRET:
        return [triton.Config({}, num_warps=1)]
    return _tuned(
        [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(8, 3), (4, 3), (8, 4)]]
    )


def _layer_configs() -> list:
    """The bottleneck layers' launch options; their tiles come from the launch plan
    (launch.bottleneck_tile), so a config never changes the grid."""
    if _INTERPRET:
        return [triton.Config({}, num_warps=1)]
    return _tuned(
        [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 3), (4, 4), (8, 3), (2, 3)]]
    )


def _stats_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 32, "BLOCK_C": 16}, num_warps=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_D": bd, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bd, bc, w, s in [(64, 32, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3)]
        ]
    )


def _output_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 32, "BLOCK_C": 16, "BLOCK_E": 16}, num_warps=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_D": bd, "BLOCK_C": bc, "BLOCK_E": be}, num_warps=w, num_stages=s)
            for bd, bc, be, w, s in [(64, 32, 64, 8, 3), (64, 32, 64, 8, 4), (128, 32, 64, 8, 3)]
        ]
    )


@triton.autotune(configs=_head_configs(), key=["B", "N", "D", "KERNEL"])
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
        pid_t * BLOCK_T,
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
        BLOCK_T,
    )
    out = out_ptr + ((split * B + b).to(tl.int64) * C1 + c_offs[:, None]) * half + t_offs[None, :]
    tl.store(out, acc, mask=c_mask[:, None] & t_mask[None, :])


@triton.jit
def _h1_kernel(
    parts_ptr,  # head partial sums [SPLITS, B, C1, HALF] fp32 (no bias)
    bias_ptr,  # enc0 bias [C1]
    out_ptr,  # h1 [B, HALF, C1], channels-last, the activations' dtype
    SPLITS,
    B,
    C1,
    HALF,
    EMULATE_BF16: tl.constexpr,
    SPLIT_UNROLL: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """h1 = relu(Σ_s parts[s] + b0) for a [BLOCK_L, BLOCK_C] tile of (position, channel),
    stored channels-last for the first bottleneck layer. Programs: L tiles × C1 tiles × B."""
    l_offs = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    c_mask = c_offs < C1
    mask = (l_offs < HALF)[:, None] & c_mask[None, :]
    src = c_offs[None, :] * HALF + l_offs[:, None]
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for s0 in range(0, SPLITS, SPLIT_UNROLL):  # SPLIT_UNROLL loads in flight, summed in order
        for i in tl.static_range(SPLIT_UNROLL):
            s = s0 + i
            split_ok = tl.full((BLOCK_L, BLOCK_C), s, tl.int32) < SPLITS
            acc += tl.load(
                parts_ptr + (s * B + b) * C1 * HALF + src, mask=mask & split_ok, other=0.0
            )
    bias = tl.load(bias_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    h = _relu(acc + bias[None, :])
    dst = out_ptr + b * HALF * C1 + l_offs[:, None] * C1 + c_offs[None, :]
    tl.store(dst, _round_to(h, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def _store_layer_tile(
    out_ptr,
    b,
    rows,
    LOUT,
    o_offs,
    o_mask,
    COUT,
    v,
    OUT_CHANNELS_FIRST: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    """Stores the activated tile ``v [rows, BLOCK_O]`` (fp32) of batch element b: to
    ``[B, LOUT, COUT]`` channels-last in the output's dtype, or (OUT_CHANNELS_FIRST) to
    fp32 ``[B, COUT, LOUT]``."""
    mask = (rows < LOUT)[:, None] & o_mask[None, :]
    if OUT_CHANNELS_FIRST:
        dst = out_ptr + b * COUT * LOUT + o_offs[None, :] * LOUT + rows[:, None]
        tl.store(dst, v, mask=mask)
    else:
        dst = out_ptr + b * LOUT * COUT + rows[:, None] * COUT + o_offs[None, :]
        tl.store(dst, _round_to(v, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.autotune(configs=_layer_configs(), key=["B", "CIN", "COUT", "LIN", "KERNEL", "TRANSPOSED"])
@triton.jit
def _bottleneck_layer_kernel(
    in_ptr,  # [B, LIN, CIN], channels-last, the activations' dtype
    w_ptr,  # weight packed [k, CIN, COUT]
    bias_ptr,  # [COUT]
    out_ptr,  # [B, LOUT, COUT] channels-last; OUT_CHANNELS_FIRST: fp32 [B, COUT, LOUT]
    B,
    CIN,
    COUT,
    LIN,
    TRANSPOSED: tl.constexpr,
    OUT_CHANNELS_FIRST: tl.constexpr,
    KERNEL: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """One bottleneck layer, relu(conv + bias): a stride-2 conv (LOUT = LIN/2) or, with
    TRANSPOSED, a stride-2 transposed conv (LOUT = 2·LIN). Programs: LOUT tiles × COUT
    tiles × B; each computes a [BLOCK_L, BLOCK_O] output tile (a transposed conv as its
    two output parities, BLOCK_L/2 rows each) as tap-wise dots over K = CIN in
    BLOCK_K chunks, fp32 accumulation."""
    pid_l = tl.program_id(0)
    o_offs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = tl.program_id(2).to(tl.int64)
    o_mask = o_offs < COUT
    in_base = in_ptr + b * LIN * CIN
    bias = tl.load(bias_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
    if TRANSPOSED:
        BLOCK_U: tl.constexpr = BLOCK_L // 2
        u_offs = pid_l * BLOCK_U + tl.arange(0, BLOCK_U)
        for r in tl.static_range(2):
            acc = _conv_transpose_rows(
                in_base,
                w_ptr,
                u_offs,
                o_offs,
                o_mask,
                CIN,
                COUT,
                LIN,
                r,
                KERNEL,
                PRECISION,
                EMULATE_BF16,
                BLOCK_K,
                BLOCK_U,
                BLOCK_O,
            )
            _store_layer_tile(
                out_ptr,
                b,
                2 * u_offs + r,
                2 * LIN,
                o_offs,
                o_mask,
                COUT,
                _relu(acc + bias[None, :]),
                OUT_CHANNELS_FIRST,
                EMULATE_BF16,
            )
    else:
        t_offs = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        acc = _conv_s2_rows(
            in_base,
            w_ptr,
            t_offs,
            o_offs,
            o_mask,
            CIN,
            COUT,
            LIN,
            KERNEL,
            PRECISION,
            EMULATE_BF16,
            BLOCK_K,
            BLOCK_L,
            BLOCK_O,
        )
        _store_layer_tile(
            out_ptr,
            b,
            t_offs,
            LIN // 2,
            o_offs,
            o_mask,
            COUT,
            _relu(acc + bias[None, :]),
            OUT_CHANNELS_FIRST,
            EMULATE_BF16,
        )


@triton.autotune(configs=_stats_configs(), key=["B", "N", "D", "KERNEL"])
@triton.jit
def _tail_stats_kernel(
    x_ptr,  # [B, N, D], contiguous
    h_ptr,  # h5 [B, C1, D/2] fp32
    w_ptr,  # dec2 weight packed [k, N, C1]
    bias_ptr,  # dec2 bias [N]
    max_ptr,  # [B, N_TILES, D] fp32: per N tile, column max of the scores
    sum_ptr,  # [B, N_TILES, D] fp32: per N tile, Σ exp(score − tile max)
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The reference's ``merge_stats`` over the N tiles, per column, BLOCK_T tiles' statistics
    loaded at once: max (NaN wins), then Σ_t sum_t · exp(max_t − max)."""
    o_offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    b = tl.program_id(1).to(tl.int64)
    col_max = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
    for t0 in range(0, N_TILES, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        mask = (t_offs < N_TILES)[:, None] & o_mask[None, :]
        offs = (b * N_TILES + t_offs[:, None]) * D + o_offs[None, :]
        m = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
        has_nan = tl.max((m != m).to(tl.int32), axis=0) > 0
        block_max = tl.where(has_nan, float("nan"), tl.max(m, axis=0))
        col_max = tl.maximum(col_max, block_max, propagate_nan=tl.PropagateNan.ALL)
    col_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, N_TILES, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        t_ok = t_offs < N_TILES
        offs = (b * N_TILES + t_offs[:, None]) * D + o_offs[None, :]
        mask = t_ok[:, None] & o_mask[None, :]
        m = tl.load(part_max_ptr + offs, mask=mask, other=0.0)
        s = tl.load(part_sum_ptr + offs, mask=mask, other=0.0)
        terms = tl.where(t_ok[:, None], s * tl.exp(m - col_max[None, :]), 0.0)
        col_sum += tl.sum(terms, axis=0)
    tl.store(max_ptr + b * D + o_offs, col_max, mask=o_mask)
    tl.store(sum_ptr + b * D + o_offs, col_sum, mask=o_mask)


@triton.jit
def _tail_output_tile(
    x_ptr,
    h_ptr,
    w_ptr,
    bias_ptr,
    wvt_ptr,
    bv_ptr,
    max_ptr,
    sum_ptr,
    y_ptr,
    b,
    tile,
    o0,
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
    """One ``[BLOCK_N, BLOCK_D]`` output tile: rows ``tile·BLOCK_N + ...`` of batch
    element b, columns ``o0 + ...``."""
    n_offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < N
    o_offs = o0 + tl.arange(0, BLOCK_D)
    o_mask = o_offs < D
    x_base = x_ptr + b * N * D
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


@triton.autotune(configs=_output_configs(), key=["B", "N", "D", "KERNEL"])
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
    B,
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
    """Persistent: each program takes the output tiles pid, pid + programs, ... of the
    ⌈N/BLOCK_N⌉ × ⌈D/BLOCK_D⌉ × B tiles (N tiles fastest, so programs running together
    share Wvᵀ's column block)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    d_tiles = tl.cdiv(D, BLOCK_D)
    for tile_id in range(tl.program_id(0), n_tiles * d_tiles * B, tl.num_programs(0)):
        tile = tile_id % n_tiles
        o0 = (tile_id // n_tiles) % d_tiles * BLOCK_D
        b = (tile_id // (n_tiles * d_tiles)).to(tl.int64)
        _tail_output_tile(
            x_ptr,
            h_ptr,
            w_ptr,
            bias_ptr,
            wvt_ptr,
            bv_ptr,
            max_ptr,
            sum_ptr,
            y_ptr,
            b,
            tile,
            o0,
            N,
            D,
            C1,
            KERNEL,
            PRECISION,
            EMULATE_BF16,
            BLOCK_N,
            BLOCK_D,
            BLOCK_C,
            BLOCK_E,
        )
