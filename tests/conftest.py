"""Shared fixtures. Without a GPU, Triton kernels run on CPU tensors under the Triton
interpreter, which must be switched on before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from casa_kernels import ScoreAttentionWeights  # noqa: E402


def make_problem(batch, n_vars, d_model, kernel, *, dtype=torch.float32, device="cpu", seed=0):
    """Random ``x: [batch, n_vars, d_model]`` and weights drawn like PyTorch's default init."""
    g = torch.Generator().manual_seed(seed)
    weights = ScoreAttentionWeights.random(n_vars, d_model, kernel, dtype=dtype, device=device, generator=g)
    x = torch.randn(batch, n_vars, d_model, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return x, weights


@pytest.fixture
def problem():
    return make_problem
