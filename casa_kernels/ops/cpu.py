"""The ``cpu`` backend: the fused C++ kernel of csrc/cpu (docs/design.md §5), via the extension."""

import torch

from .extension import fused_score_attention, kernel_missing_reason
from .registry import Backend, register_backend

register_backend(
    Backend(
        name="cpu",
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float64, torch.bfloat16}),
        forward=fused_score_attention,
        unavailable_reason=lambda: kernel_missing_reason("CPU", "csrc/cpu was not compiled"),
        auto_priority={"cpu": 1},
    )
)
