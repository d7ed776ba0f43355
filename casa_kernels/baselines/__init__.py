"""Full attention over variate tokens, as published in iTransformer: what CASA replaces."""

from .full_attention import FullAttention
from .itransformer import ITransformerModel

__all__ = ["FullAttention", "ITransformerModel"]
