"""Every bad input a user can give raises a clear error naming the argument."""

import pytest
import torch

from casa_kernels import CASAAttention, CASABlock, CASAModel, ScoreNetwork, casa_attention
from casa_kernels.baselines import FullAttention, ITransformerModel


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_vars=3, d_model=12), ValueError, r"d_model: expected a multiple of 8.*received 12"),
        (
            dict(n_vars=3, d_model=16, kernel=4),
            ValueError,
            r"kernel: expected an odd size, received 4",
        ),
        (dict(n_vars=0, d_model=16), ValueError, r"n_vars: expected a positive int, received 0"),
        (dict(n_vars=3.0, d_model=16), TypeError, r"n_vars: expected an int, received float"),
        (dict(n_vars=3, d_model=True), TypeError, r"d_model: expected an int, received bool"),
    ],
)
@pytest.mark.parametrize("cls", [ScoreNetwork, CASAAttention])
def test_bad_constructor_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match=r"e_layers: expected a positive int, received 0"):
        CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=0)
    with pytest.raises(ValueError, match=r"n_heads: expected a divisor of d_model=8, received 3"):
        FullAttention(d_model=8, n_heads=3)
    with pytest.raises(ValueError, match=r"implementation: expected one of"):
        FullAttention(d_model=8, implementation="flash")


@pytest.fixture
def attn():
    return CASAAttention(n_vars=4, d_model=16, backend="reference")


@pytest.mark.parametrize(
    "x, error, match",
    [
        (
            torch.randn(4, 16),
            ValueError,
            r"x: expected a 3-D tensor \[batch, n_vars, d_model\], received shape \(4, 16\)",
        ),
        (
            torch.randn(2, 5, 16),
            ValueError,
            r"x: expected n_vars = 4 \(dim 1\), received shape \(2, 5, 16\)",
        ),
        (
            torch.randn(2, 4, 8),
            ValueError,
            r"x: expected d_model = 16 \(dim 2\), received shape \(2, 4, 8\)",
        ),
        (
            torch.ones(2, 4, 16, dtype=torch.int64),
            TypeError,
            r"x: expected a floating-point tensor, received dtype torch.int64",
        ),
        (torch.randn(2, 0, 16), ValueError, r"x: expected non-zero sizes after the batch dim"),
        (
            torch.randn(2, 4, 16, dtype=torch.float64),
            TypeError,
            r"x: expected dtype torch.float32 \(that of the weights\), received torch.float64",
        ),
        (
            torch.randn(2, 4, 16, device="meta"),
            ValueError,
            r"x: expected device cpu \(that of the weights\), received meta",
        ),
        ([[1.0]], TypeError, r"x: expected a torch.Tensor"),
    ],
)
def test_bad_attention_input(attn, x, error, match):
    with pytest.raises(error, match=match):
        attn(x)


def test_no_silent_broadcast_of_a_batchless_input(attn):
    with pytest.raises(ValueError, match="3-D"):
        attn(torch.randn(4, 16))


def test_bad_weights(problem):
    x, w = problem(2, 4, 16, 3)
    with pytest.raises(
        TypeError, match=r"weights: expected a ScoreAttentionWeights, received tuple"
    ):
        casa_attention(x, tuple(w))
    bad = w._replace(dec2_bias=torch.zeros(5))
    with pytest.raises(
        ValueError, match=r"weights.dec2_bias: expected shape \(4,\), received \(5,\)"
    ):
        casa_attention(x, bad)
    bad = w._replace(enc1_weight=w.enc1_weight.double())
    with pytest.raises(
        TypeError,
        match=r"weights.enc1_weight: expected dtype torch.float32 \(that of value_weight\), received torch.float64",
    ):
        casa_attention(x, bad)
    bad = w._replace(enc1_bias=torch.zeros(8, device="meta"))
    with pytest.raises(
        ValueError,
        match=r"weights.enc1_bias: expected device cpu \(that of value_weight\), received meta",
    ):
        casa_attention(x, bad)


def test_unknown_backend(problem):
    x, w = problem(1, 4, 16, 3)
    with pytest.raises(
        ValueError, match=r"backend: expected one of \['auto', .*'reference'.*\], received 'fast'"
    ):
        casa_attention(x, w, backend="fast")


@pytest.mark.parametrize(
    "build",
    [
        lambda b: CASAAttention(n_vars=3, d_model=8, backend=b),
        lambda b: CASABlock(n_vars=3, d_model=8, backend=b),
        lambda b: CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=1, backend=b),
    ],
)
def test_unknown_backend_fails_at_construction(build):
    with pytest.raises(
        ValueError, match=r"backend: expected one of \['auto', .*\], received 'cpuu'"
    ):
        build("cpuu")
    with pytest.raises(TypeError, match=r"backend: expected a str, received NoneType"):
        build(None)


def test_unknown_backend_in_the_environment_names_the_variable(problem, monkeypatch):
    x, w = problem(1, 4, 16, 3)
    monkeypatch.setenv("CASA_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"CASA_BACKEND \(environment variable.*received 'bogus'"):
        casa_attention(x, w)


def test_model_input_of_another_dtype_names_the_parameter():
    model = CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=1)
    with pytest.raises(
        TypeError,
        match=r"x: expected dtype torch.float32 \(that of model.0.weight\), received torch.float64",
    ):
        model(torch.randn(2, 12, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert model(torch.randn(2, 12, 3)).shape == (2, 4, 3)


def test_bad_model_input():
    model = CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=1)
    with pytest.raises(
        ValueError, match=r"x: expected seq_len = 12 \(dim 1\), received shape \(2, 10, 3\)"
    ):
        model(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match=r"x: expected n_vars = 3 \(dim 2\)"):
        model(torch.randn(2, 12, 4))
    baseline = ITransformerModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=1)
    with pytest.raises(ValueError, match=r"x: expected seq_len = 12"):
        baseline(torch.randn(2, 10, 3))
