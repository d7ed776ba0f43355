"""The fused CPU kernel (backend "cpu") against the reference (docs/design.md §5–§7)."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import casa_kernels as ck
from casa_kernels import reference
from casa_kernels.ops import weight_cache
from casa_kernels.ops.cpu import block_epilogue
from casa_kernels.tolerance import LOW_PRECISION_EPS, assert_close_to_reference
from tests.conftest import given, settings, st  # hypothesis, or stand-ins that skip

SHAPES = [  # (B, N, D, k): N=1, ragged N around the 256-row head chunk, D=8, B=1, all k
    (1, 1, 8, 1),
    (2, 1, 16, 3),
    (1, 7, 8, 3),
    (3, 13, 24, 5),
    (2, 37, 64, 7),
    (1, 300, 136, 3),
    (4, 257, 32, 1),
    (2, 21, 128, 3),
    (5, 130, 264, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-D{}-k{}".format(*s))
def test_fused_matches_reference(problem, shape, dtype):
    x, w = problem(*shape, dtype=dtype)
    out = ck.casa_attention(x, w, backend="cpu")
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_without_onednn(problem, dtype):
    # With oneDNN disabled the kernel's GEMMs take ATen's BLAS path instead of oneDNN's
    # micro-kernels (fp32) and the matrix unit (bf16): the path of CPUs without them.
    x, w = problem(3, 130, 264, 5, dtype=dtype)
    with torch.backends.mkldnn.flags(enabled=False):
        out = ck.casa_attention(x, w, backend="cpu")
    assert_close_to_reference(out, x, w)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    n_vars=st.integers(1, 70),
    d_eighths=st.integers(1, 40),
    kernel=st.sampled_from([1, 3, 5, 7]),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_reference_fuzzed(batch, n_vars, d_eighths, kernel, seed):
    from tests.conftest import make_problem

    x, w = make_problem(batch, n_vars, 8 * d_eighths, kernel, seed=seed)
    assert_close_to_reference(ck.casa_attention(x, w, backend="cpu"), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_softmax_over_row_blocks_with_distant_maxima(problem, dtype):
    # The tail shifts each block of 64 rows by its own maximum of x and rescales the
    # blocks afterwards: here the blocks' maxima lie 40 apart in either direction, column
    # by column, so a block's weights are ~e^-40 of another's.
    x, w = problem(2, 200, 48, 3, dtype=dtype)
    offset = torch.zeros(200, 48, dtype=dtype)
    offset[64:128, ::2] = 40.0
    offset[128:, 1::2] = -40.0
    x = x + offset
    assert_close_to_reference(ck.casa_attention(x, w, backend="cpu"), x, w)


def test_non_contiguous_input(problem):
    x, w = problem(3, 9, 32, 3)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not x_t.is_contiguous()
    assert_close_to_reference(ck.casa_attention(x_t, w, backend="cpu"), x, w)


@pytest.mark.parametrize("threads", [2, 3])
def test_result_does_not_depend_on_thread_count(problem, threads):
    # B < threads: the head splits N and the tail splits the D = 40 columns into tiles
    # (20 + 20 with 2 threads; 14 + 14 + 12, a narrower last tile, with 3).
    x, w = problem(1, 600, 40, 3)
    caller_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ck.casa_attention(x, w, backend="cpu")
        torch.set_num_threads(threads)
        many = ck.casa_attention(x, w, backend="cpu")
    finally:
        torch.set_num_threads(caller_threads)
    assert_close_to_reference(many, x, w)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_gradients_equal_the_reference(problem, kernel):
    x, w = problem(2, 5, 16, kernel, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    grads = {}
    for name, fn in (
        (
            "cpu",
            lambda *a: ck.casa_attention(a[0], ck.ScoreAttentionWeights(*a[1:]), backend="cpu"),
        ),
        ("reference", lambda *a: reference.score_attention(a[0], ck.ScoreAttentionWeights(*a[1:]))),
    ):
        leaves = [t.clone().requires_grad_() for t in (x, *w)]
        fn(*leaves).backward(grad_out)
        grads[name] = [t.grad for t in leaves]
    for got, expected in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_the_op(problem):
    x, w = problem(1, 3, 8, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, *w)]
    with weight_cache.disabled():  # gradcheck perturbs the weights through .data
        assert torch.autograd.gradcheck(
            lambda *a: torch.ops.casa.score_attention(*a, "cpu"), leaves
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(problem, dtype):
    x, w = problem(2, 5, 16, 3, dtype=dtype)
    torch.library.opcheck(torch.ops.casa.score_attention.default, (x, *w, "cpu"))
    leaves = [t.clone().requires_grad_() for t in (x, *w)]
    torch.library.opcheck(torch.ops.casa.score_attention.default, (*leaves, "cpu"))


def test_modules_use_the_fused_op_by_default():
    block = ck.CASABlock(n_vars=4, d_model=16)
    graph = torch.export.export(block, (torch.randn(2, 4, 16),)).graph_module.code
    assert "torch.ops.casa.score_attention.default" in graph and "'cpu'" in graph


@pytest.mark.parametrize("module", ["attention", "block", "model"])
def test_torch_compile_fullgraph_matches_eager(module):
    torch._dynamo.reset()
    if module == "attention":
        m, x = ck.CASAAttention(n_vars=5, d_model=16), torch.randn(2, 5, 16)
    elif module == "block":
        m, x = ck.CASABlock(n_vars=5, d_model=16, kernel=5), torch.randn(2, 5, 16)
    else:
        m = ck.CASAModel(n_vars=5, d_model=16, seq_len=24, pred_len=8, e_layers=2)
        x = torch.randn(2, 24, 5)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def test_no_batch_sized_temporary_is_allocated(problem):
    # Memory contract (docs/design.md §5): besides the output, O(B·D²) plus one [N, D]-sized
    # scratch per worker — never [B, N, D]. Many variates, small D, B = 8 so that a
    # [B, N, D] temporary would exceed the bound below by far.
    from bench.measure import cpu_peak_allocated

    B, N, D = 8, 2000, 64
    x, w = problem(B, N, D, 3)
    peak = cpu_peak_allocated(lambda: ck.casa_attention(x, w, backend="cpu"))
    output, n_by_d = B * N * D * 4, N * D * 4
    bound = output + (torch.get_num_threads() + 1) * n_by_d + 8 * B * D * D * 4
    assert output <= peak <= bound, f"peak {peak} bytes vs bound {bound} ([B, N, D] = {output})"
    assert bound < 2 * output  # the bound excludes any [B, N, D]-sized temporary


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "requires_grad"])
def test_runs_under_every_grad_mode_with_parallel_workers(problem, mode):
    # B >= threads: the work items run on torch's OpenMP workers, which must take the
    # caller's thread-local state (inference mode, below-autograd dispatch).
    x, w = problem(4, 30, 64, 3)
    if mode == "requires_grad":
        w = ck.ScoreAttentionWeights(*(t.requires_grad_() for t in w))
        out = ck.casa_attention(x, w, backend="cpu")
    else:
        with getattr(torch, mode)():
            out = ck.casa_attention(x, w, backend="cpu")
    assert_close_to_reference(out, x, ck.ScoreAttentionWeights(*(t.detach() for t in w)))


def _eager_epilogue(y, norm, mlp, relu):
    z = norm(y)
    out = norm(mlp(z) + z)
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("rows", [1, 65, 300])  # within one 64-row block, ragged, several
def test_block_epilogue_matches_the_eager_block(dtype, relu, rows):
    torch.manual_seed(rows)
    block = ck.CASABlock(n_vars=3, d_model=40)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    y = torch.randn(rows, 40) * 3 + 1
    with torch.no_grad():
        exact = _eager_epilogue(y.double(), block.norm.double(), block.mlp.double(), relu)
        block.to(dtype)
        eager = _eager_epilogue(y.to(dtype), block.norm, block.mlp, relu)
        ours = block_epilogue(y.to(dtype), block.norm, block.mlp[0], block.mlp[2], relu)
    assert ours.dtype == dtype and ours.shape == y.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), exact, rtol=2e-5, atol=2e-5)
    else:  # tolerance.py's rule, twice PyTorch's own bf16 error plus eps, with eps relative:
        # LayerNorm outputs reach |6|, where one bfloat16 ulp (0.03) is eps itself.
        eps = LOW_PRECISION_EPS[dtype] * exact.abs().clamp_min(1.0)
        bound = 2 * (eager.double() - exact).abs() + eps
        assert bool(((ours.double() - exact).abs() <= bound).all())


def test_block_epilogue_keeps_nan_rows_and_empty_input():
    block = ck.CASABlock(n_vars=3, d_model=16)
    y = torch.randn(5, 16)
    y[2, 7] = float("nan")
    with torch.no_grad():
        out = block_epilogue(y, block.norm, block.mlp[0], block.mlp[2], True)
        assert torch.equal(out.isnan(), _eager_epilogue(y, block.norm, block.mlp, True).isnan())
        assert block_epilogue(y[:0], block.norm, block.mlp[0], block.mlp[2], True).shape == (0, 16)


def test_block_uses_the_fused_epilogue_for_inference_only(monkeypatch):
    block = ck.CASABlock(n_vars=7, d_model=16, backend="cpu")
    x = torch.randn(2, 7, 16)
    calls = []
    monkeypatch.setattr(
        ck.modules, "block_epilogue", lambda *a: calls.append(1) or block_epilogue(*a)
    )
    with torch.no_grad():
        fused = block(x)
    assert calls == [1]
    eager = block(x)  # gradients due: eager PyTorch
    assert calls == [1] and eager.requires_grad
    torch.testing.assert_close(fused, eager.detach(), rtol=2e-5, atol=2e-5)


ROOT = Path(__file__).resolve().parents[2]
_TIER_CHECK = """
import torch, casa_kernels as ck
from casa_kernels.ops.cpu import bf16_gemm_tier
from casa_kernels.tolerance import compare
from tests.conftest import make_problem
x, w = make_problem(3, 130, 264, 5, dtype=torch.bfloat16)
result = compare(ck.casa_attention(x, w, backend="cpu"), x, w)
print(bf16_gemm_tier(), result.passed)
"""


def _tier_check(**env: str) -> subprocess.CompletedProcess:
    """_TIER_CHECK in a fresh process: ONEDNN_MAX_CPU_ISA and CASA_CPU_BF16_GEMM are read
    once, at start-up and at the first bfloat16 GEMM."""
    return subprocess.run(
        [sys.executable, "-c", _TIER_CHECK],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        cwd=ROOT,
    )


@functools.cache
def _native_tier() -> str:
    out = _tier_check()
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-2]


@pytest.mark.parametrize(
    "isa, requested",
    [("AVX512_CORE_BF16", "avx512_bf16"), ("AVX512_CORE_BF16", "auto"), ("AVX2", "auto")],
)
def test_bf16_on_a_lower_gemm_tier(isa, requested):
    # Below AMX the avx512_bf16 GEMMs run where the CPU has bfloat16 dot products; "auto"
    # takes them only where they beat fp32 GEMMs here, so the forced run keeps that path
    # tested on any CPU that has it.
    if requested == "avx512_bf16" and _native_tier() == "none":
        pytest.skip("needs a CPU with bfloat16 dot products (avx512_bf16)")
    out = _tier_check(ONEDNN_MAX_CPU_ISA=isa, CASA_CPU_BF16_GEMM=requested)
    assert out.returncode == 0, out.stderr[-3000:]
    tier, passed = out.stdout.split()[-2:]
    if isa == "AVX2" or _native_tier() == "none":
        assert tier == "none"  # no bfloat16 dot products below AVX512_CORE_BF16
    elif requested == "auto":
        assert tier in ("avx512_bf16", "none")  # whichever was faster here
    else:
        assert tier == "avx512_bf16"
    assert passed == "True"


@pytest.mark.parametrize(
    "requested, isa, message",
    [
        ("fastest", None, 'expected "auto", "amx", "avx512_bf16" or "none", received "fastest"'),
        (
            "amx",
            "AVX2",
            'CASA_CPU_BF16_GEMM=amx: this CPU (with ONEDNN_MAX_CPU_ISA, if set) offers only "none"',
        ),
    ],
)
def test_bf16_gemm_override_errors_name_the_variable(requested, isa, message):
    env = {"CASA_CPU_BF16_GEMM": requested, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})}
    out = _tier_check(**env)
    assert out.returncode != 0
    assert "CASA_CPU_BF16_GEMM" in out.stderr and message in out.stderr, out.stderr[-2000:]
