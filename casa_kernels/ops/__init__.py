"""The op ``casa::score_attention``, its backends and the dispatch between them."""

from . import backends  # noqa: F401  (register the backends)
from .registry import availability, backend_names, resolve_backend
from .score_attention import casa_attention

__all__ = ["availability", "backend_names", "casa_attention", "resolve_backend"]
