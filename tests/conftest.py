"""Shared fixtures. Without a GPU, Triton kernels run on CPU tensors under the Triton
interpreter, which must be switched on before triton is first imported.

hypothesis is optional: test modules import ``given``, ``settings`` and ``st`` from here.
Without hypothesis they are stand-ins under which every ``@given`` test is skipped with
the reason, and the rest of the module is collected and runs as usual.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="auto" on the CPU without its timed probe (casa_kernels/ops/probe.py): the tests
# know which backend serves them; tests/ops/test_probe.py tests the probe itself.
os.environ["CASA_CPU_PROBE"] = "0"

import pytest  # noqa: E402

from casa_kernels import ScoreAttentionWeights  # noqa: E402


class _AnyStrategy:
    """Stands for ``hypothesis.strategies`` and every strategy built from it."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def _hypothesis_stand_ins(reason: str):
    def given(*args, **kwargs):
        return pytest.mark.skip(reason=reason)

    def settings(*args, **kwargs):
        return lambda test: test

    return given, settings, _AnyStrategy()


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError as _error:
    given, settings, st = _hypothesis_stand_ins(f"hypothesis is not installed ({_error})")


def make_problem(batch, n_vars, d_model, kernel, *, dtype=torch.float32, device="cpu", seed=0):
    """Random ``x: [batch, n_vars, d_model]`` and weights drawn like PyTorch's default init."""
    g = torch.Generator().manual_seed(seed)
    weights = ScoreAttentionWeights.random(
        n_vars, d_model, kernel, dtype=dtype, device=device, generator=g
    )
    x = torch.randn(batch, n_vars, d_model, generator=g, dtype=torch.float64).to(
        dtype=dtype, device=device
    )
    return x, weights


@pytest.fixture
def problem():
    return make_problem


@pytest.fixture
def threads():
    """Sets torch's intra-op threads for the test, restoring the caller's afterwards."""
    caller = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(caller)
