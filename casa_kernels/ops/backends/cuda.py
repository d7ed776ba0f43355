"""The ``cuda`` backend: the fused CUDA C++ kernels of csrc/cuda (docs/design.md §5), via
the extension.

Serves CUDA tensors of dtype float32, float16 and bfloat16 (fp32 accumulation; fp16
and bf16 GEMMs on tensor cores, fp32 on the CUDA cores). The six conv weights are
packed per tap once per weight version (weight cache, :func:`packed_taps`), the layout
the conv tiles copy in 16-byte vectors, and passed to the op as views of the official
shapes. The op also takes them contiguous (and packs them itself, on every call). The extension builds its CUDA kernels only
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


# The conv weights the conv kernel reads packed per tap: name -> transposed (its weight is
# [Cin, Cout, k], else [Cout, Cin, k]).
TAP_PACKED = {
    "enc0_weight": False,
    "enc1_weight": False,
    "enc2_weight": False,
    "dec0_weight": True,
    "dec1_weight": True,
    "dec2_weight": True,
}


def packed_taps(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``weight`` ([Cout, Cin, k], or [Cin, Cout, k] when ``transposed``) as a view, of
    the same shape and values, of a zero-initialised ``[k, Cout, row]`` tensor, ``row`` =
    Cin rounded up to 16 bytes of the dtype: one [Cout, Cin] matrix per tap, its rows
    16-byte aligned (csrc/cuda/launch_plan.h, packed_row). Once per weight version."""

    def pack() -> torch.Tensor:
        taps = weight.permute(2, 1, 0) if transposed else weight.permute(2, 0, 1)
        k, cout, cin = taps.shape
        vec = 16 // weight.element_size()
        row = -(-cin // vec) * vec
        packed = weight.new_zeros((k, cout, row))
        packed[:, :, :cin] = taps
        strides = (1, row, cout * row) if transposed else (row, 1, cout * row)
        return packed.as_strided(weight.shape, strides)

    return cached(f"cuda.taps.{int(transposed)}", (weight,), pack)


def _forward(x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    def prepared(name: str, w: torch.Tensor) -> torch.Tensor:
        if name in TAP_PACKED:
            return packed_taps(w, TAP_PACKED[name])
        return w.contiguous()

    tensors = [prepared(name, w) for name, w in zip(weights._fields, weights)]
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
