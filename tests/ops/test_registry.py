"""Dispatch (docs/design.md §6): auto choice, CASA_BACKEND, errors listing reasons, one fallback warning."""

import subprocess
import sys
import warnings

import pytest
import torch

import casa_kernels as ck
from casa_kernels import casa_attention, reference
from casa_kernels.ops import extension, registry

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


def _fake_backend(name, **fields):
    return registry.Backend(
        **{
            "name": name,
            "device_types": frozenset({"cpu"}),
            "dtypes": frozenset({torch.float32}),
            "forward": reference.score_attention,
            "unavailable_reason": lambda: None,
            **fields,
        }
    )


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry with its real backends, restored after the test."""
    monkeypatch.delenv("CASA_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_warned", set())


def test_auto_order_comes_from_the_backends_priorities():
    assert registry.auto_order("cuda") == ["triton", "cuda", "reference"]
    assert registry.auto_order("cpu") == ["cpu", "reference"]
    assert registry.auto_order("mps") == ["reference"]


def test_a_registered_backend_joins_auto_by_its_priority(scratch_registry):
    registry.register_backend(_fake_backend("fast", auto_priority={"cpu": 5}))
    assert registry.auto_order("cpu") == ["fast", "cpu", "reference"]
    assert registry.resolve_backend("auto", CPU, torch.float32).name == "fast"
    assert "fast" in registry.backend_names()


def test_shape_limits_are_checked_before_dispatch(scratch_registry, problem):
    def limits(shape):
        return f"at most 100 variates, not {shape.n_vars}" if shape.n_vars > 100 else None

    registry.register_backend(
        _fake_backend("narrow", auto_priority={"cpu": 5}, shape_limits=limits)
    )
    backend = registry.get_backend("narrow")
    small, large = registry.ProblemShape(2, 100, 16, 3), registry.ProblemShape(2, 101, 16, 3)
    assert backend.reason_not_serving(CPU, torch.float32) is None  # no shape: not checked
    assert backend.reason_not_serving(CPU, torch.float32, small) is None
    assert backend.reason_not_serving(CPU, torch.float32, large) == "at most 100 variates, not 101"
    # auto skips it for the large shape; by name it raises with every reason.
    assert registry.resolve_backend("auto", CPU, torch.float32, small).name == "narrow"
    assert registry.resolve_backend("auto", CPU, torch.float32, large).name == "cpu"
    with pytest.raises(RuntimeError, match=r"of shape \[2, 101, 16\] \(kernel 3\) on cpu") as info:
        registry.resolve_backend("narrow", CPU, torch.float32, large)
    assert "  narrow: at most 100 variates, not 101" in str(info.value)
    # The op's kernel passes the shape of its inputs.
    x, w = problem(1, 101, 16, 3)
    with pytest.raises(RuntimeError, match="narrow: at most 100 variates"):
        torch.ops.casa.score_attention(x, *w, "narrow")


def test_auto_passes_over_a_backend_past_its_shape_limits_through_the_public_api(
    scratch_registry, problem
):
    # One resolution per call, with the shape: casa_attention, the modules and the
    # compiled module all run "narrow" where it serves the shape and "cpu" where not.
    served = []

    def narrow_forward(x, w):
        served.append(x.shape[1])
        return reference.score_attention(x, w)

    registry.register_backend(
        _fake_backend(
            "narrow",
            auto_priority={"cpu": 5},
            forward=narrow_forward,
            shape_limits=lambda s: "at most 8 variates" if s.n_vars > 8 else None,
        )
    )
    for n_vars in (8, 9):
        x, w = problem(2, n_vars, 16, 3)
        expected = reference.score_attention(x, w)
        torch.testing.assert_close(ck.casa_attention(x, w), expected, rtol=2e-5, atol=2e-5)
        block = ck.CASABlock(n_vars=n_vars, d_model=16)
        with torch.no_grad():
            block(x)
        block(x).sum().backward()  # through the op's autograd
        torch.compile(ck.CASAAttention(n_vars=n_vars, d_model=16), fullgraph=True)(x)
    assert served == [8, 8, 8, 8]


def test_problem_shape_of_a_call(problem):
    x, w = problem(2, 5, 16, 3)
    assert registry.ProblemShape.of(x, w) == (2, 5, 16, 3)
    assert registry.ProblemShape.of(x[0], w) is None  # rank errors are left to validation


def test_cuda_backend_reports_the_kernels_shape_limits(monkeypatch):
    # The limits themselves are the kernels' (tests/ops/test_cuda_emulation.py checks
    # them on the host); the backend forwards casa::cuda_shape_limits' answer.
    cuda = registry.get_backend("cuda")
    asked = []

    def limits(*shape):
        asked.append(shape)
        return "batch too large for a one-dimensional grid" if shape[0] > 100 else ""

    monkeypatch.setattr(torch.ops.casa, "cuda_shape_limits", limits, raising=False)
    assert cuda.shape_limits(registry.ProblemShape(16, 862, 512, 3)) is None
    assert cuda.shape_limits(registry.ProblemShape(101, 862, 512, 3)) == (
        "exceeds the CUDA kernels' limits (batch too large for a one-dimensional grid)"
    )
    assert cuda.shape_limits(registry.ProblemShape(0, 862, 512, 3)) is None  # launches nothing
    assert asked == [(16, 862, 512, 3), (101, 862, 512, 3)]


def test_cuda_shape_limits_op_of_a_cuda_build():
    extension.extension_error()  # loads the extension's ops, if built
    if not hasattr(torch.ops.casa, "cuda_shape_limits"):
        pytest.skip("the extension was built without its CUDA kernels")
    cuda = registry.get_backend("cuda")
    assert cuda.shape_limits(registry.ProblemShape(16, 862, 512, 3)) is None
    assert "32-bit" in cuda.shape_limits(registry.ProblemShape(1, 1 << 30, 8, 3))
    assert "grid" in cuda.shape_limits(registry.ProblemShape(1 << 30, 8, 512, 3))


def test_the_op_is_dispatched_where_autograd_or_a_mode_needs_it(problem, monkeypatch):
    # Eager inference on plain tensors calls the backend directly; autograd and dispatch
    # modes (FakeTensor, FlopCounterMode, ...) need the op itself.
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class CountedOp:  # the op packet, counting calls (its overloads stay reachable)
        def __call__(self, *args):
            dispatched.append(1)
            return real_op(*args)

        def __getattr__(self, name):
            return getattr(real_op, name)

    real_op, dispatched, seen = torch.ops.casa.score_attention, [], []
    monkeypatch.setattr(torch.ops.casa, "score_attention", CountedOp())
    x, w = problem(2, 5, 16, 3)
    with torch.no_grad():
        direct = casa_attention(x, w, backend="cpu")
        assert dispatched == []
        with OpLog():
            logged = casa_attention(x, w, backend="cpu")
        assert dispatched == [1] and "casa.score_attention.default" in seen
    x.requires_grad_(True)
    with_grad = casa_attention(x, w, backend="cpu")
    assert dispatched == [1, 1] and with_grad.requires_grad
    torch.testing.assert_close(logged, direct, rtol=0, atol=0)
    torch.testing.assert_close(with_grad.detach(), direct, rtol=0, atol=0)


def test_info_answers_help_and_rejects_unknown_flags():
    command = [sys.executable, "-m", "casa_kernels.info"]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "usage: python -m casa_kernels.info" in shown.stdout
    assert "backend cpu" not in shown.stdout  # help only, not the report
    wrong = subprocess.run([*command, "--bogus"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unrecognized arguments: --bogus" in wrong.stderr


def test_a_first_call_failing_inside_a_cuda_graph_capture_says_to_warm_up(
    scratch_registry, monkeypatch
):
    # Without a GPU: a CUDA-like tensor on the meta device stands in, and a backend that
    # fails the way a host synchronisation fails during capture.
    from casa_kernels.ops import score_attention

    def syncs(x, w):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    backend = _fake_backend("syncing", forward=syncs)
    x = torch.empty(2, 4, 16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"'syncing' backend failed inside a CUDA graph") as info:
        score_attention._forward_on(backend, x, None)
    assert "run one call outside the capture first (a warm-up)" in str(info.value)
    assert "operation not permitted" in str(info.value)
