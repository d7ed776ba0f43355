"""The four-stage split of the op (casa_kernels/reference/stages.py) on every backend that
has one, composed over disjoint variate ranges as a variate-parallel model composes them."""

import pytest
import torch

from casa_kernels.ops.registry import backend_names, get_backend
from casa_kernels.reference import stages as reference_stages
from casa_kernels.tolerance import compare

from ..conftest import make_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STAGED = [
    name
    for name in backend_names()
    if get_backend(name).stages is not None
    and get_backend(name).reason_not_serving(DEVICE, torch.float32) is None
]


def _ranges(n_vars, parts):
    bounds = [round(i * n_vars / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _composed(stages, x, w, ranges):
    """The op from the stages, each range of variates on its own as one rank would run it."""
    local = [
        (
            x[:, r].contiguous(),
            w.enc0_weight[:, r].contiguous(),
            w.dec2_weight[:, r].contiguous(),
            w.dec2_bias[r].contiguous(),
        )
        for r in ranges
    ]
    h1 = sum(stages.head_partial(xl, enc0) for xl, enc0, _, _ in local)  # the all-reduce
    h5 = stages.bottleneck(h1, w)
    stats = [stages.tail_stats(xl, h5, dec2, bias) for xl, _, dec2, bias in local]
    col_max, col_sum = reference_stages.merge_stats(
        torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])
    )
    parts = [
        stages.tail_output(xl, h5, dec2, bias, w.value_weight, w.value_bias, col_max, col_sum)
        for xl, _, dec2, bias in local
    ]
    return torch.cat(parts, dim=1)


STAGED_DTYPES = [
    pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
    for name in STAGED
    for dtype in (torch.float64, torch.float32, torch.bfloat16)
    if get_backend(name).reason_not_serving(DEVICE, dtype) is None
]


@pytest.mark.parametrize("backend,dtype", STAGED_DTYPES)
@pytest.mark.parametrize("parts", [1, 3])
def test_stages_over_variate_ranges_equal_the_op(backend, parts, dtype):
    # N = 150 over 3 ranges: 50 rows each, ragged against 64-row blocks and N tiles.
    x, w = make_problem(2, 150, 32, 3, dtype=dtype, device=DEVICE)
    out = _composed(get_backend(backend).stages, x, w, _ranges(150, parts))
    assert out.dtype == dtype and out.shape == x.shape
    result = compare(out, x, w)
    assert result.passed, result


@pytest.mark.parametrize("backend", STAGED)
def test_stage_statistics_merge_like_the_reference(backend):
    # col_max may be any shift at or above the scores' maximum: what must agree is the
    # merged softmax denominator relative to one shift.
    x, w = make_problem(2, 90, 16, 5, device=DEVICE)
    stages = get_backend(backend).stages
    h5 = reference_stages.bottleneck(reference_stages.head_partial(x, w.enc0_weight), w)
    col_max, col_sum = stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias)
    ref_max, ref_sum = reference_stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias)
    assert bool((col_max >= ref_max - 1e-6).all())
    torch.testing.assert_close(
        col_sum * torch.exp(col_max - ref_max), ref_sum, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", STAGED)
def test_a_minus_inf_score_has_exactly_zero_weight(backend):
    # s = -inf must give exp(s - max) = 0 exactly, not a tiny number: with Wv = I the value
    # of that element is -inf too, and 0·(-inf) is NaN in the reference where a tiny
    # weight would give -inf.
    x, w = make_problem(2, 70, 16, 3, device=DEVICE)
    w = w._replace(value_weight=torch.eye(16, device=DEVICE))
    x[1, 66, 5] = -float("inf")
    stages = get_backend(backend).stages
    h5 = reference_stages.bottleneck(
        reference_stages.head_partial(x.nan_to_num(neginf=0.0), w.enc0_weight), w
    )
    out = stages.tail_output(
        x,
        h5,
        w.dec2_weight,
        w.dec2_bias,
        w.value_weight,
        w.value_bias,
        *stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias),
    )
    expected = reference_stages.tail_output(
        x,
        h5,
        w.dec2_weight,
        w.dec2_bias,
        w.value_weight,
        w.value_bias,
        *reference_stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias),
    )
    assert torch.isnan(expected[1, 66, 5])
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
