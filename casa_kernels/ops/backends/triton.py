"""The ``triton`` backend: the Triton kernels of ``triton_kernels`` (docs/design.md §5, §6).

Serves CUDA tensors, and CPU tensors when the Triton interpreter is on
(``TRITON_INTERPRET=1``, set before triton is imported). triton is imported only
when the backend runs or reports its availability, so ``import casa_kernels``
works without it.
"""

from __future__ import annotations

import functools
import os

import torch

from ...weights import ScoreAttentionWeights
from ..finite_weights import reference_for_nonfinite_weights
from ..registry import STAGE_NAMES, Backend, Stages, register_backend
from .triton_backward import FUSED_BACKWARD


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return f"triton is not importable ({type(error).__name__}: {error})"
    return None


def _unavailable_reason() -> str | None:
    error = _triton_import_error()
    if error is not None:
        return error
    if not (torch.cuda.is_available() or _interpreter_on()):
        return "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 to run on CPU)"
    return None


@reference_for_nonfinite_weights  # the convs' zero padding times a NaN tap (finite_weights)
def _forward(x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    from ..triton_kernels import triton_score_attention

    return triton_score_attention(x, weights)


def _stage(name: str):
    """The stage ``name`` of ``triton_kernels``, imported when first called."""

    def run(*args, **kwargs):
        from .. import triton_kernels

        return getattr(triton_kernels, name)(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"The Triton ``{name}`` stage (see ``casa_kernels.ops.triton_kernels.{name}``)."
    return run


register_backend(
    Backend(
        name="triton",
        device_types=frozenset({"cuda", "cpu"} if _interpreter_on() else {"cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        forward=_forward,
        unavailable_reason=_unavailable_reason,
        # First on a GPU; never auto-chosen on the CPU (the interpreter is for tests).
        auto_priority={"cuda": 2},
        stages=Stages(*(_stage(name) for name in STAGE_NAMES)),
        fused_backward=FUSED_BACKWARD,
    )
)
