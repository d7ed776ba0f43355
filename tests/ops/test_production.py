"""The production inference contract (docs/design.md §11) on every backend that runs here.

Backends are taken from the registry: every one that serves float32 tensors on this
machine's devices (the CPU always, with the Triton interpreter when it is on; CUDA
where there is a GPU). Each test compares against the reference.
"""

import contextlib

import pytest
import torch

import casa_kernels as ck
from casa_kernels import reference
from casa_kernels.ops import weight_cache
from casa_kernels.ops.registry import backend_names, get_backend
from casa_kernels.tolerance import LOW_PRECISION_EPS, compare, compare_gradient

from ..conftest import make_problem

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [
    pytest.param(name, device, id=f"{name}-{device}")
    for device in DEVICES
    for name in backend_names()
    if get_backend(name).reason_not_serving(torch.device(device), torch.float32) is None
]
# Shapes: N past one 64-row CPU tail block and one Triton N tile, ragged everywhere.
NONFINITE_SHAPE = (2, 70, 32, 3)


def _autocast_dtypes(name, device, *, on_cpu_too=False):
    """The low-precision autocast dtypes ``name`` serves on ``device``: bfloat16, and float16
    on a GPU (and on the CPU too with ``on_cpu_too``)."""
    dtypes = [torch.bfloat16] + ([torch.float16] if device == "cuda" or on_cpu_too else [])
    return [
        d for d in dtypes if get_backend(name).reason_not_serving(torch.device(device), d) is None
    ]


def _pattern(y):
    return y.isnan(), torch.where(y.isinf(), y, torch.zeros_like(y))


def _assert_same_nonfinite_pattern(out, expected):
    nan, inf = _pattern(out.float().cpu())
    nan_ref, inf_ref = _pattern(expected.float().cpu())
    assert torch.equal(nan, nan_ref), (
        f"NaN at {int(nan.sum())} positions, the reference at {int(nan_ref.sum())}; "
        f"{int((nan != nan_ref).sum())} differ"
    )
    assert torch.equal(inf, inf_ref), f"{int((inf != inf_ref).sum())} positions differ in ±inf"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_matches_the_reference_under_the_same_autocast(backend, device):
    for dtype in _autocast_dtypes(backend, device):
        x, w = make_problem(3, 37, 64, 3, device=device)
        with torch.autocast(device, dtype=dtype):
            out = ck.casa_attention(x, w, backend=backend)
            ref = ck.casa_attention(x, w, backend="reference")
        assert out.shape == x.shape
        # Both against the float64 reference of the autocast-cast inputs, by the dtype rule.
        x_low, w_low = x.to(dtype), w.to(dtype)
        for name, y in (("ours", out), ("reference under autocast", ref)):
            result = compare(y.to(dtype), x_low, w_low)
            assert result.passed, f"{name} ({dtype}): {result}"


@contextlib.contextmanager
def _attention_backend(model, backend):
    """Runs ``model``'s attention on ``backend`` while active."""
    attentions = [m for m in model.modules() if isinstance(m, ck.CASAAttention)]
    previous = [m.backend for m in attentions]
    for m in attentions:
        m.backend = backend
    try:
        yield model
    finally:
        for m, name in zip(attentions, previous):
            m.backend = name


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_of_the_model_matches_the_reference_model(backend, device):
    torch.manual_seed(0)
    model = ck.CASAModel(
        n_vars=21, d_model=32, seq_len=24, pred_len=12, e_layers=2, backend=backend
    )
    model = model.to(device)
    x = torch.randn(4, 24, 21, device=device)
    with torch.no_grad():
        with _attention_backend(model, "reference"):
            exact = model.double()(x.double()).float()
        model.float()
        for dtype in _autocast_dtypes(backend, device):
            with torch.autocast(device, dtype=dtype):
                ours = model(x)
                with _attention_backend(model, "reference"):
                    ref = model(x)
            # Within twice the reference's own autocast error, plus the dtype's eps.
            bound = 2 * (ref.float() - exact).abs() + LOW_PRECISION_EPS[dtype]
            assert bool(((ours.float() - exact).abs() <= bound).all()), (
                f"{dtype}: max error {(ours.float() - exact).abs().max():.3g}, "
                f"the reference's {(ref.float() - exact).abs().max():.3g}"
            )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_module_under_autocast_dtypes_in_turn(backend, device):
    # One set of weights under each autocast dtype the backend serves, in turn, then
    # without autocast (fp32), then the first dtype again, in one process: the weight
    # casts and the backends' prepared weights are cached per dtype, and none may be
    # served to a call of another dtype. Each call against the reference under the same
    # autocast (no_grad: the cached path).
    torch.manual_seed(5)
    module = ck.CASAAttention(n_vars=20, d_model=16, backend=backend).to(device)
    x = torch.randn(2, 20, 16, device=device)
    weights = module.weights()
    low = _autocast_dtypes(backend, device, on_cpu_too=True)
    with torch.no_grad():
        for dtype in [*low, torch.float32, low[0]]:
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                out = module(x)
                ref = ck.casa_attention(x, weights, backend="reference")
            # The fused backends give the autocast dtype, the reference its own ops' dtypes.
            assert out.dtype == (ref.dtype if backend == "reference" else dtype)
            for name, y in (("ours", out), ("reference under autocast", ref)):
                result = compare(y.to(dtype), x.to(dtype), weights.to(dtype))
                assert result.passed, f"{name}, {dtype} after {low}: {result}"


def test_autocast_casts_each_weight_once_per_version():
    x, w = make_problem(2, 7, 16, 3)
    weight_cache.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ck.casa_attention(x, w, backend="cpu")
        first = weight_cache.cache_bytes()["cpu"]
        ck.casa_attention(x, w, backend="cpu")
        assert weight_cache.cache_bytes()["cpu"] == first
    assert first >= sum(t.numel() * 2 for t in w)  # the bfloat16 copies at least
    with torch.no_grad():
        w.value_bias.add_(1.0)  # a new version: prepared again, the old entry replaced
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ck.casa_attention(x, w, backend="cpu")
    assert weight_cache.cache_bytes()["cpu"] == first
    assert compare(out, x.bfloat16(), w.to(torch.bfloat16)).passed


def test_direct_op_call_under_autocast_runs_in_the_autocast_dtype():
    x, w = make_problem(2, 7, 16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.casa.score_attention(x, *w, "reference")
    assert y.dtype == torch.bfloat16
    result = compare(y, x.bfloat16(), w.to(torch.bfloat16))
    assert result.passed, result


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"]
)
def test_non_finite_input_gives_the_reference_pattern(backend, device, value):
    x, w = make_problem(*NONFINITE_SHAPE, device=device)
    B, N, D, _ = NONFINITE_SHAPE
    # A corner, an interior element past the first row block, the last element; a whole
    # column of one row block's worth of -inf/inf in one variate range.
    for index in [(0, 0, 0), (1, 66, 7), (B - 1, N - 1, D - 1)]:
        bad = x.clone()
        bad[index] = value
        expected = reference.score_attention(bad, w)
        _assert_same_nonfinite_pattern(ck.casa_attention(bad, w, backend=backend), expected)
    bad = x.clone()
    bad[0, 64:, 3] = value  # every row of the last (6-row) CPU tail block in one column
    _assert_same_nonfinite_pattern(
        ck.casa_attention(bad, w, backend=backend), reference.score_attention(bad, w)
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_any_weight_gives_the_reference_pattern(backend, device):
    _check_nan_in_every_weight(backend, device, torch.float32)


def test_nan_in_any_weight_gives_the_reference_pattern_in_bfloat16_on_cpu():
    # bfloat16 weights with a NaN must take the cpu backend's route to the reference too
    # (finite_weights): its bfloat16 bottleneck (AMX, avx512_bf16) multiplies padding zeros
    # by the weights, exact for finite weights only (csrc/cpu/channels_last.h).
    _check_nan_in_every_weight("cpu", "cpu", torch.bfloat16)


def _check_nan_in_every_weight(backend, device, dtype):
    x, w = make_problem(*NONFINITE_SHAPE, device=device, dtype=dtype)
    for i, name in enumerate(w._fields):
        for position in (0, w[i].numel() // 2, w[i].numel() - 1):
            tensors = list(w)
            tensors[i] = tensors[i].clone()
            tensors[i].view(-1)[position] = float("nan")
            bad = ck.ScoreAttentionWeights(*tensors)
            out = ck.casa_attention(x, bad, backend=backend)
            try:
                _assert_same_nonfinite_pattern(out, reference.score_attention(x, bad))
            except AssertionError as error:
                raise AssertionError(f"NaN in {name}[{position}]: {error}") from None


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_returns_an_empty_result(backend, device):
    _, w = make_problem(1, 5, 16, 3, device=device)
    x = torch.empty(0, 5, 16, device=device)
    out = ck.casa_attention(x, w, backend=backend)
    assert out.shape == (0, 5, 16) and out.dtype == x.dtype and out.device == x.device
    model = ck.CASAModel(n_vars=5, d_model=16, seq_len=12, pred_len=4, e_layers=1, backend=backend)
    assert model.to(device)(torch.empty(0, 12, 5, device=device)).shape == (0, 4, 5)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 0, 16), r"x: expected non-zero sizes after the batch dim"),
        ((2, 5, 0), r"x: expected non-zero"),
    ],
)
def test_zero_variates_or_features_stay_errors(shape, match):
    _, w = make_problem(1, 5, 16, 3)
    with pytest.raises(ValueError, match=match):
        ck.casa_attention(torch.empty(shape), w)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_training_under_autocast_matches_the_reference_under_the_same_autocast(backend, device):
    # The gradients of x and of every fp32 weight through the autocast casts, against the
    # float64 reference of the cast inputs, by the low-precision gradient rule (the
    # reference under the same autocast gives the same-dtype error).
    for dtype in _autocast_dtypes(backend, device):
        x, w = make_problem(2, 37, 64, 3, device=device)
        g = torch.Generator().manual_seed(3)
        grad_y = torch.randn(x.shape, generator=g).to(device)
        grads = {}
        for name in (backend, "reference"):
            leaves = [t.clone().requires_grad_(True) for t in (x, *w)]
            with torch.autocast(device, dtype=dtype):
                y = ck.casa_attention(
                    leaves[0], ck.ScoreAttentionWeights(*leaves[1:]), backend=name
                )
            # the reference's own ops choose their autocast dtypes (softmax: fp32)
            assert y.dtype == dtype or name == "reference"
            y.backward(grad_y.to(y.dtype))
            grads[name] = [t.grad for t in leaves]
        # float64 gradients of the op at the autocast-cast inputs
        leaves64 = [t.to(dtype).double().requires_grad_(True) for t in (x, *w)]
        y64 = reference.score_attention(leaves64[0], ck.ScoreAttentionWeights(*leaves64[1:]))
        y64.backward(grad_y.to(dtype).double())
        names = ("x", *ck.ScoreAttentionWeights._fields)
        for name, ours, ref, ref64 in zip(names, grads[backend], grads["reference"], leaves64):
            assert ours.dtype == torch.float32  # back through the cast to the fp32 leaf
            result = compare_gradient(ours.to(dtype), ref64.grad, ref.to(dtype))
            assert result.passed, f"{backend} {dtype} d{name}: {result}"
