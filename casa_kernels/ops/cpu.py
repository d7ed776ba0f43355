"""The ``cpu`` backend: the fused C++ kernel of csrc/cpu (DESIGN §5), via the extension."""

import torch

from .extension import extension_error, fused_score_attention, has_kernel_for
from .registry import Backend, register_backend


def _unavailable_reason() -> str | None:
    error = extension_error()
    if error is None and not has_kernel_for("CPU"):
        return "the C++ extension was built without its CPU kernel"
    return error


register_backend(
    Backend(
        name="cpu",
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float64, torch.bfloat16}),
        forward=fused_score_attention,
        unavailable_reason=_unavailable_reason,
    )
)
