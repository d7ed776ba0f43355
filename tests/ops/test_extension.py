"""The extension's raw op ``casa::fused_score_attention``: schema, fake kernel, opcheck."""

import pytest
import torch

from casa_kernels.ops import extension

pytestmark = pytest.mark.skipif(
    extension.extension_error() is not None, reason=str(extension.extension_error())
)


def test_raw_op_passes_opcheck(problem):
    x, w = problem(2, 37, 24, 3)
    torch.library.opcheck(torch.ops.casa.fused_score_attention.default, (x, *w))


def test_raw_op_fake_kernel_gives_the_output_shape(problem):
    x, w = problem(3, 5, 16, 3)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        fake_w = [mode.from_tensor(t) for t in w]
        y = torch.ops.casa.fused_score_attention(fake_x, *fake_w)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()


def test_raw_op_compiles_without_graph_break(problem):
    x, w = problem(2, 7, 16, 3)
    compiled = torch.compile(torch.ops.casa.fused_score_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, *w), torch.ops.casa.fused_score_attention(x, *w))
