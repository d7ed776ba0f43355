"""The op split into its four stages, in plain PyTorch: the reference of the stage contract.

Only two quantities of CASA are reduced over the variates N: the first encoder conv
and the softmax's column statistics. The stages expose exactly those reductions, so
that the same code serves one device (stages composed on the whole of N) and a
variate-parallel model (each rank runs them on its own variates and all-reduces the
two reductions between stages):

Intermediates (``h1_partial``, ``h5``, statistics) are in the accumulation dtype:
float64 for float64 input, float32 otherwise.

1. ``head_partial(x, enc0_weight) -> h1_partial [B, C1, D/2]``: the first
   conv *without* bias and ReLU, a sum over the given variates (partials over
   disjoint variate sets add up to the whole).
2. ``bottleneck(h1_partial, w) -> h5 [B, C1, D/2]``: bias + ReLU of the
   first conv, then the four N-independent convs, each with bias and ReLU.
3. ``tail_stats(x, h5, dec2_weight, dec2_bias) -> (col_max, col_sum)``, each
   ``[B, D]``: over the given variates, the column maximum of the scores
   ``s = sigmoid(convT(h5)) + x`` and ``Σ exp(s - col_max)``. Statistics of
   disjoint variate sets merge with :func:`merge_stats` (log-sum-exp). A backend may
   return any shift ``col_max >= max s`` within a few units of it instead of the maximum
   itself (the cpu kernel uses 1 + the max of x over a block of rows), with ``col_sum``
   relative to that shift: the merge and the output are the same.
4. ``tail_output(x, h5, dec2_weight, dec2_bias, value_weight, value_bias, col_max,
   col_sum) -> y [B, N, D]`` in x's dtype: ``exp(s - col_max) / col_sum ·
   (x Wvᵀ + bv) + x`` with the merged (global) statistics.

``x`` is ``[B, N, D]`` with N the variates this call sees; ``enc0_weight`` /
``dec2_weight`` are ``[C1, N, k]`` and ``dec2_bias`` ``[N]`` for those variates.
Non-finite values propagate as in the reference (``torch.maximum`` keeps NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..weights import ScoreAttentionWeights


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_partial(x: torch.Tensor, enc0_weight: torch.Tensor) -> torch.Tensor:
    """Stage 1: ``conv1d(x, enc0_weight, stride 2, pad k//2)`` without bias, ``[B, C1, D/2]``."""
    acc = accumulation_dtype(x.dtype)
    p = enc0_weight.shape[2] // 2
    return F.conv1d(x.to(acc), enc0_weight.to(acc), None, stride=2, padding=p)


def bottleneck(h1_partial: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """Stage 2: ``h5 = relu(dec1(relu(dec0(relu(enc2(relu(enc1(relu(h1 + b0)))))))))``."""
    h1 = F.relu(h1_partial + w.enc0_bias.to(h1_partial.dtype)[:, None])
    return bottleneck_activations(h1, w)[-1]


def bottleneck_activations(h1: torch.Tensor, w: ScoreAttentionWeights) -> tuple[torch.Tensor, ...]:
    """The four N-independent convs from h1 (the first conv's output after its bias and
    ReLU), each with bias and ReLU: ``(enc1's, enc2's, dec0's outputs, h5)``, in h1's dtype
    (the weights cast to it)."""
    f = {
        name: t.to(h1.dtype)
        for name, t in w._asdict().items()
        if name.startswith(("enc1", "enc2", "dec0", "dec1"))
    }
    p = w.kernel // 2
    enc1 = F.relu(F.conv1d(h1, f["enc1_weight"], f["enc1_bias"], stride=2, padding=p))
    enc2 = F.relu(F.conv1d(enc1, f["enc2_weight"], f["enc2_bias"], stride=2, padding=p))
    dec0 = F.relu(
        F.conv_transpose1d(
            enc2, f["dec0_weight"], f["dec0_bias"], stride=2, padding=p, output_padding=1
        )
    )
    h5 = F.relu(
        F.conv_transpose1d(
            dec0, f["dec1_weight"], f["dec1_bias"], stride=2, padding=p, output_padding=1
        )
    )
    return enc1, enc2, dec0, h5


def scores(
    x: torch.Tensor, h5: torch.Tensor, dec2_weight: torch.Tensor, dec2_bias: torch.Tensor
) -> torch.Tensor:
    """``sigmoid(conv_transpose1d(h5, dec2)) + x``, ``[B, N, D]`` in h5's dtype (the tail's scores)."""
    p = dec2_weight.shape[2] // 2
    acc = h5.dtype
    t = F.conv_transpose1d(
        h5, dec2_weight.to(acc), dec2_bias.to(acc), stride=2, padding=p, output_padding=1
    )
    return torch.sigmoid(t) + x.to(acc)


def tail_stats(
    x: torch.Tensor, h5: torch.Tensor, dec2_weight: torch.Tensor, dec2_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: per column, ``max_N s`` and ``Σ_N exp(s - max)``, each ``[B, D]``."""
    s = scores(x, h5, dec2_weight, dec2_bias)
    col_max = s.amax(dim=1)
    return col_max, torch.exp(s - col_max[:, None]).sum(dim=1)


def merge_stats(
    col_max: torch.Tensor, col_sum: torch.Tensor, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges statistics stacked along ``dim`` into one (max, sum): the log-sum-exp combine."""
    merged_max = col_max.amax(dim=dim)
    return merged_max, (col_sum * torch.exp(col_max - merged_max.unsqueeze(dim))).sum(dim=dim)


def tail_output(
    x: torch.Tensor,
    h5: torch.Tensor,
    dec2_weight: torch.Tensor,
    dec2_bias: torch.Tensor,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor,
    col_max: torch.Tensor,
    col_sum: torch.Tensor,
) -> torch.Tensor:
    """Stage 4: ``exp(s - col_max) / col_sum · (x Wvᵀ + bv) + x`` in x's dtype, ``[B, N, D]``."""
    s = scores(x, h5, dec2_weight, dec2_bias)
    p = torch.exp(s - col_max[:, None]) / col_sum[:, None]
    acc = h5.dtype
    v = F.linear(x.to(acc), value_weight.to(acc), value_bias.to(acc))
    return (p * v + x.to(acc)).to(x.dtype)


def composed(x: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """The single-device op as the composition of the four stages (equals ``score_attention``)."""
    h5 = bottleneck(head_partial(x, w.enc0_weight), w)
    col_max, col_sum = tail_stats(x, h5, w.dec2_weight, w.dec2_bias)
    return tail_output(
        x, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, col_max, col_sum
    )
