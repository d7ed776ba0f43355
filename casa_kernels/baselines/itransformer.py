"""An iTransformer-style forecaster with the input/output shapes of ``CASAModel``.

``forward(x: [B, seq_len, n_vars]) -> [B, pred_len, n_vars]``: instance
normalisation (biased variance + 1e-5, as published), inverted embedding
``Linear(L→D)``, ``e_layers`` post-norm encoder layers (full attention + FFN with
GELU), a final LayerNorm, ``Linear(D→H)``, de-normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_positive_int, check_series
from .full_attention import FullAttention


class EncoderLayer(nn.Module):
    """``x + attn(x)`` → LN → ``+ FFN`` → LN on ``[B, N, D]``."""

    def __init__(self, *, d_model: int, n_heads: int, d_ff: int, implementation: str):
        super().__init__()
        self.attention = FullAttention(
            d_model=d_model, n_heads=n_heads, implementation=implementation
        )
        self.conv1 = nn.Linear(d_model, d_ff)
        self.conv2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.conv2(F.gelu(self.conv1(x))))


class ITransformerModel(nn.Module):
    def __init__(
        self,
        *,
        n_vars: int,
        d_model: int,
        seq_len: int,
        pred_len: int,
        e_layers: int,
        n_heads: int = 8,
        d_ff: int | None = None,
        implementation: str = "einsum",
    ):
        super().__init__()
        for name, value in (
            ("n_vars", n_vars),
            ("seq_len", seq_len),
            ("pred_len", pred_len),
            ("e_layers", e_layers),
        ):
            check_positive_int(name, value)
        self.n_vars, self.seq_len = n_vars, seq_len
        self.embedding = nn.Linear(seq_len, d_model)
        self.layers = nn.ModuleList(
            EncoderLayer(
                d_model=d_model,
                n_heads=n_heads,
                d_ff=d_ff or d_model,
                implementation=implementation,
            )
            for _ in range(e_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.projector = nn.Linear(d_model, pred_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_series(x, self.seq_len, self.n_vars)
        mean = x.mean(dim=1, keepdim=True)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-5)
        tokens = self.embedding(((x - mean) / std).permute(0, 2, 1))
        for layer in self.layers:
            tokens = layer(tokens)
        y = self.projector(self.norm(tokens)).permute(0, 2, 1)
        return y * std + mean
