"""The ``cuda`` backend: the fused CUDA C++ kernels of csrc/cuda (docs/design.md §5), via
the extension.

Serves CUDA tensors of dtype float32, float16 and bfloat16 (fp32 accumulation; fp16
and bf16 GEMMs on tensor cores, fp32 on the CUDA cores). The last decoder weight is
re-laid out once per weight version (weight cache): ``[C1, N, k]`` → ``[N, k, C1]``,
passed to the op as a ``[C1, N, k]`` view of it, the layout the tail's score GEMM reads
coalesced (the op also takes it contiguous). The extension builds its CUDA kernels only
when torch has CUDA and nvcc is found at build time (or ``FORCE_CUDA=1``). Shapes beyond the
kernels' 32-bit grid and index limits are declared before dispatch (``shape_limits``).
"""

import torch

from ...weights import ScoreAttentionWeights
from ..extension import kernel_missing_reason
from ..finite_weights import reference_for_nonfinite_weights
from ..registry import Backend, ProblemShape, register_backend
from ..weight_cache import cached


def _unavailable_reason() -> str | None:
    missing = kernel_missing_reason("CUDA", "torch.version.cuda or nvcc missing at build time")
    if missing is None and not torch.cuda.is_available():
        return "no CUDA device"
    return missing


def _shape_limits(shape: ProblemShape) -> str | None:
    """Why the kernels cannot serve ``shape`` (their 32-bit grid and index limits), else None.

    Asks the extension (``casa::cuda_shape_limits``, i.e. ``gpu::problem_supported`` of
    csrc/cuda), so the limits are stated once, beside the kernels. Only called when the
    backend is available, hence when the extension has its CUDA part. An empty batch
    launches nothing and fits any limit.
    """
    if shape.batch == 0:
        return None
    why = torch.ops.casa.cuda_shape_limits(*shape)
    return f"exceeds the CUDA kernels' limits ({why})" if why else None


def packed_dec2(dec2_weight: torch.Tensor) -> torch.Tensor:
    """``dec2_weight`` [C1, N, k] as a view of a contiguous [N, k, C1] copy, once per version."""
    return cached(
        "cuda.dec2_nkc",
        (dec2_weight,),
        lambda: dec2_weight.permute(1, 2, 0).contiguous().permute(2, 0, 1),
    )


def _forward(x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    tensors = [
        packed_dec2(w) if name == "dec2_weight" else w.contiguous()
        for name, w in zip(weights._fields, weights)
    ]
    return torch.ops.casa.fused_score_attention(x.contiguous(), *tensors)


register_backend(
    Backend(
        name="cuda",
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        forward=reference_for_nonfinite_weights(_forward),
        unavailable_reason=_unavailable_reason,
        auto_priority={"cuda": 1},
        shape_limits=_shape_limits,
    )
)
