"""The ``cuda`` backend: the fused CUDA C++ kernels of csrc/cuda (DESIGN §5), via the extension.

Serves CUDA tensors of dtype float32, float16 and bfloat16 (fp32 accumulation; fp16
and bf16 GEMMs on tensor cores). The extension builds its CUDA kernels only when
torch has CUDA and nvcc is found at build time (or ``FORCE_CUDA=1``).
"""

import torch

from .extension import fused_score_attention, kernel_missing_reason
from .registry import Backend, register_backend


def _unavailable_reason() -> str | None:
    missing = kernel_missing_reason("CUDA", "torch.version.cuda or nvcc missing at build time")
    if missing is None and not torch.cuda.is_available():
        return "no CUDA device"
    return missing


register_backend(
    Backend(
        name="cuda",
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        forward=fused_score_attention,
        unavailable_reason=_unavailable_reason,
    )
)
