"""The ``reference`` backend: the pure-PyTorch math, on any device and dtype."""

import torch

from ... import reference
from ...reference import stages
from ..registry import Backend, Stages, register_backend

register_backend(
    Backend(
        name="reference",
        device_types=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        forward=reference.score_attention,
        unavailable_reason=lambda: None,
        stages=Stages(
            stages.head_partial, stages.bottleneck, stages.tail_stats, stages.tail_output
        ),
    )
)
