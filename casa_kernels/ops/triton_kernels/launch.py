"""Launch plans, weight packing and the launchers of the Triton backend: the stage
functions the backend (casa_kernels/ops/backends/triton.py) and the static cost model
(bench/cost_model) call. Every launch goes through :func:`_launch`.

Weights are prepared once per weight version (:func:`.weight_cache.cached`), in their
own dtype (no per-call casts: the op's weights share x's dtype): the head's ``enc0`` and
the tail's ``dec2`` packed tap-major ``[k, COUT, CIN]`` (``[k, C1, N]``, ``[k, N, C1]``),
the bottleneck's four ``[k, CIN, COUT]``, so each tap's weight tile loads along
contiguous rows, and the value weight transposed to ``Wvᵀ [D(in), D(out)]``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton

from ...weights import ScoreAttentionWeights
from ..weight_cache import cached
from .kernels import (
    _INTERPRET,
    _bottleneck_layer_kernel,
    _h1_kernel,
    _head_kernel,
    _stats_merge_kernel,
    _tail_output_kernel,
    _tail_stats_kernel,
)

# Rows of N reduced per step by the head; fixed (not tuned) so the split count,
# hence the partial buffer, does not depend on the tuned config.
HEAD_BLOCK_N = 16 if _INTERPRET else 32
# The head's output tile (BLOCK_C channels, BLOCK_T positions); fixed (not tuned) so the
# split count planned for it is the one that runs.
HEAD_TILE = {"BLOCK_C": 16, "BLOCK_T": 16} if _INTERPRET else {"BLOCK_C": 64, "BLOCK_T": 64}
# Largest tail tile in N (fixed, not tuned: both tail kernels and the statistics
# partials agree on it); smaller N get the next power of two >= 16. 128 rows with the
# first configs' 64 columns: no spills on sm_90 (python -m bench estimate).
TAIL_BLOCK_N = 16 if _INTERPRET else 128
_MERGE_BLOCK_D = 32 if _INTERPRET else 64
_MERGE_BLOCK_T = 4 if _INTERPRET else 16  # N tiles' statistics merged per step
# The bottleneck layers' output tiles (BLOCK_L positions, BLOCK_O channels), largest first:
# the plan (bottleneck_tile) takes the largest with which every layer fills the device.
GPU_LAYER_TILES = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))
_LAYER_TILES = ((16, 16),) if _INTERPRET else GPU_LAYER_TILES
_LAYER_BLOCK_K = 16 if _INTERPRET else 64  # input channels per dot
_H1_SPLIT_UNROLL = 4  # head partials summed per step of the h1 kernel


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


def _sm_count(device: torch.device) -> int:
    """The device's SM count, or a few under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def head_split_count(batch: int, n_vars: int, d_model: int, programs: int) -> int:
    """How many programs share the head's N reduction so that about ``programs`` programs
    run: the launch plan, a pure function of the sizes (the static cost model,
    bench/cost_model, calls it with an H100's SM count)."""
    chunks = triton.cdiv(n_vars, HEAD_BLOCK_N)
    c1, half = d_model // 4, d_model // 2
    tiles = batch * triton.cdiv(c1, HEAD_TILE["BLOCK_C"]) * triton.cdiv(half, HEAD_TILE["BLOCK_T"])
    return max(1, min(chunks, triton.cdiv(programs, tiles)))


def head_splits(batch: int, n_vars: int, d_model: int, device: torch.device) -> int:
    """How many programs share the head's N reduction: enough to fill the device."""
    return head_split_count(batch, n_vars, d_model, program_target(_sm_count(device)))


def bottleneck_layers(d_model: int) -> tuple[tuple[int, int, int, bool], ...]:
    """``(CIN, COUT, LIN, transposed)`` of the four middle convs at width ``d_model``:
    enc1, enc2 (stride 2, LOUT = LIN/2), dec0, dec1 (transposed, LOUT = 2·LIN)."""
    d = d_model
    return (
        (d // 4, d // 2, d // 2, False),
        (d // 2, d, d // 4, False),
        (d, d // 2, d // 8, True),
        (d // 2, d // 4, d // 4, True),
    )


def bottleneck_tile(
    batch: int, d_model: int, sm_count: int, tiles: tuple = _LAYER_TILES
) -> tuple[int, int]:
    """``(BLOCK_L, BLOCK_O)`` of the bottleneck layers: the largest of ``tiles`` with which
    every layer runs at least ``sm_count`` programs (one per SM), else the smallest. A pure
    function of the sizes (the static cost model calls it with an H100's SM count)."""
    for block_l, block_o in tiles:
        if all(
            batch * triton.cdiv(2 * lin if t else lin // 2, block_l) * triton.cdiv(cout, block_o)
            >= sm_count
            for _, cout, lin, t in bottleneck_layers(d_model)
        ):
            return block_l, block_o
    return tiles[-1]


def tail_block_n(n_vars: int) -> int:
    """The tail's tile height: ``TAIL_BLOCK_N``, or the next power of two >= 16 below it."""
    return min(TAIL_BLOCK_N, max(16, triton.next_power_of_2(n_vars)))


def _packed_in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A conv weight ``[COUT, CIN, k]`` (``transposed``: ``[CIN, COUT, k]``) packed
    ``[k, CIN, COUT]`` contiguous, so a tap's ``[BLOCK_K, BLOCK_O]`` operand loads along
    COUT (the bottleneck layers); prepared once per weight version."""
    order = (2, 0, 1) if transposed else (2, 1, 0)
    tag = "triton.packed_in_out_transposed" if transposed else "triton.packed_in_out"
    return cached(tag, (weight,), lambda: weight.permute(order).contiguous())


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

    grid = (
        B * triton.cdiv(C1, HEAD_TILE["BLOCK_C"]),
        triton.cdiv(half, HEAD_TILE["BLOCK_T"]),
        splits,
    )
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
        **HEAD_TILE,
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


def _bottleneck_from_parts(
    parts: torch.Tensor, w: ScoreAttentionWeights, sm_count: int | None = None
) -> torch.Tensor:
    """h5 fp32 ``[B, C1, D/2]`` from head partials ``[S, B, C1, D/2]`` (see
    :func:`_bottleneck_activations`)."""
    return _bottleneck_activations(parts, w, sm_count)[-1]


def _bottleneck_activations(
    parts: torch.Tensor, w: ScoreAttentionWeights, sm_count: int | None = None
) -> list[torch.Tensor]:
    """The score network's activations after each ReLU from head partials
    ``[S, B, C1, D/2]``: h1 (the split sum, bias and ReLU), enc1's, enc2's and dec0's
    outputs, each channels-last ``[B, length, channels]`` in the weights' dtype, and h5,
    fp32 ``[B, C1, D/2]``. One launch for h1, then one per layer; each launch tiled over
    (positions, channels, batch) by :func:`bottleneck_tile` for ``sm_count`` SMs (default:
    the device's). Five launches."""
    S, B = parts.shape[:2]
    D = w.d_model
    dtype, device = w.value_weight.dtype, parts.device
    common = _common(dtype, w.kernel)
    h = torch.empty((B, D // 2, D // 4), device=device, dtype=dtype)
    block_l, block_o = bottleneck_tile(B, D, sm_count or _sm_count(device))
    _launch(
        _h1_kernel,
        (triton.cdiv(D // 2, block_l), triton.cdiv(D // 4, block_o), B),
        parts,
        w.enc0_bias,
        h,
        S,
        B,
        D // 4,
        D // 2,
        EMULATE_BF16=common["EMULATE_BF16"],
        SPLIT_UNROLL=_H1_SPLIT_UNROLL,
        BLOCK_L=block_l,
        BLOCK_C=block_o,
        num_warps=4,
    )
    activations = [h]
    layers = zip(
        bottleneck_layers(D),
        (w.enc1_weight, w.enc2_weight, w.dec0_weight, w.dec1_weight),
        (w.enc1_bias, w.enc2_bias, w.dec0_bias, w.dec1_bias),
    )
    for i, ((cin, cout, lin, transposed), weight, bias) in enumerate(layers):
        last = i == 3
        lout = 2 * lin if transposed else lin // 2
        out = torch.empty(
            (B, cout, lout) if last else (B, lout, cout),
            device=device,
            dtype=torch.float32 if last else dtype,
        )
        _launch(
            _bottleneck_layer_kernel,
            (triton.cdiv(lout, block_l), triton.cdiv(cout, block_o), B),
            h,
            _packed_in_out(weight, transposed),
            bias,
            out,
            B,
            cin,
            cout,
            lin,
            TRANSPOSED=transposed,
            OUT_CHANNELS_FIRST=last,
            BLOCK_K=_LAYER_BLOCK_K,
            BLOCK_L=block_l,
            BLOCK_O=block_o,
            **common,
        )
        h = out
        activations.append(h)
    return activations


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
        B,
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
        BLOCK_T=min(_MERGE_BLOCK_T, triton.next_power_of_2(T)),
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
    sm_count: int | None = None,
) -> torch.Tensor:
    """Stage 4: ``exp(s − col_max)/col_sum · (x Wvᵀ + bv) + x`` for ``x: [B, N, D]`` with
    merged statistics ``[B, D]``; returns ``[B, N, D]`` of x's dtype, contiguous. A
    persistent launch: one program per SM (``sm_count``, default the device's), each
    taking every programs-th ``[block_n, BLOCK_D]`` output tile."""
    x = x.contiguous()
    B, N, D = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B == 0:
        return y
    block_n = block_n or tail_block_n(N)
    programs = sm_count or _sm_count(x.device)

    def grid(meta):
        tiles = triton.cdiv(N, block_n) * triton.cdiv(D, meta["BLOCK_D"]) * B
        return (min(tiles, programs),)

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
            B,
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
    sm_count: int | None = None,
) -> torch.Tensor:
    """``softmax_over_N(score(x)) * (x Wvᵀ + bv) + x`` for ``x: [B, N, D]``; returns
    ``[B, N, D]``, contiguous. The composition of the four stages in nine launches;
    B = 0 returns an empty result without a launch.

    ``splits`` overrides how many programs share the head's N reduction and
    ``block_n`` the tail's tile height (a power of two >= 16); ``sm_count`` is the SM
    count the launch plans are made for (default: x's device's; the static cost model
    plans for a GPU it does not have).
    """
    if x.shape[0] == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return forward_saving(x, weights, splits=splits, block_n=block_n, sm_count=sm_count).y


class ForwardSaved(NamedTuple):
    """The output of :func:`forward_saving` and what the backward needs of the forward:
    the score network's five activations (:func:`_bottleneck_activations`: h1, enc1's,
    enc2's, dec0's outputs channels-last in x's dtype, h5 fp32 ``[B, D/4, D/2]``) and the
    merged column statistics (fp32 ``[B, D]`` each)."""

    y: torch.Tensor
    activations: list[torch.Tensor]
    col_max: torch.Tensor
    col_sum: torch.Tensor


def forward_saving(
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    *,
    splits: int | None = None,
    block_n: int | None = None,
    sm_count: int | None = None,
) -> ForwardSaved:
    """:func:`triton_score_attention` (same launches and arguments; B > 0), keeping the
    activations and statistics it computes on the way."""
    x = x.contiguous()
    w = weights
    with _device_guard(x):
        if splits is None and sm_count is not None:
            splits = head_split_count(*x.shape[:2], x.shape[2], program_target(sm_count))
        parts = _head_partials(x, _packed(w.enc0_weight, False), splits)
        activations = _bottleneck_activations(parts, w, sm_count)
        h5 = activations[-1]
        block_n = block_n or tail_block_n(x.shape[1])
        parts = _tail_partial_stats(
            x, h5, _packed(w.dec2_weight, True), w.dec2_bias.contiguous(), block_n
        )
        col_max, col_sum = _merge_tile_stats(*parts)
        y = tail_output(
            x,
            h5,
            w.dec2_weight,
            w.dec2_bias,
            w.value_weight,
            w.value_bias,
            col_max,
            col_sum,
            block_n=block_n,
            sm_count=sm_count,
        )
    return ForwardSaved(y, activations, col_max, col_sum)
