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
"""

from __future__ import annotations

import torch

from ..validation import check_attention_input, check_weights
from ..weights import ScoreAttentionWeights
from .collectives import all_reduce_sum, merge_stats
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
    _, stages = resolve_stages(backend, x_local.device, x_local.dtype)
    w = weights
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
