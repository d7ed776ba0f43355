"""What the tests of the fused backwards (test_cpu_backward.py, test_triton_backward.py)
share: the op's inputs by name, fresh leaves, the reference's gradients by autograd, a seeded
output gradient, and the subsets of inputs asked for."""

from __future__ import annotations

import torch

from casa_kernels import ScoreAttentionWeights, reference

FIELDS = ("x", *ScoreAttentionWeights._fields)


def leaves(tensors, dtype=None):
    """Detached copies of ``tensors`` (in ``dtype`` if given) that require gradients."""
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def reference_grads(inputs, grad, dtype, wanted=FIELDS):
    """Autograd through the reference in ``dtype`` at ``inputs``, for the ``wanted`` inputs."""
    fresh = leaves(inputs, dtype)
    out = reference.score_attention(fresh[0], ScoreAttentionWeights(*fresh[1:]))
    chosen = [leaf for name, leaf in zip(FIELDS, fresh) if name in wanted]
    return torch.autograd.grad(out, chosen, grad.to(dtype))


def grad_out(x, seed=5):
    """A seeded random gradient of x's shape, dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)


def subsets() -> list[tuple[str, ...]]:
    """Sets of inputs to ask gradients for: each input alone, and some groups."""
    singles = [(name,) for name in FIELDS]
    groups = [
        ("value_weight", "value_bias"),
        ("dec2_weight", "dec2_bias"),
        ("x", "value_weight"),
        ("enc0_weight", "dec2_bias"),
        FIELDS[1:],  # every weight, not x
    ]
    return singles + groups
