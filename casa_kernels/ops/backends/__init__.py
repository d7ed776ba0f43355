"""The backends of ``casa::score_attention``, one module each; importing one registers it
(docs/design.md §6)."""

from . import cpu, cuda, reference, triton  # noqa: F401  (register the backends)
