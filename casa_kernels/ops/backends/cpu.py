"""The ``cpu`` backend: the fused C++ kernel of csrc/cpu (docs/design.md §5), via the extension.

The kernel's weights are re-laid out for its GEMMs (the last transposed conv by output
parity, Wvᵀ by tail tile, bfloat16 packing) once per weight version, tail tile width
and bfloat16 GEMM tier (``casa::cpu_prepare_weights``, cached by ``weight_cache``), then
``casa::cpu_score_attention`` runs on them.

bfloat16 GEMMs run on the best unit the CPU has (``casa::cpu_bf16_gemm``: ``"amx"``,
``"avx512_bf16"`` where a probe shows it faster than fp32 here, or ``"none"``: fp32 GEMMs
on bfloat16 data), capped like PyTorch's own by ``ONEDNN_MAX_CPU_ISA``, switched off with
``torch.backends.mkldnn`` and forced with ``CASA_CPU_BF16_GEMM`` (docs/design.md §11.4).

Training: the op's autograd uses the backend's fused backward (``cpu_backward``).

Weights with a NaN or inf run on the reference (``finite_weights``, checked in the same
cache entry as the preparation): the kernel's GEMMs over zero-padded columns would give
NaN where PyTorch's convolutions skip the padding.
"""

from __future__ import annotations

import functools

import torch

from ... import reference
from ...weights import ScoreAttentionWeights
from ..extension import kernel_missing_reason
from ..finite_weights import prepared_if_finite
from ..registry import Backend, BlockEpilogue, Stages, register_backend
from ..weight_cache import cached
from .cpu_backward import FUSED_BACKWARD, bottleneck_activations
from .cpu_stages_backward import STAGES_BACKWARD

_MISSING_HINT = "csrc/cpu was not compiled"


def _kernels():
    """``torch.ops.casa`` with the extension's CPU ops loaded (raises why it cannot be)."""
    error = kernel_missing_reason("CPU", _MISSING_HINT)
    if error is not None:
        raise RuntimeError(f"the cpu backend's kernels are unavailable: {error}")
    return torch.ops.casa


def bf16_gemm_tier() -> str:
    """The bfloat16 GEMM tier of this CPU now: ``"amx"``, ``"avx512_bf16"`` or ``"none"``
    (``"none"`` while ``torch.backends.mkldnn`` is switched off)."""
    if (
        kernel_missing_reason("CPU", _MISSING_HINT) is not None
        or not torch._C._get_mkldnn_enabled()
    ):
        return "none"
    return _chosen_bf16_gemm()


@functools.cache
def _chosen_bf16_gemm() -> str:
    # The kernel chooses once per process (csrc/cpu/gemm.h); asking it costs an op call
    # (~3 us), on every call of the op, the epilogue and the Linears.
    return _kernels().cpu_bf16_gemm()


def vector_isa() -> str:
    """The vector tier of the cpu backend's elementwise loops: ``"avx512"``, ``"avx2"`` or
    ``"baseline"``, the best this CPU has, capped by ``ATEN_CPU_CAPABILITY`` (``"avx2"``,
    ``"default"``) where set, as PyTorch's own kernels are; ``"none"`` without the kernels."""
    if kernel_missing_reason("CPU", _MISSING_HINT) is not None:
        return "none"
    return _kernels().cpu_vector_isa()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the forecaster's own Linears (embedding, head) on
    the cpu backend: bfloat16 on a CPU without bfloat16 GEMMs (``bf16_gemm_tier() ==
    "none"``, e.g. AVX2 only) runs in fp32 on the exactly converted operands and is
    rounded once (docs/design.md §11.4), as PyTorch's bfloat16 GEMM would accumulate, at
    fp32 GEMM speed: in one kernel call (``casa::cpu_linear_bf16``, csrc/cpu/linear.cpp, on
    Wᵀ in fp32 prepared once per weight version) for inference, in ATen casts where
    autograd records the call. Anything else is ``F.linear`` itself."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or bf16_gemm_tier() != "none":
        return torch.nn.functional.linear(x, weight, bias)
    operands = (x, weight) if bias is None else (x, weight, bias)
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in operands)
    if not differentiated and all(t.dtype == torch.bfloat16 for t in operands):
        weight_t = cached("cpu.linear_t", (weight,), lambda: weight.t().float().contiguous())
        return _kernels().cpu_linear_bf16(x, weight_t, bias)
    fp32 = None if bias is None else bias.float()
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    return torch.nn.functional.linear(x, weight.float(), fp32).to(torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _tail_tile(batch: int, n_vars: int, d_model: int, threads: int, for_backward: bool) -> int:
    return _kernels().cpu_tail_tile(batch, n_vars, d_model, for_backward)  # a function of these


def _tile_and_tier(x: torch.Tensor, for_backward: bool) -> tuple[int, str]:
    """The tail tile width for x's shape (csrc/cpu/tail_layout.h; ``for_backward``: a
    backward will take the layouts), and the bfloat16 GEMM tier for x's dtype."""
    tier = bf16_gemm_tier() if x.dtype == torch.bfloat16 else "none"
    batch, n_vars, d_model = x.shape
    return _tail_tile(batch, n_vars, d_model, torch.get_num_threads(), for_backward), tier


def _forward(x: torch.Tensor, weights: ScoreAttentionWeights) -> torch.Tensor:
    x = x.contiguous()
    weights = [w.contiguous() for w in weights]
    tile, tier = _tile_and_tier(x, for_backward=False)
    kernels = _kernels()
    prepared = cached(
        f"cpu.{x.dtype}.tile{tile}.{tier}",
        weights,
        lambda: prepared_if_finite(
            weights, lambda: kernels.cpu_prepare_weights(weights, tile, tier)
        ),
    )
    if prepared is None:  # a NaN or inf weight: the reference's pattern (finite_weights)
        return reference.score_attention(x, ScoreAttentionWeights(*weights))
    return kernels.cpu_score_attention(x, weights, prepared, tile, tier)


def _tail_prepared(x, dec2_weight, dec2_bias, value_weight=None, value_bias=None):
    """(prepared, tile, tier) for the tail stages on x's batch and dtype: the tiles of a
    forward whose layouts the backward takes (the training forward, the backward and the
    variate-parallel stages)."""
    tile, tier = _tile_and_tier(x, for_backward=True)
    sources = tuple(t for t in (dec2_weight, dec2_bias, value_weight, value_bias) if t is not None)
    prepared = cached(
        f"cpu.tail{len(sources)}.{x.dtype}.tile{tile}.{tier}",
        sources,
        lambda: _kernels().cpu_prepare_tail(
            dec2_weight, dec2_bias, value_weight, value_bias, tile, tier
        ),
    )
    return prepared, tile, tier


def _head_partial(x: torch.Tensor, enc0_weight: torch.Tensor) -> torch.Tensor:
    return _kernels().cpu_head_partial(x, enc0_weight)


def _tail_stats(x, h5, dec2_weight, dec2_bias):
    prepared, tile, tier = _tail_prepared(x, dec2_weight, dec2_bias)
    return _kernels().cpu_tail_stats(x, h5, dec2_weight, dec2_bias, prepared, tile, tier)


def _tail_output(x, h5, dec2_weight, dec2_bias, value_weight, value_bias, col_max, col_sum):
    prepared, tile, tier = _tail_prepared(x, dec2_weight, dec2_bias, value_weight, value_bias)
    return _kernels().cpu_tail_output(
        x,
        h5,
        dec2_weight,
        dec2_bias,
        value_weight,
        value_bias,
        prepared,
        tile,
        tier,
        col_max,
        col_sum,
    )


def _bottleneck(h1_partial: torch.Tensor, w: ScoreAttentionWeights) -> torch.Tensor:
    """Stage 2 as the reference's (h1 = relu(h1_partial + enc0_bias), then the four convs),
    the convs on the kernel (``casa::cpu_bottleneck``): h5 in h1_partial's dtype, the head's
    accumulation dtype."""
    h1 = torch.relu(h1_partial + w.enc0_bias.to(h1_partial.dtype)[:, None])
    return bottleneck_activations(h1, w)[-1]


# The stages for variate parallelism, all on the kernel: head partial sums, the
# N-independent bottleneck (O(B·D²)) and the tail. The tail's col_max is the kernel's shift
# (1 + the max of x over a block of 64 rows), an upper bound of the scores' maximum; col_sum
# is taken relative to it, so the log-sum-exp merge holds. Their backward is the kernel's
# (cpu_stages_backward).
STAGES = Stages(_head_partial, _bottleneck, _tail_stats, _tail_output, STAGES_BACKWARD)


def block_epilogue(
    y: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    mlp0_weight: torch.Tensor,
    mlp0_bias: torch.Tensor,
    mlp2_weight: torch.Tensor,
    mlp2_bias: torch.Tensor,
    relu_out: bool,
) -> torch.Tensor:
    """``LN(relu(z W1ᵀ + b1) W2ᵀ + b2 + z)`` with ``z = LN(y)``, then ReLU if ``relu_out``:
    the official block after its attention, fused (csrc/cpu/block_epilogue.cpp). One
    LayerNorm (``norm_weight``, ``norm_bias``, ``eps``) twice; W1, b1 = ``mlp0_*`` and
    W2, b2 = ``mlp2_*`` in ``nn.Linear``'s layout.

    ``y: [..., D]`` float32 or bfloat16 on the CPU, the parameters in y's dtype. No autograd:
    for inference (the module falls back to eager PyTorch where gradients are due). The
    backend's ``block_epilogue`` capability (registry.BlockEpilogue).
    """
    kernels = _kernels()
    tier = bf16_gemm_tier() if y.dtype == torch.bfloat16 else "none"
    prepared = cached(
        f"cpu.mlp.{y.dtype}.{tier}",
        (mlp0_weight, mlp2_weight),
        lambda: kernels.cpu_prepare_mlp(mlp0_weight, mlp2_weight, tier),
    )
    out = kernels.cpu_block_epilogue(
        y.reshape(-1, y.shape[-1]).contiguous(),
        norm_weight,
        norm_bias,
        eps,
        prepared,
        mlp0_bias,
        mlp2_bias,
        tier,
        relu_out,
    )
    return out.view(y.shape)


register_backend(
    Backend(
        name="cpu",
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float64, torch.bfloat16}),
        forward=_forward,
        unavailable_reason=lambda: kernel_missing_reason("CPU", _MISSING_HINT),
        auto_priority={"cpu": 1},
        stages=STAGES,
        block_epilogue=BlockEpilogue(frozenset({torch.float32, torch.bfloat16}), block_epilogue),
        fused_backward=FUSED_BACKWARD,
    )
)
