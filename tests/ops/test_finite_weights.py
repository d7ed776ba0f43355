"""The finiteness check that sends non-finite weights to the reference (ops/finite_weights.py),
against torch.isfinite element by element."""

import pytest
import torch

from casa_kernels.ops.finite_weights import weights_all_finite
from casa_kernels.ops.weight_cache import clear

from ..conftest import make_problem

SHAPE = (1, 13, 24, 3)  # B, N, D, k: weights of 6 to 864 elements, most not a multiple of 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_element_anywhere_is_found(dtype, value):
    _, w = make_problem(*SHAPE, dtype=dtype)
    clear()
    assert weights_all_finite(w)
    for i, name in enumerate(w._fields):
        for position in sorted({0, 1, w[i].numel() // 2, w[i].numel() - 1}):
            tensors = list(w)
            tensors[i] = tensors[i].clone()
            tensors[i].view(-1)[position] = value
            assert not bool(torch.isfinite(tensors[i]).all())
            assert not weights_all_finite(type(w)(*tensors)), f"{value} in {name}[{position}]"


def test_finite_extremes_of_every_dtype_are_finite():
    # The largest finite values (and subnormals) of each dtype stay finite once promoted.
    _, w = make_problem(*SHAPE, dtype=torch.float32)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        tensors = [t.to(dtype) for t in w]
        tensors[0].view(-1)[0], tensors[0].view(-1)[1] = info.max, -info.max
        tensors[1].view(-1)[0] = info.tiny / 2
        clear()
        assert weights_all_finite(type(w)(*tensors)), dtype
