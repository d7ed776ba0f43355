"""The ``reference`` backend: the pure-PyTorch math, on any device and dtype."""

import torch

from .. import reference
from .registry import Backend, register_backend

register_backend(
    Backend(
        name="reference",
        device_types=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        forward=reference.score_attention,
        unavailable_reason=lambda: None,
    )
)
