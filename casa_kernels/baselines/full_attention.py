"""iTransformer's attention layer over variate tokens (Q/K/V/O projections, multi-head).

``implementation="einsum"`` is the published code path: the ``[B, H, N, N]`` score
tensor is materialised with einsum and soft-maxed. ``implementation="sdpa"`` computes
the same function with ``torch.nn.functional.scaled_dot_product_attention``, which
picks PyTorch's best kernel (flash / memory-efficient where available).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_dim, check_floating_tensor, check_positive_int

IMPLEMENTATIONS = ("einsum", "sdpa")


class FullAttention(nn.Module):
    """``forward(x: [B, N, D]) -> [B, N, D]``: softmax(QKᵀ/√E) V, projected by O."""

    def __init__(self, *, d_model: int, n_heads: int = 8, implementation: str = "einsum"):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        if d_model % n_heads != 0:
            raise ValueError(
                f"n_heads: expected a divisor of d_model={d_model}, received {n_heads}"
            )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation: expected one of {IMPLEMENTATIONS}, received {implementation!r}"
            )
        self.d_model, self.n_heads, self.implementation = d_model, n_heads, implementation
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating_tensor("x", x, 3, "[batch, n_vars, d_model]")
        check_dim("x", x, 2, "d_model", self.d_model)
        b, n, _ = x.shape
        heads = (b, n, self.n_heads, self.d_model // self.n_heads)
        q = self.query_projection(x).view(heads)
        k = self.key_projection(x).view(heads)
        v = self.value_projection(x).view(heads)
        if self.implementation == "einsum":
            scale = q.shape[-1] ** -0.5
            scores = torch.einsum("blhe,bshe->bhls", q, k)
            attn = torch.softmax(scale * scores, dim=-1)
            out = torch.einsum("bhls,bshd->blhd", attn, v)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        return self.out_projection(out.reshape(b, n, self.d_model))
