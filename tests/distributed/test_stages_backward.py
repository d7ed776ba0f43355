"""The cpu backend's own backward of its stages (docs/design.md §12.4) in a group of one process:
the reference's gradients, on its own kernels; the calls it leaves to the reference's gradients;
its ops' argument errors. Several ranks: test_variate_parallel.py."""

import pytest
import torch

from casa_kernels import reference
from casa_kernels.distributed import VariateShard, variate_parallel_attention
from casa_kernels.ops.extension import kernel_missing_reason
from casa_kernels.weights import ScoreAttentionWeights

from .scenarios import backward_paths

pytestmark = pytest.mark.skipif(
    kernel_missing_reason("CPU", "") is not None, reason="the cpu backend's kernels are not built"
)


def _gradients(attention, x, w, grad_y, needs=None):
    """The gradients of ``attention(x, w)`` for grad_y, of the inputs flagged in ``needs`` (all
    by default; None for the others)."""
    needs = needs or [True] * (1 + len(w))
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, *w), needs)]
    y = attention(leaves[0], ScoreAttentionWeights(*leaves[1:]))
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    found = iter(torch.autograd.grad(y, wanted, grad_y))
    return [next(found) if leaf.requires_grad else None for leaf in leaves]


def _on_one_rank(x, w):
    return variate_parallel_attention(x, w, VariateShard.of(x.shape[1]), backend="cpu")


@pytest.mark.parametrize(
    "shape",
    [(2, 5, 16, 3), (3, 70, 32, 5), (1, 3, 8, 1), (1, 130, 24, 7)],
    ids=lambda s: "B{}-N{}-D{}-k{}".format(*s),
)
def test_one_rank_gives_the_reference_gradients(group_of_one, problem, shape):
    """float64, every input: within 1e-10 of the reference's autograd (N past one and several
    64-row blocks, k from 1 to 7), with every layer on the backend's own backward."""
    x, w = problem(*shape, dtype=torch.float64)
    grad_y = torch.randn_like(x)
    expected = _gradients(reference.score_attention, x, w, grad_y)
    with backward_paths() as paths:
        got = _gradients(_on_one_rank, x, w, grad_y)
    assert paths == {"fused": 1, "reference": 0}
    for name, a, b in zip(("x", *w._fields), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_equals_the_ops_own_backward(group_of_one, problem, dtype):
    """fp32 and bfloat16: the same gradients as the single-process op's fused backward (the same
    kernels, the column sums taken through the all-reduced gradient of S)."""
    x, w = problem(2, 9, 16, 3, dtype=dtype)
    grad_y = torch.randn_like(x)
    op = _gradients(lambda x, w: torch.ops.casa.score_attention(x, *w, "cpu"), x, w, grad_y)
    got = _gradients(_on_one_rank, x, w, grad_y)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("x", *w._fields), got, op):
        torch.testing.assert_close(
            a.float(),
            b.float(),
            rtol=rtol,
            atol=rtol * b.abs().max().item(),
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_non_finite_weights_take_the_reference_gradients(group_of_one, problem):
    """A NaN weight: the stages run with the reference's gradients (as the op does), which give the
    reference's NaN pattern."""
    x, w = problem(2, 5, 16, 3, dtype=torch.float64)
    w.dec2_bias[1] = torch.nan
    grad_y = torch.randn_like(x)
    expected = _gradients(reference.score_attention, x, w, grad_y)
    with backward_paths() as paths:
        got = _gradients(_on_one_rank, x, w, grad_y)
    assert paths["fused"] == 0 and paths["reference"] > 0
    for name, a, b in zip(("x", *w._fields), got, expected):
        torch.testing.assert_close(
            a, b, rtol=1e-10, atol=1e-12, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_double_backward_is_a_clear_error(group_of_one, problem):
    x, w = problem(1, 4, 8, 3, dtype=torch.float64)
    x.requires_grad_()
    y = _on_one_rank(x, w)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=False)
    assert grad.shape == x.shape
    y = _on_one_rank(x, w)
    with pytest.raises(
        RuntimeError, match="double backward .* cpu backend's backward of its stages"
    ):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_the_split_backward_ops_name_a_wrong_argument(problem):
    x, w = problem(2, 5, 16, 3)
    g, flags = torch.randn_like(x), [True] * 15
    h5 = torch.randn(2, 4, 8)
    stats = torch.ones(2, 16)
    ops = torch.ops.casa
    tail = (w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias)
    prepared = ops.cpu_prepare_tail(*tail, 16, "none")
    with pytest.raises(
        RuntimeError, match=r"tile: expected an even width in \[2, d_model = 16\], received 7"
    ):
        ops.cpu_tail_backward_colsum(g, x, list(w), h5, stats, stats, flags, prepared, 7)
    _, other = problem(2, 6, 16, 3)  # one variate more: dec2's layouts have 6 rows
    # (D/4 = 4 columns: k = 3 gives even outputs one tap)
    other_prepared = ops.cpu_prepare_tail(
        other.dec2_weight, other.dec2_bias, other.value_weight, other.value_bias, 16, "none"
    )
    with pytest.raises(
        RuntimeError,
        match=r"prepared\[0\] \(dec2_weight, even outputs\): expected shape \[5, 4\], received \[6",
    ):
        ops.cpu_tail_backward_colsum(g, x, list(w), h5, stats, stats, flags, other_prepared, 16)
    with pytest.raises(RuntimeError, match=r"prepared: expected cpu_prepare_tail's list"):
        ops.cpu_tail_backward_colsum(g, x, list(w), h5, stats, stats, flags, prepared[:3], 16)
    colsum, state = ops.cpu_tail_backward_colsum(
        g, x, list(w), h5, stats, stats, flags, prepared, 16
    )
    assert colsum.shape == (2, 16) and state.shape == (3 * 2 * 5 * 16,)
    activations = [
        torch.randn(2, 4, 8),
        torch.randn(2, 8, 4),
        torch.randn(2, 16, 2),
        torch.randn(2, 8, 4),
        h5,
    ]
    with pytest.raises(RuntimeError, match=r"state: expected shape \[480\], received \[479\]"):
        ops.cpu_tail_backward_rows(
            g, x, list(w), activations, stats, stats, colsum, state[:-1], flags, prepared, 16
        )
    with pytest.raises(RuntimeError, match=r"dpre1: expected shape \[2, 4, 8\]"):
        ops.cpu_head_backward(torch.randn(2, 4, 7), x, w.enc0_weight, torch.zeros(2, 5, 16), flags)
