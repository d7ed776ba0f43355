"""Dispatch (DESIGN §6): auto choice, CASA_BACKEND, errors listing reasons, one fallback warning."""

import subprocess
import sys
import warnings

import pytest
import torch

from casa_kernels import casa_attention, reference
from casa_kernels.ops import registry

CPU = torch.device("cpu")


def test_auto_picks_the_fused_cpu_kernel_for_cpu_float32():
    assert registry.resolve_backend("auto", CPU, torch.float32).name == "cpu"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("CASA_BACKEND", "reference")
    assert registry.resolve_backend("auto", CPU, torch.float32).name == "reference"
    # An explicit argument is not overridden.
    assert registry.resolve_backend("cpu", CPU, torch.float32).name == "cpu"


def test_unservable_explicit_backend_lists_every_reason(monkeypatch):
    monkeypatch.delenv("CASA_BACKEND", raising=False)
    with pytest.raises(RuntimeError) as info:
        registry.resolve_backend("cpu", CPU, torch.float16)
    message = str(info.value)
    assert "'cpu' cannot run a float16 tensor on cpu" in message
    for name in registry.backend_names():
        assert f"  {name}: " in message
    assert "cpu: supports dtypes ['bfloat16', 'float32', 'float64'], not float16" in message


def test_unservable_env_backend_raises(monkeypatch):
    monkeypatch.setenv("CASA_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="'cpu' cannot run a float16 tensor"):
        registry.resolve_backend("auto", CPU, torch.float16)


def test_auto_falls_back_with_one_warning(monkeypatch, problem):
    monkeypatch.delenv("CASA_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    x, w = problem(2, 3, 8, 3, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = casa_attention(x, w)
        casa_attention(x, w)
    messages = [str(c.message) for c in caught]
    assert len(messages) == 1, messages
    assert "falls back to the PyTorch reference for float16 on cpu" in messages[0]
    assert "cpu: supports dtypes" in messages[0]
    assert torch.equal(out, reference.score_attention(x, w))


def test_op_called_directly_with_unservable_backend_raises(problem):
    x, w = problem(1, 3, 8, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="'cpu' cannot run a float16 tensor"):
        torch.ops.casa.score_attention(x, *w, "cpu")


def test_import_works_without_extension_and_triton():
    # Block the compiled extension and triton, then use the package end to end.
    script = """
import sys, warnings
sys.modules["casa_kernels._C"] = None
sys.modules["triton"] = None
import torch, casa_kernels
reasons = casa_kernels.availability()
assert reasons["reference"] is None, reasons
assert "casa_kernels._C" in reasons["cpu"], reasons
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = casa_kernels.CASAAttention(n_vars=3, d_model=8)(torch.randn(2, 3, 8))
assert y.shape == (2, 3, 8)
assert any("falls back to the PyTorch reference" in str(c.message) for c in caught)
from casa_kernels import info
info.main()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "backend cpu" in result.stdout and "unavailable" in result.stdout
