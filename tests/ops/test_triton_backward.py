"""The triton backend's fused backward (casa_kernels/ops/triton_kernels/backward*.py,
casa_kernels/ops/backends/triton_backward.py, docs/design.md §5.9) against autograd through
the reference: every input's gradient at ragged shapes, each gradient alone and in groups
(and the launches and convolutions it skips), NaN/inf in x, what is saved for the backward,
determinism, and the error on double backward.

Without a GPU the kernels run under the Triton interpreter (conftest), with tiles of 16
rows (``BACKWARD_BLOCK_N``) by 32 columns: the shapes put N below one tile, at a tile
multiple and past several tiles, and D below, at and past the column tile.
Shapes: (batch, n_vars, d_model, kernel).
"""

from __future__ import annotations

import os

import pytest
import torch

from casa_kernels.tolerance import compare_gradient
from tests.conftest import make_problem
from tests.ops import gradients
from tests.ops.gradients import FIELDS

pytest.importorskip("triton", reason="triton is not installed")
CUDA = torch.cuda.is_available()
if not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip(
        "needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1)",
        allow_module_level=True,
    )

from casa_kernels.ops.triton_kernels import launch as tk  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {
    "N<tile,D=8,k=1": (1, 5, 8, 1),
    "N=16+3,D=32,k=3": (3, 19, 32, 3),
    "N=3x16+5,D=40,k=5": (1, 53, 40, 5),
    "N<tile,D=16,k=7": (3, 9, 16, 7),
    "N=2x16,D=24,k=3": (1, 32, 24, 3),
}
# The convolutions below h5 from the top down, with the inputs whose gradient needs each.
LAYERS = {
    "dec2": ("dec2_weight", "dec2_bias"),
    "dec1": ("dec1_weight", "dec1_bias"),
    "dec0": ("dec0_weight", "dec0_bias"),
    "enc2": ("enc2_weight", "enc2_bias"),
    "enc1": ("enc1_weight", "enc1_bias"),
    "enc0": ("x", "enc0_weight", "enc0_bias"),
}


def _problem(shape, dtype=torch.float32, seed=0):
    return make_problem(*shape, dtype=dtype, device=DEVICE, seed=seed)


def _op(leaves):
    return torch.ops.casa.score_attention(*leaves, "triton")


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched while the test runs, in order."""
    seen = []
    real = tk._launch

    def counting(kernel, grid, *args, **kwargs):
        seen.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tk, "_launch", counting)
    return seen


BACKWARD_KERNELS = ("_tail_colsum_kernel", "_colsum_merge_kernel", "_tail_grads_kernel")


def _cases():
    cases = [
        pytest.param(shape, torch.float32, id=f"{name}-fp32") for name, shape in SHAPES.items()
    ]
    for name in ("N=16+3,D=32,k=3", "N=3x16+5,D=40,k=5"):
        cases.append(pytest.param(SHAPES[name], torch.bfloat16, id=f"{name}-bf16"))
    cases.append(pytest.param(SHAPES["N<tile,D=16,k=7"], torch.float16, id="N<tile,D=16,k=7-fp16"))
    return cases


@pytest.mark.parametrize("shape,dtype", _cases())
def test_every_gradient_matches_the_float64_reference(launches, shape, dtype):
    x, w = _problem(shape, dtype, seed=3)
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    y = _op(leaves)
    del launches[:]
    ours = torch.autograd.grad(y, leaves, grad)
    assert tuple(launches) == BACKWARD_KERNELS  # the fused backward ran, not the reference's
    ref64 = gradients.reference_grads((x, *w), grad, torch.float64)
    same = gradients.reference_grads((x, *w), grad, dtype) if dtype != torch.float32 else ref64
    for name, got, want, want_dtype in zip(FIELDS, ours, ref64, same):
        assert got.dtype == dtype and got.shape == want.shape, name
        result = compare_gradient(got, want, want_dtype)
        assert result.passed, f"{name}: max abs {result.max_abs_error:.3g} ({result.rule})"


def _expected_work(wanted) -> tuple[tuple[str, ...], list[str]]:
    """The Triton launches and the convolutions' backwards (top down) the gradients
    ``wanted`` need: the tail's column sums only where ds is (x or a score-network
    weight), each convolution from dec2 down to the lowest one wanted."""
    names = list(LAYERS)
    needed = [i for i, name in enumerate(names) if set(LAYERS[name]) & set(wanted)]
    layers = names[: needed[-1] + 1] if needed else []
    wants_ds = bool(layers) or "x" in wanted
    return (BACKWARD_KERNELS if wants_ds else BACKWARD_KERNELS[-1:]), layers


@pytest.mark.parametrize(
    "wanted", gradients.subsets(), ids=lambda s: "+".join(s) if len(s) < 4 else "weights"
)
def test_each_subset_of_gradients_costs_only_what_it_needs(launches, wanted):
    x, w = _problem((2, 19, 16, 3), seed=4)
    grad = gradients.grad_out(x)
    leaves = [t.detach().clone().requires_grad_(name in wanted) for name, t in zip(FIELDS, (x, *w))]
    y = _op(leaves)
    del launches[:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], grad)
    ran = [event.name.removeprefix("casa::triton backward ") for event in prof.events()]
    assert (tuple(launches), [name for name in ran if name in LAYERS]) == _expected_work(wanted)
    ref = gradients.reference_grads((x, *w), grad, torch.float64, wanted)
    for name, got, want in zip([n for n in FIELDS if n in wanted], ours, ref):
        result = compare_gradient(got, want)
        assert result.passed, f"{name}: max abs {result.max_abs_error:.3g} ({result.rule})"


def _pattern(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


NONFINITE = {
    "nan": [((0, 3, 5), float("nan"))],
    "inf": [((1, 17, 7), float("inf"))],
    "-inf": [((0, 10, 0), float("-inf"))],
    "mixed": [((0, 3, 5), float("nan")), ((1, 17, 7), float("inf")), ((1, 2, 15), float("-inf"))],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_x_gives_the_references_gradient_pattern(values, dtype):
    # Against the reference's autograd in float64, the definition.
    x, w = _problem((2, 19, 16, 3), dtype, seed=7)
    x = x.clone()
    for index, value in values:
        x[index] = value
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    ours = torch.autograd.grad(_op(leaves), leaves, grad)
    ref = gradients.reference_grads((x, *w), grad, torch.float64)
    for name, got, want in zip(FIELDS, ours, ref):
        got, want = got.double().cpu(), want.cpu()
        for got_mask, want_mask in zip(_pattern(got), _pattern(want)):
            assert torch.equal(got_mask, want_mask), f"{name}: non-finite pattern differs"
        finite = torch.isfinite(want)
        if not finite.any():  # NaN in x reaches every gradient through the head
            continue
        scale = want[finite].abs().max()
        assert (got[finite] - want[finite]).abs().max() <= 2e-2 * scale, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_no_batch_sized_intermediate(dtype):
    # Saved besides x and the weights: h1, enc1's, enc2's, dec0's outputs (x's dtype) and h5
    # (fp32), D²/8 elements each per batch element, and the column statistics (fp32, 2·B·D).
    batch, n_vars, d_model = 2, 19, 16
    x, w = _problem((batch, n_vars, d_model, 3), dtype, seed=8)
    leaves = gradients.leaves((x, *w))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _op(leaves)
    inputs = {t.data_ptr() for t in leaves}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert len(saved) == len(leaves) + len(extra) == len(leaves) + 7
    assert all(t.shape != x.shape for t in extra)
    activation = batch * d_model**2 // 8
    size = x.element_size()
    expected = 4 * activation * size + activation * 4 + 2 * batch * d_model * 4
    assert sum(t.numel() * t.element_size() for t in extra) == expected


def test_gradients_are_deterministic():
    # The column sums are merged over the N tiles in tile order, without atomics.
    x, w = _problem((1, 53, 40, 5), seed=11)
    grad = gradients.grad_out(x)
    runs = []
    for _ in range(2):
        leaves = gradients.leaves((x, *w))
        runs.append(torch.autograd.grad(_op(leaves), leaves, grad))
    for name, first, second in zip(FIELDS, *runs):
        assert torch.equal(first, second), name


def test_double_backward_raises_naming_the_backend():
    x, w = _problem((1, 5, 8, 3), seed=9)
    leaves = gradients.leaves((x, *w))
    y = _op(leaves)
    with pytest.raises(RuntimeError, match=r"double backward.*triton backend"):
        torch.autograd.grad(y.sum(), leaves[0], create_graph=True)


def test_nonfinite_weights_use_the_references_backward(launches):
    # The forward hands NaN weights to the reference; so does the backward.
    x, w = _problem((2, 9, 16, 3), seed=10)
    w = w._replace(
        enc1_weight=w.enc1_weight.clone().index_fill_(
            0, torch.tensor([1], device=DEVICE), float("nan")
        )
    )
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    ours = torch.autograd.grad(_op(leaves), leaves, grad)
    assert not set(launches) & set(BACKWARD_KERNELS)
    for name, got, want in zip(
        FIELDS, ours, gradients.reference_grads((x, *w), grad, torch.float32)
    ):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_backward_is_capturable_in_a_cuda_graph():
    x, w = _problem((2, 70, 64, 3), seed=12)
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    eager = torch.autograd.grad(_op(leaves), leaves, grad)  # warm-up: tuning, packing
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.autograd.grad(_op(leaves), leaves, grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.autograd.grad(_op(leaves), leaves, grad)
    graph.replay()
    torch.cuda.synchronize()
    for name, want, got in zip(FIELDS, eager, captured):
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}")
