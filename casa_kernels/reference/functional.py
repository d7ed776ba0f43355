"""The reference math of docs/design.md §2, as plain PyTorch calls on explicit weights.

These functions do no validation: the public entry points check their inputs first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..weights import ScoreAttentionWeights


def score_network(x: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """score(x) = decoder(encoder(x)) + x for ``x: [B, N, D]``; returns ``[B, N, D]``.

    Encoder: three Conv1d (stride 2, padding k//2) + ReLU, lengths D → D/8.
    Decoder: three ConvTranspose1d (stride 2, padding k//2, output_padding 1),
    ReLU, ReLU, Sigmoid, lengths D/8 → D.
    """
    p = w.kernel // 2
    h = F.relu(F.conv1d(x, w.enc0_weight, w.enc0_bias, stride=2, padding=p))
    h = F.relu(F.conv1d(h, w.enc1_weight, w.enc1_bias, stride=2, padding=p))
    h = F.relu(F.conv1d(h, w.enc2_weight, w.enc2_bias, stride=2, padding=p))
    h = F.relu(
        F.conv_transpose1d(h, w.dec0_weight, w.dec0_bias, stride=2, padding=p, output_padding=1)
    )
    h = F.relu(
        F.conv_transpose1d(h, w.dec1_weight, w.dec1_bias, stride=2, padding=p, output_padding=1)
    )
    h = torch.sigmoid(
        F.conv_transpose1d(h, w.dec2_weight, w.dec2_bias, stride=2, padding=p, output_padding=1)
    )
    return h + x


def score_attention(x: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """y = softmax_over_N(score(x)) * (x Wvᵀ + bv) + x for ``x: [B, N, D]``; returns ``[B, N, D]``."""
    scores = torch.softmax(score_network(x, w), dim=1)
    return scores * F.linear(x, w.value_weight, w.value_bias) + x
