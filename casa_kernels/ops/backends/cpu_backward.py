"""The ``cpu`` backend's fused backward (docs/design.md §5.8): what the op's autograd runs
for inputs the cpu backend served (``Backend.fused_backward``).

Forward for training: the head on the kernel (``casa::cpu_head_partial``), the four
bottleneck convs on the kernel's GEMMs (``casa::cpu_bottleneck``), keeping their outputs,
and the kernel's fused tail (``casa::cpu_tail_fused``), which also returns the softmax's
column statistics. Saved for the backward, besides x and the weights: the five activations
h1, enc1's, enc2's, dec0's outputs and h5 (``[B, channels, length]``, ``B·5·D²/8``
elements, in the accumulation dtype) and the statistics (``2·B·D``); nothing of size
``[B, N, D]``.

Backward: ``casa::cpu_score_attention_backward`` (csrc/cpu/backward.cpp) recomputes the
scores tile by tile from h5 and the statistics, and runs the whole chain back to x
(the convolutions as GEMMs on the saved activations). It takes the forward's tail
layouts (dec2 by parity, Wvᵀ and bv in tile order) from the weight cache rather than
laying the weights out again.
fp32, bfloat16 (fp32 accumulation; on a CPU with bfloat16 GEMMs the backward's GEMMs take
bfloat16 operands, as the reference's autograd) and fp64. Weights with a NaN or inf run
on the reference, forward and backward (``finite_weights``).
"""

from __future__ import annotations

import torch

from ...reference.stages import accumulation_dtype
from ...weights import ScoreAttentionWeights
from ..finite_weights import weights_all_finite
from ..registry import FusedBackward


def bottleneck_activations(h1: torch.Tensor, w: ScoreAttentionWeights) -> tuple[torch.Tensor, ...]:
    """(enc1's, enc2's, dec0's outputs, h5) from h1 (after its bias and ReLU), each after its
    ReLU, in h1's dtype, contiguous: the four convs as GEMMs on the kernel
    (``casa::cpu_bottleneck``)."""
    from .cpu import _kernels  # the backend module imports this one

    return tuple(
        _kernels().cpu_bottleneck(
            h1,
            w.enc1_weight,
            w.enc1_bias,
            w.enc2_weight,
            w.enc2_bias,
            w.dec0_weight,
            w.dec0_bias,
            w.dec1_weight,
            w.dec1_bias,
        )
    )


def forward_saving(x: torch.Tensor, weights: ScoreAttentionWeights):
    """``(y, saved)`` with saved = (h1, enc1, enc2, dec0 outputs, h5, col_max, col_sum), or
    None for non-finite weights (the reference serves those)."""
    from .cpu import _kernels, _tail_prepared  # the backend module imports this one

    if not weights_all_finite(weights):
        return None
    x = x.contiguous()
    w = ScoreAttentionWeights(*(t.contiguous() for t in weights))
    kernels = _kernels()
    acc = accumulation_dtype(x.dtype)
    h1 = kernels.cpu_head_partial(x, w.enc0_weight).add_(w.enc0_bias.to(acc)[:, None]).relu_()
    activations = (h1, *bottleneck_activations(h1, w))
    prepared, tile, tier = _tail_prepared(
        x, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias
    )
    y, col_max, col_sum = kernels.cpu_tail_fused(
        x,
        activations[-1],
        w.dec2_weight,
        w.dec2_bias,
        w.value_weight,
        w.value_bias,
        prepared,
        tile,
        tier,
    )
    return y, (*activations, col_max, col_sum)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weights: ScoreAttentionWeights,
    saved: tuple[torch.Tensor, ...],
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of x and the 14 weights (None where ``needs`` is False) for grad_y."""
    from .cpu import _kernels, _tail_prepared

    *activations, col_max, col_sum = saved
    x = x.contiguous()
    w = ScoreAttentionWeights(*(t.contiguous() for t in weights))
    # The forward's tail layouts, from the weight cache (the same weights, not yet stepped).
    prepared, tile, _ = _tail_prepared(x, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias)
    grads = _kernels().cpu_score_attention_backward(
        grad_y.to(x.dtype).contiguous(),
        x,
        list(w),
        activations,
        col_max,
        col_sum,
        prepared,
        tile,
        list(needs),
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


FUSED_BACKWARD = FusedBackward(forward_saving, backward)
