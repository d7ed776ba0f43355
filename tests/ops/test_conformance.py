"""The conformance suite: what every backend of the registry must satisfy, against the
reference (docs/design.md §5–§7, §10).

The cases come from the registry alone: one per backend, device type it serves (of
``DEVICE_TYPES``) and dtype it declares, e.g. ``cpu-cpu-bfloat16``. A device with no
hardware here skips with the reason ("needs a CUDA GPU"); a backend that cannot run here
skips with its own reason. A new backend is tested by registering it.

Sizes: a backend that ``auto`` never picks for a device, other than the fallback, serves it
for testing only (the Triton interpreter on CPU tensors, which runs each program in
Python): such a case gets the small shapes and fewer fuzz examples; so does the reference,
which has no tiles. The reference in fp16/bf16 is left out of the comparisons (tolerance's
low-precision rule measures it against itself) and every reference case out of the
gradients (autograd through itself): neither could fail.

What is specific to one backend (thread counts, oneDNN, head splits, TF32, launch counts,
compile checks, exact workspace bounds) stays in ``tests/ops/test_<backend>.py``; the
production contract (autocast, non-finite values, empty batches) in ``test_production.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import casa_kernels as ck
from casa_kernels import reference
from casa_kernels.ops import weight_cache
from casa_kernels.ops.registry import FALLBACK, backend_names, get_backend
from casa_kernels.tolerance import compare, compare_attention_term, compare_gradient
from tests.conftest import make_problem

DEVICE_TYPES = ("cpu", "cuda")
"""The device types the suite runs on (a backend's others, e.g. the reference's mps, are
not tested here)."""
LOW_PRECISION = (torch.float16, torch.bfloat16)


class Case(NamedTuple):
    backend: str
    device: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def test_only(self) -> bool:
        """Whether the backend serves this device for testing only (see the module docstring)."""
        return (
            self.backend != FALLBACK and self.device not in get_backend(self.backend).auto_priority
        )

    @property
    def is_its_own_yardstick(self) -> bool:
        """The reference in fp16/bf16: tolerance.compare measures it against itself, and its
        gradients are autograd's through itself, so such a comparison cannot fail."""
        return self.backend == FALLBACK and self.dtype in LOW_PRECISION

    def problem(self, batch, n_vars, d_model, kernel, *, seed=0):
        return make_problem(
            batch, n_vars, d_model, kernel, dtype=self.dtype, device=self.device, seed=seed
        )

    def run(self, x, w):
        return ck.casa_attention(x, w, backend=self.backend)


def _all_cases() -> list[Case]:
    order = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    return [
        Case(name, device, dtype)
        for name in backend_names()
        for device in DEVICE_TYPES
        if device in get_backend(name).device_types
        for dtype in order
        if dtype in get_backend(name).dtypes
    ]


CASES = _all_cases()


def _compared(case):
    return not case.is_its_own_yardstick


def cases(*, dtypes=None, where=_compared, with_values=()):
    """pytest params of the cases (of ``dtypes`` and passing ``where``: by default those a
    comparison with the reference can fail), each crossed with ``with_values`` (a function
    of the case giving ``(id, values)`` pairs) when given."""
    params = []
    for case in CASES:
        if (dtypes is not None and case.dtype not in dtypes) or not where(case):
            continue
        if not with_values:
            params.append(pytest.param(case, id=case.id))
            continue
        for value_id, value in with_values(case):
            params.append(pytest.param(case, value, id=f"{case.id}-{value_id}"))
    return params


@pytest.fixture(autouse=True)
def _skip_without_hardware(request):
    """Skips a case whose device has no hardware here, or whose backend cannot run here."""
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("case") if callspec else None
    if case is None:
        return
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = get_backend(case.backend).unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {case.backend} unavailable: {reason}")


def assert_conforms(out, x, w, case):
    """``out`` has x's shape, the case's dtype and device, and passes tolerance.compare."""
    assert out.shape == x.shape and out.dtype == case.dtype and out.device.type == case.device
    assert out.is_contiguous()
    result = compare(out, x, w)
    assert result.passed, f"{case.id} {tuple(x.shape)}: {result}"


# --- shapes ------------------------------------------------------------------------------

# (batch, n_vars, d_model, kernel). N = 1; N ragged around every backend's row tiles (16 and
# 64 rows: Triton's interpreter and native tail tiles and the CPU's tail block; 16/32:
# Triton's head chunks); D = 8 (one mostly masked tile), D = 40 (ends mid tile); B = 1;
# every k in {1, 3, 5, 7}.
SMALL_SHAPES = [
    (1, 1, 8, 1),
    (2, 1, 16, 3),
    (1, 7, 8, 7),
    (1, 17, 40, 1),
    (3, 33, 16, 3),
    (1, 65, 32, 7),
    (2, 37, 24, 5),
]
# For the fused backends at full speed (not the reference, which has no tiles): N past the
# CPU's 256-row head chunk and many tiles, N ragged around the CUDA tail's 128-row tiles,
# D not a multiple of any column tile (64 or 128 wide), to D = 512.
LARGE_SHAPES = [
    (1, 300, 136, 3),
    (4, 257, 32, 1),
    (2, 21, 128, 3),
    (5, 130, 264, 5),
    (2, 333, 128, 7),
    (1, 1100, 96, 1),
    (2, 862, 512, 3),
]


def _shape_id(shape):
    return "B{}-N{}-D{}-k{}".format(*shape)


def _shapes(case):
    small = case.test_only or case.backend == FALLBACK
    shapes = SMALL_SHAPES if small else SMALL_SHAPES + LARGE_SHAPES
    return [(_shape_id(s), s) for s in shapes]


@pytest.mark.parametrize("case,shape", cases(with_values=_shapes))
def test_matches_the_reference(case, shape):
    x, w = case.problem(*shape, seed=sum(shape))
    assert_conforms(case.run(x, w), x, w, case)


def _layouts(case):
    layouts = [("D-major", (1, 2)), ("N-major", (0, 1)), ("B-minor", (0, 2))]
    return layouts[:1] if case.test_only else layouts


@pytest.mark.parametrize("case,dims", cases(with_values=_layouts))
def test_non_contiguous_input(case, dims):
    x, w = case.problem(2, 9 if case.test_only else 70, 40, 3, seed=3)
    strided = x.transpose(*dims).contiguous().transpose(*dims)  # same values, permuted strides
    assert not strided.is_contiguous() and torch.equal(strided, x)
    assert_conforms(case.run(strided, w), x, w, case)


# --- autograd and the op's registration ----------------------------------------------------


def _leaves(x, w):
    return [t.detach().clone().requires_grad_() for t in (x, *w)]


@pytest.mark.parametrize("case", cases(where=lambda case: case.backend != FALLBACK))
def test_gradients_are_the_references(case):
    # The op's backward (a backend's own, or the reference's recomputed) against autograd
    # through the reference in float64, under tolerance.compare_gradient (fp16/bf16: relative
    # to the reference's autograd in the same dtype).
    x, w = case.problem(2, 13, 16, 3, seed=10)
    grad_out = torch.randn_like(x)
    ours, same_dtype = _leaves(x, w), _leaves(x, w)
    ref64 = [t.detach().double().requires_grad_() for t in (x, *w)]
    case.run(ours[0], ck.ScoreAttentionWeights(*ours[1:])).backward(grad_out)
    for leaves, grad in ((same_dtype, grad_out), (ref64, grad_out.double())):
        reference.score_attention(leaves[0], ck.ScoreAttentionWeights(*leaves[1:])).backward(grad)
    for name, got, want, want_dtype in zip(("x", *w._fields), ours, ref64, same_dtype):
        assert got.grad is not None, f"no gradient for {name}"
        result = compare_gradient(got.grad, want.grad, want_dtype.grad)
        assert result.passed, f"{name}: max abs {result.max_abs_error:.3g} ({result.rule})"


@pytest.mark.parametrize("case", cases(dtypes=(torch.float64,)))
def test_gradcheck_through_the_op(case):
    x, w = case.problem(1, 3, 8, 3)
    with weight_cache.disabled():  # gradcheck perturbs the weights through .data
        assert torch.autograd.gradcheck(
            lambda *a: torch.ops.casa.score_attention(*a, case.backend), _leaves(x, w)
        )


def _most_precise_dtype(case):
    return case == next(c for c in CASES if c[:2] == case[:2])


@pytest.mark.parametrize("case", cases(where=_most_precise_dtype))
def test_opcheck(case):
    # Schema, fake kernel, autograd registration, AOT dispatch (static and dynamic shapes):
    # the op's registration, alike in every dtype (each dtype's output dtype, shape and
    # layout are checked by the tests above), so per backend and device in one dtype.
    x, w = case.problem(2, 5, 16, 3, seed=8)
    torch.library.opcheck(torch.ops.casa.score_attention.default, (*_leaves(x, w), case.backend))


# --- fuzzing --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases())
def test_fuzz_against_the_reference(case):
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
    st = hypothesis.strategies
    small = case.test_only

    @hypothesis.settings(max_examples=6 if small else 20, deadline=None, derandomize=True)
    @hypothesis.given(
        batch=st.integers(1, 2 if small else 4),
        n_vars=st.integers(1, 24 if small else 200),
        d_eighths=st.integers(1, 4 if small else 40),
        kernel=st.sampled_from([1, 3, 5, 7]),
        seed=st.integers(0, 2**16),
    )
    def check(batch, n_vars, d_eighths, kernel, seed):
        x, w = case.problem(batch, n_vars, 8 * d_eighths, kernel, seed=seed)
        assert_conforms(case.run(x, w), x, w, case)

    check()


# --- extremes ---------------------------------------------------------------------------------


def _spread_rows(n_vars, count):
    """``count`` rows spread over [0, n_vars), the edges of 16- and 64-row tiles among them."""
    edges = [r for t in (16, 64) for b in range(t, n_vars, t) for r in (b - 1, b)]
    even = [round(i * (n_vars - 1) / max(count - 1, 1)) for i in range(count)]
    rows = sorted(set(edges + even + [0, n_vars - 1]))
    return [rows[i * len(rows) // count] for i in range(count)]


@pytest.mark.parametrize("case", cases(dtypes=(torch.float64, torch.float32, torch.bfloat16)))
def test_scores_far_beyond_exp_range(case):
    # |x| up to ~400: exp of an unshifted score overflows (fp32 and bf16 alike), so a softmax
    # without its max shift, or a merge of row blocks / N splits that ignores one block's
    # maximum, fails here. Each column's dominant variate sits in another row, tile edges
    # among them, and another column's far minimum in yet another.
    N, D = (70, 16) if case.test_only else (200, 32)
    x, w = make_problem(2, N, D, 3, device=case.device)
    x = x * 40
    for col, (top, bottom) in enumerate(zip(_spread_rows(N, D), reversed(_spread_rows(N, D)))):
        x[:, top, col] += 250.0
        x[1, bottom, col] -= 300.0
    x, w = x.to(case.dtype), w.to(case.dtype)
    assert_conforms(case.run(x, w), x, w, case)


@pytest.mark.parametrize("case", cases())
def test_row_blocks_with_distant_maxima(case):
    # Rows shifted by -40, 0 or +40 by (row block + column) mod 3, blocks of 16 rows in even
    # columns and of 64 in odd ones: the blocks' maxima lie 40 apart (a block's weights
    # ~e^-40 of another's), and which block holds the maximum changes with the column. A merge of per-block or per-split softmax
    # statistics that skips a block's rescaling fails here.
    N, D = (70, 24) if case.test_only else (300, 48)
    x, w = case.problem(2, N, D, 3, seed=11)
    cols = torch.arange(D)[None, :]
    blocks = torch.arange(N)[:, None] // torch.where(cols % 2 == 0, 16, 64)
    x = x + (40.0 * ((blocks + cols) % 3 - 1)).to(case.dtype).to(case.device)
    assert_conforms(case.run(x, w), x, w, case)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("case", cases())
def test_sigmoid_input_far_beyond_exp_range(case):
    # Last-decoder biases of ±100 and ±1000 push the sigmoid's input z past exp's range
    # (|z| > 88 in fp32 and bf16, > 709 in fp64), in rows spread over the row tiles: the
    # sigmoid must saturate to exactly 1 and 0 as torch.sigmoid does. exp(z) / (1 + exp(z))
    # gives inf / inf = NaN for large z, a clamp of z short of the range a value off 0 or 1.
    N, D = (40, 16) if case.test_only else (200, 32)
    x, w = case.problem(2, N, D, 3, seed=14)
    biases = torch.tensor([100.0, -100.0, 1000.0, -1000.0, 0.0], dtype=torch.float64)
    w = w._replace(dec2_bias=biases.repeat(N)[:N].to(w.dec2_bias))
    out = case.run(x, w)
    assert bool(torch.isfinite(out).all()), f"{int((~torch.isfinite(out)).sum())} non-finite"
    assert_conforms(out, x, w, case)


def _scores_and_attention_that_show(w, n_vars, seed):
    """``w`` with the attention term of the order of x and every bias of order 1: the value
    weight scaled by N/4 (p·v is ~1/N of y otherwise) and the biases drawn in [-1, 1]
    (default init draws the head's and the tail's within ±1/sqrt(N·k), where a wrong bias
    or a ReLU before its bias moves y by less than fp32 resolves)."""
    g = torch.Generator().manual_seed(seed)
    biases = {
        name: (torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 - 1).to(t)
        for name, t in zip(w._fields, w)
        if name.endswith("_bias")
    }
    return w._replace(value_weight=w.value_weight * (n_vars / 4), **biases)


@pytest.mark.parametrize("case", cases(dtypes=(torch.float32,)))
@pytest.mark.parametrize("n_vars", [300, 862])
def test_attention_term_at_large_n(case, n_vars):
    # At large N the attention term y - x is ~1/N of y, below compare's fixed tolerance on
    # y, and default-init biases shrink as 1/sqrt(N): a wrong bias or ReLU order in the
    # scores passes the fp32 cases there. Here the term and the biases are of order 1 and
    # the term is checked against the float64 reference's, relative to itself. N = 300 and
    # 862 at B = 1 split the head over N on every fused backend (the CPU's 256-row chunks
    # and worker groups, Triton's and CUDA's split-K programs).
    x, w = case.problem(1, n_vars, 16, 3, seed=n_vars)
    w = _scores_and_attention_that_show(w, n_vars, seed=n_vars)
    out = case.run(x, w)
    assert_conforms(out, x, w, case)
    result = compare_attention_term(out, x, w)
    assert result.passed, f"{case.id} N={n_vars}: {result}"


@pytest.mark.parametrize("case", cases(dtypes=LOW_PRECISION))
def test_long_low_precision_reductions(case):
    # Long sums in fp16/bf16: the head's over N·k terms, the softmax's over N, the value
    # GEMM's over D. The value weight is scaled by N so that the attention term p·v is of
    # the order of x (not ~1/N of it, below one ulp of y): an accumulation in the input
    # dtype instead of fp32 then moves y by many ulps.
    B, N, D, k = (1, 512, 32, 3) if case.test_only else (2, 4096, 256, 3)
    x, w = case.problem(B, N, D, k, seed=12)
    w = w._replace(value_weight=w.value_weight * (N / 4))
    assert_conforms(case.run(x, w), x, w, case)


# --- memory ---------------------------------------------------------------------------------


def _peak_temporaries(case, fn) -> tuple[int, torch.Tensor]:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated before, on the case's
    device, and ``fn()``'s result."""
    if case.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    from bench.measure import cpu_peak_allocated

    outs = []
    return cpu_peak_allocated(lambda: outs.append(fn())), outs[0]


def _holds_memory_contract(case):
    # Every backend but the reference (§5.6); under the Triton interpreter, which the
    # profiler slows down most, in fp32 only (the host allocates alike in every dtype).
    return case.backend != FALLBACK and not (case.test_only and case.dtype != torch.float32)


@pytest.mark.parametrize("case", cases(where=_holds_memory_contract))
def test_no_batch_sized_temporary(case):
    # docs/design.md §5.6: no [B, N, D]-sized intermediate; temporaries are O(B·D²) plus the
    # GPU tail statistics, plus on the CPU one fp32 [N, D] score buffer per worker thread. The
    # bound: one byte per element of [B, N, D] (half of such a tensor in bf16/fp16, a quarter
    # in fp32) plus that per-worker scratch on the CPU, B large enough that a [B, N, D]
    # temporary of any floating dtype exceeds it. (The exact workspace of each backend is
    # checked in its own file.)
    workers = torch.get_num_threads() + 1 if case.device == "cpu" else 0
    B, N, D = 4 * workers + 1, 2000, 64
    if case.test_only:
        N, D = 40, 16
    if case.device == "cuda":
        B, N = 8, 20000
    x, w = case.problem(B, N, D, 3, seed=13)
    case.run(x, w)  # weights prepared (weight cache), kernels loaded, outside the measurement
    peak, out = _peak_temporaries(case, lambda: case.run(x, w))
    output = out.numel() * out.element_size()
    bound = B * N * D + workers * N * D * 4 + (1 << 20 if case.device == "cuda" else 0)
    assert bound < B * N * D * 2  # any [B, N, D] temporary exceeds the bound
    assert output <= peak <= output + bound, (
        f"{peak - output} bytes of temporaries beyond the output, bound {bound}"
    )
