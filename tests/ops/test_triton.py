"""The ``triton`` backend against the reference (docs/design.md §7).

On a CUDA machine the kernels run natively; without one, conftest switches on the
Triton interpreter and they run on CPU tensors (small shapes only: the interpreter
is slow). The whole module skips only when triton is not importable, or when
neither CUDA nor the interpreter is available.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import casa_kernels
from casa_kernels import reference
from casa_kernels.ops.registry import get_backend, resolve_backend
from casa_kernels.tolerance import assert_close_to_reference
from tests.conftest import given, settings, st  # hypothesis, or stand-ins that skip

from ..conftest import make_problem

triton = pytest.importorskip("triton", reason="triton is not installed")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (CUDA or INTERPRET):
    pytest.skip("needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

from casa_kernels.ops.triton_kernels import HEAD_BLOCK_N, triton_score_attention  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"

# (batch, n_vars, d_model, kernel): every stage, ragged N and D/2 tiles, N = 1, D = 8, B = 1.
SHAPES = [
    (2, 5, 16, 3),
    (1, 1, 8, 3),
    (1, 1, 8, 1),
    (1, 20, 8, 7),
    (2, 37, 24, 5),
    (1, 40, 32, 7),
    (3, 17, 16, 1),
    (1, 33, 32, 3),
]


def _problem(shape, dtype=torch.float32, seed=0):
    return make_problem(*shape, dtype=dtype, device=DEVICE, seed=seed)


def test_backend_registered_for_this_machine():
    backend = get_backend("triton")
    assert backend.unavailable_reason() is None
    assert backend.reason_not_serving(torch.device(DEVICE), torch.float32) is None
    assert backend.reason_not_serving(torch.device(DEVICE), torch.float64) is not None
    assert ("cpu" in backend.device_types) == INTERPRET


def test_reason_without_cuda_or_interpreter(monkeypatch):
    from casa_kernels.ops import triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = triton_backend._unavailable_reason()
    assert reason is not None and "TRITON_INTERPRET" in reason


@pytest.mark.skipif(not CUDA, reason="auto picks triton only for CUDA tensors")
def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("CASA_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cuda"), torch.float16).name == "triton"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-D{}-k{}".format(*s))
def test_casa_attention_fp32(shape):
    x, w = _problem(shape)
    y = casa_kernels.casa_attention(x, w, backend="triton")
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert_close_to_reference(y, x, w)


@pytest.mark.parametrize("shape", [(2, 5, 16, 3), (1, 37, 24, 5)], ids=str)
def test_op_fp32(shape):
    x, w = _problem(shape, seed=1)
    y = torch.ops.casa.score_attention(x, *w, "triton")
    assert_close_to_reference(y, x, w)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_head_split_over_n(splits):
    # N spans three head chunks, so every split count here really splits the reduction.
    x, w = _problem((1, 2 * HEAD_BLOCK_N + 3, 16, 3), seed=2)
    assert_close_to_reference(triton_score_attention(x, w, splits=splits), x, w)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-bottleneck", "library-bottleneck"])
@pytest.mark.parametrize("shape", [(2, 6, 16, 1), (1, 9, 32, 3), (2, 4, 24, 5), (1, 3, 64, 7)], ids=str)
def test_both_bottlenecks(shape, fused):
    x, w = _problem(shape, seed=9)
    assert_close_to_reference(triton_score_attention(x, w, fused_bottleneck=fused), x, w)


def test_non_contiguous_input():
    x, w = _problem((2, 9, 16, 3), seed=3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (N·D, 1, N)
    assert not x_t.is_contiguous()
    y = casa_kernels.casa_attention(x_t, w, backend="triton")
    assert_close_to_reference(y, x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 16, 3), (1, 37, 24, 5), (1, 1, 8, 7)], ids=str)
def test_low_precision(shape, dtype):
    # Under the interpreter bf16 dots run on fp32 copies of the operands (numpy has no
    # bfloat16); the loads, conversions, softmax and stores are the native path.
    x, w = _problem(shape, dtype=dtype, seed=4)
    y = casa_kernels.casa_attention(x, w, backend="triton")
    assert y.dtype == dtype
    assert_close_to_reference(y, x, w)


@pytest.mark.skipif(not CUDA, reason="TF32 dots need a CUDA device (tensor cores)")
def test_fp32_with_tf32_allowed_stays_close():
    x, w = _problem((2, 64, 64, 3), seed=5)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        y = casa_kernels.casa_attention(x, w, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(y.double().cpu(), reference.score_attention(x.double(), w.to(torch.float64)).cpu(),
                               atol=1e-2, rtol=1e-2)


def test_gradients_match_reference():
    x, w = _problem((2, 7, 16, 3), seed=6)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *w)]
    out = casa_kernels.casa_attention(leaves[0], casa_kernels.ScoreAttentionWeights(*leaves[1:]), backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, *w)]
    ref = reference.score_attention(ref_leaves[0], casa_kernels.ScoreAttentionWeights(*ref_leaves[1:]))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_opcheck():
    x, w = _problem((2, 5, 16, 3), seed=7)
    args = (x.requires_grad_(), *(t.requires_grad_() for t in w), "triton")
    torch.library.opcheck(torch.ops.casa.score_attention.default, args)


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    n_vars=st.integers(1, 24),
    d_eighths=st.integers(1, 4),
    kernel=st.sampled_from([1, 3, 5, 7]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(batch, n_vars, d_eighths, kernel, seed):
    x, w = _problem((batch, n_vars, 8 * d_eighths, kernel), seed=seed)
    assert_close_to_reference(casa_kernels.casa_attention(x, w, backend="triton"), x, w)


@pytest.mark.skipif(CUDA, reason="with a GPU the native tests compile the kernels for it")
def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    # The interpreter never lowers the kernels; compile them down to cubin (one config
    # each), in a fresh cache so nothing is skipped.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tests.ops.triton_compile_check", "--arch", "90", "--dtype", "fp32", "bf16",
         "--kernel", "3"],
        cwd=root, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not CUDA, reason="measuring peak GPU memory needs a CUDA device")
def test_no_bnd_intermediate():
    # N large against D: a [B, N, D] fp32 intermediate would dwarf the O(B·D²) budget.
    B, N, D = 2, 16384, 64
    x, w = _problem((B, N, D, 3), seed=8)
    casa_kernels.casa_attention(x, w, backend="triton")  # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = casa_kernels.casa_attention(x, w, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - y.numel() * y.element_size()
    assert extra < x.numel() * x.element_size() // 4, f"{extra} bytes of temporaries"
