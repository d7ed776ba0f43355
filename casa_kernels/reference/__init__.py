"""Pure-PyTorch reference of CASA, numerically the paper's official implementation."""

from .functional import score_attention, score_network

__all__ = ["score_attention", "score_network"]
