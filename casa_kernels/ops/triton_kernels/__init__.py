"""Triton kernels of ``casa::score_attention`` (docs/design.md §5), as the four stages of
:mod:`casa_kernels.reference.stages`, and the single-device op as their composition.

Shapes: ``x: [B, N, D]``, ``C1 = D/4``, ``C2 = D/2``, k odd, ``p = k // 2``.

Stages and launches (nine per call, no host synchronisation, no ``.item()``: a call
is capturable in a CUDA graph):

1. ``head_partial`` — ``_head_kernel``: the first conv without bias, a split-K
   implicit GEMM over N·k. Programs = (B × C1 tiles) × D/2 tiles × splits; split s
   reduces its own range of variates into fp32 partials ``[S, B, C1, D/2]`` (S is
   chosen from the shape alone so the device fills; one launch).
2. ``bottleneck`` — ``_h1_kernel`` sums the S head partials, adds the bias, applies
   ReLU and stores h1 channels-last (``[B, D/2, C1]``) in the activations' dtype; then
   ``_bottleneck_layer_kernel`` once per middle conv (enc1, enc2, dec0, dec1), each
   with bias and ReLU, tiled over (positions, output channels, batch) so that every
   layer runs at least one program per SM where the shape allows
   (:func:`.launch.bottleneck_tile`). A layer reads channels-last slabs of its input
   (each tap a row offset, each row BLOCK_K contiguous channels), K = BLOCK_K ≥ 64
   per dot where CIN allows, fp32 accumulation, operand loads pipelined
   (num_stages ≥ 3), and writes its output channels-last in the activations' dtype
   (the last: h5 fp32 ``[B, C1, D/2]``). Five launches.
3. ``tail_stats`` — ``_tail_stats_kernel``: programs = ⌈N/BLOCK_N⌉ × ⌈D/BLOCK_D⌉ × B
   (BLOCK_N = 128 rows, fewer for small N);
   each computes its score tile ``s = sigmoid(convT(h5) + b) + x`` (the transposed
   conv by output parity: K = C1 × the taps reaching each parity, no structural zeros)
   and writes the tile's column max and ``Σ exp(s − max)`` to fp32 partials
   ``[B, ⌈N/BLOCK_N⌉, D]``; ``_stats_merge_kernel`` merges them over the N tiles
   (log-sum-exp) into ``[B, D]`` (two launches).
4. ``tail_output`` — ``_tail_output_kernel``: the same ``[BLOCK_N, BLOCK_D]`` tiles on a
   persistent grid (one program per SM, each taking every programs-th tile); per tile
   it recomputes the score tile, computes the value tile ``x Wvᵀ`` by a pipelined
   ``tl.dot`` loop over K = D and writes ``exp(s − max)/sum · (v + bv) + x`` (one launch).

Layers: :mod:`.tiles` (tile helpers: ``@triton.jit`` device functions), :mod:`.kernels`
(the stage kernels and their autotune configs), :mod:`.launch` (launch plans, weight
packing, the launchers: the public functions below).
"""

from .backward import BACKWARD_BLOCK_N, TailGrads, tail_backward
from .launch import (
    HEAD_BLOCK_N,
    TAIL_BLOCK_N,
    ForwardSaved,
    bottleneck,
    forward_saving,
    head_partial,
    head_split_count,
    head_splits,
    program_target,
    tail_block_n,
    tail_output,
    tail_stats,
    triton_score_attention,
)

__all__ = [
    "BACKWARD_BLOCK_N",
    "HEAD_BLOCK_N",
    "TAIL_BLOCK_N",
    "ForwardSaved",
    "TailGrads",
    "bottleneck",
    "forward_saving",
    "head_partial",
    "head_split_count",
    "head_splits",
    "program_target",
    "tail_backward",
    "tail_block_n",
    "tail_output",
    "tail_stats",
    "triton_score_attention",
]
