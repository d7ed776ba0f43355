"""The ``cpu`` backend's own backward of its stages in a variate-parallel layer
(docs/design.md §12.4): ``Stages.backward``.

Forward, for this rank's variates ``x: [B, N_local, D]``: the head's partial sums on the
kernel, summed over the ranks; the bottleneck on the kernel, keeping its activations (as
the op's fused forward does, ``cpu_backward.bottleneck_activations``); the tail's
statistics on the kernel, merged over the ranks; the tail's output on the kernel with the
global statistics. Saved: the five activations and the global ``(M, S)``, nothing of size
``[B, N, D]``.

Backward, with two all-reduces of O(B·D²) values, whatever N is:

1. ``casa::cpu_tail_backward_colsum``: per tile, the scores recomputed once from h5, then
   P, dP = v ⊙ g and σ' kept (3·B·N_local·D values in the accumulation dtype, until step 3)
   and this rank's ``Σ_N P ⊙ dP`` per column, ``[B, D]``;
2. all-reduce (sum) of the gradient of the merged column sum S, ``−Σ_N P ⊙ dP / S``: the
   tensor the reference stages' autograd all-reduces there, giving the global colsum;
3. ``casa::cpu_tail_backward_rows``: ds, dv, dt per tile, dx's tail share, dWv, dbv, dec2's
   gradients and dh5 from this rank's rows, then the bottleneck's convolutions down to h1
   (the replicated parameters' gradients are this rank's share), giving the gradient of
   the head's summed output from this rank's rows;
4. all-reduce (sum) of that gradient ``[B, D/4, D/2]``, where x or the head's weight needs it;
5. ``casa::cpu_head_backward``: the head's weight gradient (this rank's variates, whole) and
   x's share.
Weights with a NaN or inf are not served (``serves``): the stages then take the
reference's gradients, as the op does.
"""

from __future__ import annotations

import torch

from ...reference.stages import accumulation_dtype
from ...weights import ScoreAttentionWeights
from ..finite_weights import weights_all_finite
from ..registry import RankReductions, StagesBackward
from .cpu_backward import bottleneck_activations

_FIELDS = ScoreAttentionWeights._fields
_ENC0_WEIGHT = 1 + _FIELDS.index("enc0_weight")
_VALUE = {1 + _FIELDS.index("value_weight"), 1 + _FIELDS.index("value_bias")}

HEAD_SUMS = "the encoder head's partial sums"
COLUMN_SUMS = "the softmax column sums"


def _serves(weights: ScoreAttentionWeights) -> bool:
    return weights_all_finite(weights)


def forward_saving(
    x: torch.Tensor, weights: ScoreAttentionWeights, reductions: RankReductions
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(y_local, saved)``, saved = (h1, enc1, enc2, dec0 outputs, h5, M, S)."""
    from .cpu import _kernels, _tail_output, _tail_stats  # the backend module imports this one

    x = x.contiguous()
    w = ScoreAttentionWeights(*(t.contiguous() for t in weights))
    acc = accumulation_dtype(x.dtype)
    h1 = reductions.sum_(_kernels().cpu_head_partial(x, w.enc0_weight), HEAD_SUMS)
    h1.add_(w.enc0_bias.to(acc)[:, None]).relu_()
    activations = (h1, *bottleneck_activations(h1, w))
    h5 = activations[-1]
    col_max, col_sum = reductions.merge_stats(*_tail_stats(x, h5, w.dec2_weight, w.dec2_bias))
    y = _tail_output(
        x, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, col_max, col_sum
    )
    return y, (*activations, col_max, col_sum)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    saved: tuple[torch.Tensor, ...],
    needs: tuple[bool, ...],
    reductions: RankReductions,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of x and the 14 weights (None where ``needs`` is False) for grad_y."""
    from .cpu import _kernels, _tail_prepared

    *activations, col_max, col_sum = saved
    kernels = _kernels()
    x = x.contiguous()
    w = ScoreAttentionWeights(*(t.contiguous() for t in weights))
    g = grad_y.to(x.dtype).contiguous()
    flags = list(needs)
    # The tail output stage's layouts, from the weight cache.
    prepared, tile, _ = _tail_prepared(x, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias)
    colsum, state = kernels.cpu_tail_backward_colsum(
        g, x, list(w), activations[-1], col_max, col_sum, flags, prepared, tile
    )
    if any(need for i, need in enumerate(needs) if i not in _VALUE):  # ds is due
        grad_sum = reductions.sum_(colsum.div_(col_sum).neg_(), f"the gradient of {COLUMN_SUMS}")
        colsum = grad_sum.mul_(col_sum).neg_()
    *grads, dpre1 = kernels.cpu_tail_backward_rows(
        g, x, list(w), activations, col_max, col_sum, colsum, state, flags, prepared, tile
    )
    del state
    if needs[0] or needs[_ENC0_WEIGHT]:
        reductions.sum_(dpre1, f"the gradient of {HEAD_SUMS}")
        grads[0], grads[_ENC0_WEIGHT] = kernels.cpu_head_backward(
            dpre1, x, w[_ENC0_WEIGHT - 1], grads[0], flags
        )
    return tuple(grad if need else None for grad, need in zip(grads, needs))


STAGES_BACKWARD = StagesBackward(_serves, forward_saving, backward)
