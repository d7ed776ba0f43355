"""Loads the compiled extension ``casa_kernels._C`` once and remembers why it failed.

The extension registers ``casa::fused_score_attention`` (the fused kernels of
csrc/: a CPU implementation and, when built with CUDA, a CUDA one); loading it here
adds the op's fake kernel, so the raw op also works under ``torch.compile``,
``torch.export`` and ``torch.library.opcheck``. Importing the package never fails
because of it: backends ask ``extension_error()`` instead.
"""

from __future__ import annotations

import functools

import torch

FUSED_OP = "casa::fused_score_attention"


@functools.cache
def extension_error() -> str | None:
    """None when the extension is loaded, else why it is not."""
    try:
        from .. import _C  # noqa: F401  (registers the op on import)
    except ImportError as exc:
        return (
            f"the C++ extension casa_kernels._C is not built or failed to load ({exc}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
    torch.library.register_fake(FUSED_OP)(_fused_score_attention_fake)
    return None


def _fused_score_attention_fake(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    # Like every device kernel: y [B, N, D] of x's dtype and device, contiguous.
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@functools.cache  # asked on every call of a backend; fixed once the extension has loaded
def has_kernel_for(dispatch_key: str) -> bool:
    """Whether the loaded extension registered a kernel of the fused op for ``dispatch_key``."""
    return extension_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        FUSED_OP, dispatch_key
    )


def kernel_missing_reason(dispatch_key: str, hint: str) -> str | None:
    """None when the extension registered its ``dispatch_key`` kernel, else why not."""
    error = extension_error()
    if error is None and not has_kernel_for(dispatch_key):
        return f"the extension was built without its {dispatch_key} kernel ({hint})"
    return error


def fused_score_attention(x: torch.Tensor, weights) -> torch.Tensor:
    """Calls the extension's fused op on validated inputs (any device it was built for)."""
    return torch.ops.casa.fused_score_attention(x.contiguous(), *(w.contiguous() for w in weights))
