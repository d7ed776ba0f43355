"""The backend's stages of the op (docs/design.md §5.5, §12), chosen for a variate-parallel forward and made differentiable.

The reference stages are plain PyTorch: autograd sees through them. A fused backend's
stages are wrapped so that their forward is the backend's and their backward
differentiates the reference recomputed from the saved inputs (the gradients are the
reference's): the path for a backend without its own backward of the stages
(``Stages.backward``, kept on the wrapped stages; §12.4), and for the calls that one does
not serve. A backend without stages falls back to the reference stages with one warning.

The tail statistics need care: a backend may return any shift ``m`` at least the column
maximum (the cpu kernel returns a bound from x), with ``l = Σ_N exp(s − m)``. They are used
only through the merge's ``l·exp(m − M)``, whose derivative with respect to the scores is
``exp(s − M)`` whatever m is; so the wrapped ``tail_stats`` returns m without gradient and
differentiates ``Σ_N exp(s − m)`` of the reference scores with m held at the backend's value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ..ops.registry import Stages, get_backend, resolve_backend
from ..reference.stages import scores as reference_scores
from ..weights import ScoreAttentionWeights

REFERENCE = "reference"


def _reference_gradients(
    reference: Callable,
    inputs: Sequence[torch.Tensor],
    needs: Sequence[bool],
    grads: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """The vector-Jacobian product of ``reference(*inputs)`` with ``grads``, for the inputs flagged in ``needs``."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        outputs = reference(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grads)
            if out.requires_grad and grad is not None
        ]
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        found = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if wanted and pairs
            else ()
        )
    return tuple(next(found, None) if need else None for need in needs)


class _StageWithReferenceGradient(torch.autograd.Function):
    """``fast(*inputs)`` forward; backward through ``reference(*inputs)`` recomputed (same signature)."""

    @staticmethod
    def forward(ctx, fast: Callable, reference: Callable, *inputs: torch.Tensor):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        return fast(*inputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        needs = ctx.needs_input_grad[2:]
        return (None, None, *_reference_gradients(ctx.reference, ctx.saved_tensors, needs, grads))


class _TailStatsWithReferenceGradient(torch.autograd.Function):
    """``fast`` tail_stats forward, ``(m, l)``; m has no gradient, l's is that of the reference
    ``Σ_N exp(s − m)`` with m held constant (see the module docstring)."""

    @staticmethod
    def forward(ctx, fast: Callable, x, h5, dec2_weight, dec2_bias):
        col_max, col_sum = fast(x, h5, dec2_weight, dec2_bias)
        ctx.save_for_backward(x, h5, dec2_weight, dec2_bias, col_max)
        ctx.mark_non_differentiable(col_max)
        return col_max, col_sum

    @staticmethod
    def backward(ctx, _grad_max: torch.Tensor, grad_sum: torch.Tensor):
        *inputs, col_max = ctx.saved_tensors

        def shifted_sum(x, h5, dec2_weight, dec2_bias):
            s = reference_scores(x, h5, dec2_weight, dec2_bias)
            return torch.exp(s - col_max.to(s.dtype)[:, None]).sum(dim=1)

        needs = ctx.needs_input_grad[1:]
        return (None, *_reference_gradients(shifted_sum, inputs, needs, (grad_sum,)))


def _flat_bottleneck(bottleneck: Callable) -> Callable:
    """``bottleneck(h1, w)`` as a function of tensors only: ``(h1, *w)``."""
    return lambda h1, *w: bottleneck(h1, ScoreAttentionWeights(*w))


def with_reference_gradient(fast: Stages) -> Stages:
    """``fast`` with every stage's backward taken from the reference (same signatures)."""
    ref = get_backend(REFERENCE).stages
    flat_fast, flat_ref = _flat_bottleneck(fast.bottleneck), _flat_bottleneck(ref.bottleneck)

    def wrap(fast_fn: Callable, ref_fn: Callable) -> Callable:
        return lambda *inputs: _StageWithReferenceGradient.apply(fast_fn, ref_fn, *inputs)

    wrapped_bottleneck = wrap(flat_fast, flat_ref)
    return Stages(
        head_partial=wrap(fast.head_partial, ref.head_partial),
        bottleneck=lambda h1, w: wrapped_bottleneck(h1, *w),
        tail_stats=lambda *inputs: _TailStatsWithReferenceGradient.apply(fast.tail_stats, *inputs),
        tail_output=wrap(fast.tail_output, ref.tail_output),
        backward=fast.backward,
    )


def _differentiable_stages(name: str) -> Stages:
    stages = get_backend(name).stages
    return stages if name == REFERENCE else with_reference_gradient(stages)


def resolve_stages(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Stages]:
    """The name of the backend whose stages serve ``dtype`` on ``device``, and those stages.

    ``backend`` is resolved as for the op (``"auto"``, ``CASA_BACKEND``, errors listing the
    reasons); a backend without stages falls back to the reference stages with a warning.
    """
    chosen = resolve_backend(backend, device, dtype)
    if chosen.stages is None:
        warnings.warn(
            f"casa_kernels.distributed: backend {chosen.name!r} has no stages (the op split for "
            f"variate parallelism); the variate-parallel forward runs the reference stages",
            stacklevel=3,
        )
        return REFERENCE, _differentiable_stages(REFERENCE)
    return chosen.name, _differentiable_stages(chosen.name)
