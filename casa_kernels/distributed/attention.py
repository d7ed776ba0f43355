"""Variate-parallel CASA attention as a function: the backend's stages with two all-reduces between them.

On each rank, for its variates ``x_local: [B, N_local, D]`` and the weights with the
per-variate tensors sliced to those variates (``enc0_weight``/``dec2_weight``
``[C1, N_local, k]``, ``dec2_bias`` ``[N_local]``)::

    h1 = all_reduce_sum(head_partial(x_local, enc0_weight))        # [B, C1, D/2]
    h5 = bottleneck(h1, w)                                          # same on every rank
    M, S = merge_stats(*tail_stats(x_local, h5, dec2_weight, dec2_bias))   # [B, D] each
    y_local = tail_output(x_local, h5, dec2_weight, dec2_bias, value_weight, value_bias, M, S)

``y_local`` equals the single-process op's rows for those variates. Communicated per call
(forward): ``B·(C1·D/2 + 2·D)`` values in the accumulation dtype, whatever N is; the
backward all-reduces the gradients of ``h1`` and ``S`` (the same sizes again).

Where the backend has its own backward of the stages (``Stages.backward``, the cpu
backend's; docs/design.md §12.4) and the call is an eager one on plain tensors that needs
a gradient, outside autocast, the layer is one autograd function
(:class:`_FusedStagesFunction`) running that forward and backward, with the same
all-reduces; otherwise autograd differentiates the stages (the reference's gradients for a
fused backend's, ``stages.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.registry import RankReductions, StagesBackward
from ..ops.score_attention import _plain_eager
from ..validation import check_attention_input, check_weights
from ..weights import ScoreAttentionWeights
from .collectives import all_reduce_, all_reduce_sum, merge_stats
from .partition import VariateShard
from .stages import resolve_stages


def communicated_elements(batch: int, d_model: int) -> int:
    """Values all-reduced by one forward call: ``h1`` ``[B, D/4, D/2]`` plus ``M`` and ``S`` ``[B, D]``."""
    return batch * (d_model // 4 * (d_model // 2) + 2 * d_model)


def variate_parallel_attention(
    x_local: torch.Tensor,
    weights: ScoreAttentionWeights,
    shard: VariateShard,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """CASA attention over all ranks' variates, for this rank's ``x_local: [B, N_local, D]``.

    ``weights`` holds this rank's slices of the per-variate tensors (N_local =
    ``shard.n_local``) and the whole of the others. Returns ``[B, N_local, D]`` in
    x's dtype. Every rank of ``shard.group`` must call it with the same B, D and dtype.
    """
    weights = check_weights(weights)
    x_local = check_attention_input(x_local, weights)
    if weights.n_vars != shard.n_local:
        raise ValueError(
            f"weights: expected the per-variate tensors of {shard.describe()}, i.e. n_vars = "
            f"{shard.n_local}, received n_vars = {weights.n_vars}"
        )
    name, stages = resolve_stages(backend, x_local.device, x_local.dtype)
    w = weights
    if _runs_fused_backward(stages.backward, x_local, w):
        return _FusedStagesFunction.apply(stages.backward, name, shard, x_local, *w)
    h1 = all_reduce_sum(
        stages.head_partial(x_local, w.enc0_weight), shard, "the encoder head's partial sums"
    )
    h5 = stages.bottleneck(h1, w)
    col_max, col_sum = merge_stats(
        *stages.tail_stats(x_local, h5, w.dec2_weight, w.dec2_bias), shard
    )
    return stages.tail_output(
        x_local, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, col_max, col_sum
    )


def _runs_fused_backward(
    fused: StagesBackward | None, x: torch.Tensor, weights: ScoreAttentionWeights
) -> bool:
    """Whether this call runs the backend's own backward of its stages: it has one, the
    call needs a gradient and is an eager one on plain tensors outside autocast with B > 0,
    and the backend serves these weights."""
    return (
        fused is not None
        and x.shape[0] > 0
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (x, *weights))
        and _plain_eager(x, weights)
        and not torch.is_autocast_enabled(x.device.type)
        and fused.serves(weights)
    )


def _rank_reductions(shard: VariateShard) -> RankReductions:
    """The reductions over ``shard.group`` that a backend's stages run between them."""
    return RankReductions(
        sum_=lambda tensor, what: all_reduce_(tensor, dist.ReduceOp.SUM, shard, what),
        merge_stats=lambda col_max, col_sum: merge_stats(col_max, col_sum, shard),
    )


class _FusedStagesFunction(torch.autograd.Function):
    """The layer on one rank as one autograd function: the backend's forward of its stages,
    saving what its backward needs, and that backward (docs/design.md §12.4)."""

    @staticmethod
    def forward(ctx, fused: StagesBackward, backend: str, shard: VariateShard, x, *weights):
        reductions = _rank_reductions(shard)
        y, saved = fused.forward(x, ScoreAttentionWeights(*weights), reductions)
        ctx.fused, ctx.backend, ctx.reductions = fused, backend, reductions
        ctx.save_for_backward(x, *weights, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "casa_kernels.distributed: double backward (create_graph=True) is not supported "
                f"by the {ctx.backend} backend's backward of its stages, which served this "
                "layer; use backend='reference' to differentiate twice"
            )
        x, *rest = ctx.saved_tensors
        n = len(ScoreAttentionWeights._fields)
        weights, saved = ScoreAttentionWeights(*rest[:n]), tuple(rest[n:])
        needs = ctx.needs_input_grad[3:]
        grads = ctx.fused.backward(grad_y, x, weights, saved, needs, ctx.reductions)
        return (None, None, None, *grads)
