"""The op ``casa::score_attention`` and the functional entry point ``casa_attention``.

Schema (defined once, here, so that it exists without a compiled extension)::

    casa::score_attention(Tensor x, Tensor value_weight, Tensor value_bias,
                          Tensor enc0_weight, ..., Tensor dec2_bias, str backend) -> Tensor

The weights come in the order of :class:`~casa_kernels.weights.ScoreAttentionWeights`.
One kernel, registered for every device, hands the call to the named backend of the
registry (raising, with every backend's reason, if it cannot serve the input); the fake kernel gives ``empty_like(x)``; the backward recomputes the
reference from the saved inputs (only the inputs are saved), so every backend's
gradients are the reference's.
"""

from __future__ import annotations

import torch

from .. import reference
from ..validation import check_attention_input, check_weights
from ..weights import ScoreAttentionWeights
from .registry import ProblemShape, resolve_backend

OP_NAME = "casa::score_attention"
_FIELDS = ScoreAttentionWeights._fields

torch.library.define(
    OP_NAME,
    "(Tensor x, " + ", ".join(f"Tensor {f}" for f in _FIELDS) + ", str backend) -> Tensor",
)


@torch.library.register_kernel(OP_NAME, None)
def _score_attention_kernel(x: torch.Tensor, *weights_and_backend) -> torch.Tensor:
    *weights, backend = weights_and_backend
    weights = ScoreAttentionWeights(*weights)
    shape = ProblemShape.of(x, weights)
    return resolve_backend(backend, x.device, x.dtype, shape).forward(x, weights)


@torch.library.register_fake(OP_NAME)
def _score_attention_fake(x: torch.Tensor, *weights_and_backend) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:-1])


def _backward(ctx, grad_output: torch.Tensor):
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[: len(saved)]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip(saved, needs)]
        out = reference.score_attention(leaves[0], ScoreAttentionWeights(*leaves[1:]))
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_output) if wanted else ())
    return (*(next(grads) if need else None for need in needs), None)


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


def casa_attention(
    x: torch.Tensor, weights: ScoreAttentionWeights, *, backend: str = "auto"
) -> torch.Tensor:
    """CASA attention: ``softmax_over_N(score(x)) * (x Wvᵀ + bv) + x``.

    Args:
        x: ``[B, N, D]`` floating tensor; N = ``weights.n_vars``, D = ``weights.d_model``.
        weights: the 14 parameters, same dtype and device as ``x``.
        backend: ``"auto"`` (default; ``CASA_BACKEND`` overrides it), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, N, D]`` tensor of ``x``'s dtype, contiguous.
    """
    weights = check_weights(weights)
    x = check_attention_input(x, weights)
    chosen = _resolved_name(backend, x.device, x.dtype)
    if chosen == "reference":
        # Plain PyTorch: autograd and torch.compile see straight through it.
        return reference.score_attention(x, weights)
    return torch.ops.casa.score_attention(x, *weights, chosen)


@torch.compiler.assume_constant_result
def _resolved_name(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    # A constant for torch.compile: availability and CASA_BACKEND are fixed per process.
    return resolve_backend(backend, device, dtype).name
