"""casa_kernels: fast, verified kernels for CASA (CNN Autoencoder-based Score Attention).

Imports with no GPU, no triton and no compiled extension; ``python -m
casa_kernels.info`` says which backends are available and why not.
"""

from .modules import CASAAttention, CASABlock, CASAModel, ScoreNetwork
from .ops import availability, backend_names, casa_attention
from .weights import ScoreAttentionWeights

__version__ = "0.1.0"

__all__ = [
    "CASAAttention",
    "CASABlock",
    "CASAModel",
    "ScoreAttentionWeights",
    "ScoreNetwork",
    "availability",
    "backend_names",
    "casa_attention",
]
