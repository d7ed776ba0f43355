"""The finiteness check that sends non-finite weights to the reference (ops/finite_weights.py):
the cpu kernel's one-pass check (csrc/cpu/finite.cpp) and the min/max check of other devices,
each against torch.isfinite element by element."""

import pytest
import torch

from casa_kernels.ops import finite_weights
from casa_kernels.ops.finite_weights import weights_all_finite
from casa_kernels.ops.registry import get_backend
from casa_kernels.ops.weight_cache import clear

from ..conftest import make_problem

SHAPE = (1, 13, 24, 3)  # B, N, D, k: weights of 6 to 864 elements, most not a multiple of 8
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NON_FINITE = [float("nan"), float("inf"), -float("inf")]

_CPU_UNAVAILABLE = get_backend("cpu").unavailable_reason()
needs_kernel = pytest.mark.skipif(
    _CPU_UNAVAILABLE is not None, reason=f"the cpu kernels are unavailable: {_CPU_UNAVAILABLE}"
)
CHECKS = [
    pytest.param(finite_weights._all_finite, id="one-pass", marks=needs_kernel),
    pytest.param(finite_weights._min_max_all_finite, id="min-max"),
]


def _one_pass(tensors):
    return torch.ops.casa.cpu_all_finite(list(tensors))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", NON_FINITE)
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


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_check_finds_every_non_finite_value(check, dtype):
    _, w = make_problem(*SHAPE, dtype=dtype)
    assert check(w)
    for value in NON_FINITE:
        for i in (0, len(w) // 2, len(w) - 1):
            tensors = list(w)
            tensors[i] = tensors[i].clone()
            tensors[i].view(-1)[-1] = value
            assert not check(tensors), f"{value} last in {w._fields[i]}"


@pytest.mark.parametrize("check", CHECKS)
def test_finite_extremes_of_every_dtype_are_finite(check):
    # The largest finite values (and subnormals) of each dtype are finite, by either check.
    _, w = make_problem(*SHAPE, dtype=torch.float32)
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        tensors = [t.to(dtype) for t in w]
        tensors[0].view(-1)[0], tensors[0].view(-1)[1] = info.max, -info.max
        tensors[1].view(-1)[0] = info.tiny / 2
        assert check(tensors), dtype


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_pass_check_over_thread_ranges_and_strides(dtype, threads):
    # Tensors large enough to split over the threads (64 Ki elements a range), a range
    # starting inside one tensor and ending inside the next, empty and strided tensors.
    threads(2)
    big = torch.randn(3 * (1 << 16) + 5, dtype=torch.float32).to(dtype)
    small = torch.randn(1000).to(dtype)
    strided = torch.randn(40, 30).to(dtype).t()
    tensors = [small, big, torch.empty(0, dtype=dtype), strided, big.clone()]
    assert _one_pass(tensors)
    for i, t in enumerate(tensors):
        for position in sorted({0, t.numel() // 2, (1 << 16) - 1, 1 << 16, t.numel() - 1}):
            if not 0 <= position < t.numel():
                continue
            broken = list(tensors)
            broken[i] = t.clone() if t.is_contiguous() else t.t().clone().t()
            index = divmod(position, t.shape[1]) if t.dim() == 2 else (position,)
            broken[i][index] = float("nan")
            assert not _one_pass(broken), f"NaN at {position} of tensor {i}"


@needs_kernel
def test_one_pass_check_of_nothing_is_true():
    assert _one_pass([])
    assert _one_pass([torch.empty(0), torch.empty(0, 3)])


@needs_kernel
def test_one_pass_check_names_a_dtype_it_cannot_read():
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be float32.*received Int"):
        _one_pass([torch.zeros(3), torch.zeros(3, dtype=torch.int32)])
