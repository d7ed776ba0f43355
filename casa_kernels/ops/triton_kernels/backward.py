"""The launcher of the tail's backward kernels (:mod:`.backward_kernels`): three launches,
no host synchronisation. Every launch goes through :func:`.launch._launch` (the compile
check and the tests record them there)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ...weights import ScoreAttentionWeights
from . import launch
from .backward_kernels import _colsum_merge_kernel, _tail_colsum_kernel, _tail_grads_kernel
from .kernels import _INTERPRET

# Rows of a backward tile: each program holds five [BLOCK_N, BLOCK_D] fp32 tiles (σ, x, g,
# P, dP) where the forward's output tile holds three, so half the forward's 128 rows.
BACKWARD_BLOCK_N = 16 if _INTERPRET else 64
_MERGE_BLOCK_T = 4 if _INTERPRET else 16  # N tiles' partial column sums summed per step
_MERGE_BLOCK_D = 32 if _INTERPRET else 128


def backward_block_n(n_vars: int) -> int:
    """The backward tiles' height: ``BACKWARD_BLOCK_N``, or the next power of two >= 16 below it."""
    return min(BACKWARD_BLOCK_N, max(16, triton.next_power_of_2(n_vars)))


class TailGrads(NamedTuple):
    """The tail's backward, each ``[B, N, D]`` in x's dtype, None where not wanted:
    ``g + ds`` (dx's share before the value projection's and the head's), ``dv = P ⊙ g``
    (the value projection's output gradient) and ``dt = ds ⊙ σ'`` (the last transposed
    conv's output gradient)."""

    dx: torch.Tensor | None
    dv: torch.Tensor | None
    dt: torch.Tensor | None


def tail_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    h5: torch.Tensor,
    w: ScoreAttentionWeights,
    col_max: torch.Tensor,
    col_sum: torch.Tensor,
    *,
    want_dx: bool,
    want_dv: bool,
    want_dt: bool,
    block_n: int | None = None,
) -> TailGrads:
    """The tail's backward for ``grad_y = dL/dy`` at ``x: [B, N, D]`` (both contiguous, one
    dtype) from h5 (fp32 ``[B, D/4, D/2]``) and the forward's merged column statistics
    (fp32 ``[B, D]``). Without ds wanted (neither dx nor dt) no value projection and no
    column sums run (one launch); otherwise three launches. ``block_n`` (a power of two
    >= 16) overrides the tile height."""
    B, N, D = x.shape
    want_ds = want_dx or want_dt
    dx = torch.empty_like(x) if want_dx else None
    dv = torch.empty_like(x) if want_dv else None
    dt = torch.empty_like(x) if want_dt else None
    if B == 0 or not (want_ds or want_dv):
        return TailGrads(dx, dv, dt)
    block_n = block_n or backward_block_n(N)
    n_tiles = triton.cdiv(N, block_n)
    common = launch._common(x.dtype, w.dec2_weight.shape[2])
    operands = (
        x,
        grad_y,
        h5.float().contiguous(),
        launch._packed(w.dec2_weight, True),
        w.dec2_bias.contiguous(),
        launch._value_weight_t(w.value_weight),
        w.value_bias.contiguous(),
        col_max.float().contiguous(),
        col_sum.float().contiguous(),
    )
    grid = lambda meta: (n_tiles, triton.cdiv(D, meta["BLOCK_D"]), B)  # noqa: E731
    with launch._device_guard(x):
        colsum = torch.empty((B, D), device=x.device, dtype=torch.float32)
        if want_ds:
            parts = torch.empty((B, n_tiles, D), device=x.device, dtype=torch.float32)
            launch._launch(
                _tail_colsum_kernel,
                grid,
                *operands,
                parts,
                B,
                N,
                D,
                D // 4,
                n_tiles,
                BLOCK_N=block_n,
                **common,
            )
            launch._launch(
                _colsum_merge_kernel,
                (triton.cdiv(D, _MERGE_BLOCK_D), B),
                parts,
                colsum,
                D,
                n_tiles,
                BLOCK_T=min(_MERGE_BLOCK_T, triton.next_power_of_2(n_tiles)),
                BLOCK_D=_MERGE_BLOCK_D,
            )
        launch._launch(
            _tail_grads_kernel,
            grid,
            *operands,
            colsum,
            x if dx is None else dx,  # an unused output points at x: never stored to
            x if dv is None else dv,
            x if dt is None else dt,
            B,
            N,
            D,
            D // 4,
            WANT_DX=want_dx,
            WANT_DV=want_dv,
            WANT_DT=want_dt,
            BLOCK_N=block_n,
            **common,
        )
    return TailGrads(dx, dv, dt)
