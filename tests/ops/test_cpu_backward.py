"""The cpu backend's fused backward (csrc/cpu/backward.cpp, casa_kernels/ops/backends/cpu_backward.py,
docs/design.md §5.8) against autograd through the reference: every input's gradient at
ragged shapes and thread counts, each gradient alone and in groups (and the convolutions it
skips), bfloat16 under the tolerance rule, gradcheck in float64, NaN/inf in x, what is
saved for the backward, and the error on double backward.

Shapes: (batch, n_vars, d_model, kernel, threads). The tail's tiles are 64 rows
(``kRows``) by T columns, T from the batch, D and the threads (``tail_tile_width``: at
most 128 where it splits D, so D = 512 at B = 1 on 2 threads runs four tiles of 128). At
D = 128 the head's and the middle convs' backwards are worth several workers
(``threads_for``); their weight gradients are accumulated either in one tensor the workers
share, each taking whole groups of input channels (B = 1 on 3 threads: 3 groups), or in one
tensor per worker, summed at the end (B = 3 on 2 threads: one group; B = 1 on 2 threads with
N = 600: 3 groups of the head's 600 channels). At B = 1 the tail's workers share dWv and dbv.
With more than twice as many workers as tiles per batch element (B = 3 on 3 threads, one
tile each), or with N ≥ 4096 on two workers or more, the tail shares each tile among the
workers, by ranges of rows (N = 600: three ranges of 200, across d dec2's blocks of 256
rows) and of d_window's columns.
"""

from __future__ import annotations

import pytest
import torch

from casa_kernels.ops import weight_cache
from casa_kernels.ops.backends.cpu_backward import bottleneck_activations
from casa_kernels.ops.registry import get_backend
from casa_kernels.reference import stages as reference_stages
from casa_kernels.tolerance import assert_close_to_reference, compare_gradient
from tests.conftest import make_problem
from tests.ops import gradients
from tests.ops.gradients import FIELDS

pytestmark = pytest.mark.skipif(
    get_backend("cpu").unavailable_reason() is not None,
    reason=f"the cpu backend is unavailable: {get_backend('cpu').unavailable_reason()}",
)

SHAPES = {
    "N<rows,D=8,k=1": (1, 5, 8, 1, 1),
    "N=64+6,D=16,two-tiles,k=3": (3, 70, 16, 3, 2),
    "N=3x64+8,D=24,three-tiles,k=5": (1, 200, 24, 5, 3),
    "N<rows,D=16,k=7": (3, 9, 16, 7, 3),
    "N=2x64+2,D=16,tiles-6+6+4": (1, 130, 16, 3, 3),
    "D=128,shared-accumulators": (1, 130, 128, 3, 3),
    "D=128,B=3,per-worker-accumulators": (3, 130, 128, 3, 2),
    "D=128,N=600,uneven-head-groups": (1, 600, 128, 3, 2),
    "D=512,B=1,four-tiles-of-128": (1, 70, 512, 3, 2),
    "shared-tiles,N=131,D=32,k=5": (3, 131, 32, 5, 3),
    "shared-tiles,N=600,D=128": (3, 600, 128, 3, 3),
    "shared-tiles,N=4100,B=1": (1, 4100, 16, 3, 2),
}
# The score network's convolutions from the top (h5) down, with their weights: a gradient
# of a layer's weights or bias, or of x, costs the backward of every layer from the top down
# to it (each a range "casa::cpu backward <layer>" in profiler traces).
LAYERS = {
    "dec1": ("dec1_weight", "dec1_bias"),
    "dec0": ("dec0_weight", "dec0_bias"),
    "enc2": ("enc2_weight", "enc2_bias"),
    "enc1": ("enc1_weight", "enc1_bias"),
    "enc0": ("x", "enc0_weight", "enc0_bias"),
}


def _op(leaves):
    return torch.ops.casa.score_attention(*leaves, "cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_every_gradient_matches_the_float64_reference(threads, shape, dtype):
    batch, n_vars, d_model, kernel, n_threads = shape
    threads(n_threads)
    x, w = make_problem(batch, n_vars, d_model, kernel, dtype=dtype, seed=3)
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    y = _op(leaves)
    assert_close_to_reference(y, x, w)
    ours = torch.autograd.grad(y, leaves, grad)
    ref64 = gradients.reference_grads((x, *w), grad, torch.float64)
    same = gradients.reference_grads((x, *w), grad, dtype) if dtype == torch.bfloat16 else ref64
    for name, got, want, want_dtype in zip(FIELDS, ours, ref64, same):
        result = compare_gradient(got, want, want_dtype)
        assert result.passed, f"{name}: max abs {result.max_abs_error:.3g} ({result.rule})"


def _layers_run(wanted) -> list[str]:
    """The layers whose backward the gradients ``wanted`` need, top down."""
    names = list(LAYERS)
    needed = [i for i, name in enumerate(names) if set(LAYERS[name]) & set(wanted)]
    return names[: needed[-1] + 1] if needed else []


@pytest.mark.parametrize(
    "wanted", gradients.subsets(), ids=lambda s: "+".join(s) if len(s) < 4 else "weights"
)
def test_each_subset_of_gradients_costs_only_what_it_needs(threads, wanted):
    threads(2)
    x, w = make_problem(1, 70, 16, 3, dtype=torch.float64, seed=4)
    grad = gradients.grad_out(x)
    leaves = [t.detach().clone().requires_grad_(name in wanted) for name, t in zip(FIELDS, (x, *w))]
    y = _op(leaves)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], grad)
    names = [event.name for event in prof.events()]
    assert names.count("casa::cpu_score_attention_backward") == 1
    ran = [name.removeprefix("casa::cpu backward ") for name in names]
    assert [layer for layer in ran if layer in LAYERS] == _layers_run(wanted)
    ref = gradients.reference_grads((x, *w), grad, torch.float64, wanted)
    for name, got, want in zip([n for n in FIELDS if n in wanted], ours, ref):
        result = compare_gradient(got, want)
        assert result.passed, f"{name}: max abs {result.max_abs_error:.3g} ({result.rule})"


@pytest.mark.parametrize("shape", [(2, 5, 8, 3, 2), (1, 3, 16, 1, 2)], ids=["two-tiles", "k=1"])
def test_gradcheck_in_float64(threads, shape):
    batch, n_vars, d_model, kernel, n_threads = shape
    threads(n_threads)
    x, w = make_problem(batch, n_vars, d_model, kernel, dtype=torch.float64, seed=6)
    # fast_mode: a random projection of the Jacobian, a few forwards instead of one per
    # element (tests/ops/test_conformance.py runs the full check on a smaller problem).
    with weight_cache.disabled():  # gradcheck perturbs the weights in place
        assert torch.autograd.gradcheck(
            lambda *a: _op(a), gradients.leaves((x, *w)), fast_mode=True
        )


def _pattern(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


NONFINITE = {
    "nan": [((0, 3, 5), float("nan"))],
    "inf": [((1, 60, 7), float("inf"))],
    "-inf": [((0, 10, 0), float("-inf"))],
    "mixed": [((0, 3, 5), float("nan")), ((1, 60, 7), float("inf")), ((1, 2, 15), float("-inf"))],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", NONFINITE.values(), ids=NONFINITE.keys())
def test_nonfinite_x_gives_the_references_gradient_pattern(threads, values, dtype):
    # Against the reference's autograd in float64 (the definition; in fp32 and bfloat16 the
    # reference's oneDNN convolutions put 0·inf elsewhere: their pattern is theirs).
    threads(2)
    x, w = make_problem(2, 70, 16, 3, dtype=dtype, seed=7)
    x = x.clone()
    for index, value in values:
        x[index] = value
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    ours = torch.autograd.grad(_op(leaves), leaves, grad)
    ref = gradients.reference_grads((x, *w), grad, torch.float64)
    for name, got, want in zip(FIELDS, ours, ref):
        got = got.double()
        for got_mask, want_mask in zip(_pattern(got), _pattern(want)):
            assert torch.equal(got_mask, want_mask), f"{name}: non-finite pattern differs"
        finite = torch.isfinite(want)
        if not finite.any():  # NaN in x reaches every gradient through the head
            continue
        scale = want[finite].abs().max()
        assert (got[finite] - want[finite]).abs().max() <= 2e-2 * scale, name


# (batch, d_model, kernel, threads): GEMMs split by rows (few columns, B·length < 128 per
# thread) and by columns (B = 16 at D = 64: 256 columns in enc1's GEMM), k from 1 to 7.
BOTTLENECK_SHAPES = {
    "B=1,D=8,k=1": (1, 8, 1, 1),
    "B=3,D=24,k=5,rows": (3, 24, 5, 2),
    "B=2,D=16,k=7": (2, 16, 7, 3),
    "B=16,D=64,k=3,columns": (16, 64, 3, 2),
    "B=1,D=512,k=3": (1, 512, 3, 2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", BOTTLENECK_SHAPES.values(), ids=BOTTLENECK_SHAPES.keys())
def test_bottleneck_activations_match_the_official_convs(threads, shape, dtype):
    # The training forward's bottleneck (casa::cpu_bottleneck) keeps the four conv outputs
    # the backward takes: [B, channels, length] in the accumulation dtype, the weights of any
    # dtype cast to it, against the official convs in float64.
    batch, d_model, kernel, n_threads = shape
    threads(n_threads)
    _, w = make_problem(1, 3, d_model, kernel, dtype=dtype, seed=21)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(22)
    h1 = torch.rand(batch, d_model // 4, d_model // 2, generator=g, dtype=torch.float64).to(acc)
    got = bottleneck_activations(h1, w)
    want = reference_stages.bottleneck_activations(h1.double(), w)
    tol = {"rtol": 1e-12, "atol": 1e-12} if acc == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, a, b in zip(("enc1", "enc2", "dec0", "h5"), got, want):
        assert a.dtype == acc and a.shape == b.shape, (name, a.dtype, a.shape)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_bottleneck_of_an_empty_batch_and_bad_arguments_by_name():
    _, w = make_problem(1, 3, 16, 3, seed=23)
    empty = bottleneck_activations(torch.empty(0, 4, 8), w)
    assert [tuple(t.shape) for t in empty] == [(0, 8, 4), (0, 16, 2), (0, 8, 4), (0, 4, 8)]
    args = (w.enc1_weight, w.enc1_bias, w.enc2_weight, w.enc2_bias)
    args += (w.dec0_weight, w.dec0_bias, w.dec1_weight, w.dec1_bias)
    with pytest.raises(RuntimeError, match="h1: expected dtype float32 or float64"):
        torch.ops.casa.cpu_bottleneck(torch.rand(1, 4, 8, dtype=torch.bfloat16), *args)
    with pytest.raises(RuntimeError, match=r"h1: expected \[batch, d_model/4, d_model/2\]"):
        torch.ops.casa.cpu_bottleneck(torch.rand(1, 4, 9), *args)
    bad = list(args)
    bad[4] = w.dec0_weight[:, :, :1]
    with pytest.raises(RuntimeError, match=r"dec0_weight: expected shape \[16, 8, 3\]"):
        torch.ops.casa.cpu_bottleneck(torch.rand(1, 4, 8), *bad)


def test_saves_no_batch_sized_intermediate(threads):
    # Saved for the backward besides x and the weights: the five activations of
    # [B, channels, length] (B·5·D²/8 elements) and the column statistics (2·B·D).
    threads(2)
    batch, n_vars, d_model = 2, 70, 16
    x, w = make_problem(batch, n_vars, d_model, 3, seed=8)
    leaves = gradients.leaves((x, *w))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _op(leaves)
    inputs = {t.data_ptr() for t in leaves}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert len(saved) == len(leaves) + len(extra)
    assert all(t.shape != x.shape for t in extra)
    assert sum(t.numel() for t in extra) == batch * 5 * d_model**2 // 8 + 2 * batch * d_model


def test_workers_share_one_d_dec2_accumulator(threads):
    # d dec2 by parity ([N, taps·D/4], the largest gradient at large N) is one accumulator
    # that every worker adds to by blocks of rows, not one per worker: three workers (one
    # batch element each) allocate the even parity's [N, 2·D/4] once.
    threads(3)
    batch, n_vars, d_model = 3, 1000, 64
    x, w = make_problem(batch, n_vars, d_model, 3, seed=2)
    leaves = gradients.leaves((x, *w))
    y = _op(leaves)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        torch.autograd.grad(y, leaves, gradients.grad_out(x))
    sizes = [
        event.nbytes()
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.nbytes() > 0
    ]
    assert sizes.count(n_vars * 2 * (d_model // 4) * 4) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backward_takes_the_forwards_tail_layouts(threads, dtype):
    # The backward reads dec2 by parity, Wv^T and bv in the forward's tile layout from the
    # forward's prepared list (the weight cache); it lays them out itself (the profiler
    # range "casa::cpu backward layouts") only from bfloat16 layouts, on a CPU with
    # bfloat16 GEMMs. The gradient tests above run on the forward's layouts.
    from casa_kernels.ops.backends.cpu import bf16_gemm_tier

    threads(2)
    x, w = make_problem(2, 70, 32, 3, dtype=dtype, seed=13)
    leaves = gradients.leaves((x, *w))
    y = _op(leaves)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(y, leaves, gradients.grad_out(x))
    names = [event.name for event in prof.events()]
    own_layouts = dtype == torch.bfloat16 and bf16_gemm_tier() != "none"
    assert names.count("casa::cpu backward layouts") == own_layouts


def test_backward_from_bfloat16_layouts_lays_them_out_as_cpu_prepare_tail(threads):
    # Given the forward's bfloat16 tail layouts (a CPU with bfloat16 GEMMs), the backward
    # takes cpu_prepare_tail's layouts without bfloat16 GEMMs (in fp32) instead: its
    # gradients equal those it gives from those fp32 layouts, bit for bit, on any CPU (on one
    # thread: with more, the tiles' parts of d dec2 are added in the order the workers reach
    # them, so the last bits can differ from run to run).
    from casa_kernels.ops.backends import cpu_backward
    from casa_kernels.ops.backends.cpu import _kernels

    threads(1)
    x, w = make_problem(2, 70, 32, 3, dtype=torch.bfloat16, seed=17)
    _, (*activations, col_max, col_sum) = cpu_backward.forward_saving(x, w)
    grad, needs, kernels = gradients.grad_out(x), [True] * 15, _kernels()
    tail = (w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, 16)
    fp32, bf16 = (kernels.cpu_prepare_tail(*tail, tier) for tier in ("none", "avx512_bf16"))
    assert (fp32[0].dtype, bf16[0].dtype) == (torch.float32, torch.bfloat16)
    grads = {}
    for name, layouts in (("fp32", fp32), ("bf16", bf16)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            grads[name] = kernels.cpu_score_attention_backward(
                grad, x, list(w), activations, col_max, col_sum, layouts, 16, needs
            )
        own = [event.name for event in prof.events()].count("casa::cpu backward layouts")
        assert own == (name == "bf16"), name
    for field, a, b in zip(FIELDS, grads["fp32"], grads["bf16"]):
        assert torch.equal(a, b), field


def test_bfloat16_layouts_of_another_tile_width_are_an_error_naming_them(threads):
    # The backward reads the forward's bfloat16 Wv^T packed tile by tile (and dec2 by
    # parity), so layouts packed for another width are refused, not misread.
    from casa_kernels.ops.backends import cpu_backward
    from casa_kernels.ops.backends.cpu import _kernels

    threads(1)
    x, w = make_problem(2, 70, 32, 3, dtype=torch.bfloat16, seed=17)
    _, (*activations, col_max, col_sum) = cpu_backward.forward_saving(x, w)
    kernels = _kernels()
    tail = (w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias)
    packed_for_8 = kernels.cpu_prepare_tail(*tail, 8, "avx512_bf16")
    with pytest.raises(
        RuntimeError,
        match=r"prepared\[2\] \(value_weight\^T\): expected shape \[\d+\], received \[\d+\]",
    ):
        kernels.cpu_score_attention_backward(
            gradients.grad_out(x),
            x,
            list(w),
            activations,
            col_max,
            col_sum,
            packed_for_8,
            16,
            [True] * 15,
        )


@pytest.mark.parametrize("n_vars", [8, 862], ids=["N=8", "N=862"])
def test_forward_backward_at_batch_one_peaks_under_the_reference(threads, n_vars):
    # At B = 1 the backward takes the forward's tail layouts from the weight cache (dec2 by
    # parity, Wv^T and bv in tile order: no copies of its own) and reads the head's W^T as
    # a view, so its peak extra memory stays under the reference autograd's at D = 512:
    # with few variates, where O(D²) weight layouts dominate (measured 6.0 against 6.4
    # MiB; 7.1 with copies), and with many (12.8 against 14.6 MiB; 14.1 with copies).
    from bench.measure import cpu_peak_allocated

    threads(2)
    x, w = make_problem(1, n_vars, 512, 3, seed=12)
    leaves = gradients.leaves((x, *w))
    grad = gradients.grad_out(x)

    def forward_backward(backend):
        return torch.autograd.grad(torch.ops.casa.score_attention(*leaves, backend), leaves, grad)

    forward_backward("cpu")  # the forward's layouts cached, as in any call after the first
    fused = cpu_peak_allocated(lambda: forward_backward("cpu"))
    reference = cpu_peak_allocated(lambda: forward_backward("reference"))
    assert fused < reference, f"peak extra memory {fused} B, the reference's {reference} B"


def test_double_backward_raises_naming_the_backend(threads):
    threads(1)
    x, w = make_problem(1, 5, 8, 3, dtype=torch.float64, seed=9)
    leaves = gradients.leaves((x, *w))
    y = _op(leaves)
    with pytest.raises(RuntimeError, match=r"double backward.*cpu backend"):
        torch.autograd.grad(y.sum(), leaves[0], create_graph=True)


def test_nonfinite_weights_use_the_references_backward(threads):
    # The forward hands NaN weights to the reference; so does the backward.
    threads(1)
    x, w = make_problem(2, 9, 16, 3, seed=10)
    w = w._replace(
        enc1_weight=w.enc1_weight.clone().index_fill_(0, torch.tensor([1]), float("nan"))
    )
    grad = gradients.grad_out(x)
    leaves = gradients.leaves((x, *w))
    ours = torch.autograd.grad(_op(leaves), leaves, grad)
    for name, got, want in zip(
        FIELDS, ours, gradients.reference_grads((x, *w), grad, torch.float32)
    ):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def test_gradients_do_not_depend_on_thread_count(threads):
    # B = 1 on 3 threads splits the tail into tiles whose dx rows and dh5 columns overlap.
    x, w = make_problem(1, 130, 40, 5, seed=11)
    grad = gradients.grad_out(x)
    results = []
    for n_threads in (1, 3):
        threads(n_threads)
        leaves = gradients.leaves((x, *w))
        results.append(torch.autograd.grad(_op(leaves), leaves, grad))
    for name, one, many in zip(FIELDS, *results):
        torch.testing.assert_close(
            one, many, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def _backward_peaks(batch, n_vars, d_model, seed, thread_counts, threads):
    """Peak of the running sum of CPU allocator events during the op's backward
    (``bench.measure.cpu_peak_allocated``), by thread count: {threads: bytes}."""
    from bench.measure import cpu_peak_allocated

    x, w = make_problem(batch, n_vars, d_model, 3, seed=seed)
    leaves = gradients.leaves((x, *w))
    grad = gradients.grad_out(x)
    peaks = {}
    for n_threads in thread_counts:
        threads(n_threads)
        y = _op(leaves)
        peaks[n_threads] = cpu_peak_allocated(lambda y=y: torch.autograd.grad(y, leaves, grad))
    return peaks


def test_tail_memory_does_not_grow_with_the_threads(threads):
    # B = 8 at D = 64: one tile of 64 columns per batch element. With whole tiles per worker
    # (2 threads) each worker holds a tile's three [N, T] buffers (3·N·64 floats); 8 threads
    # share each tile, so they take less than one more tile's buffers than 2 threads do
    # (whole tiles on 8 threads: six more).
    n_vars, d_model = 4000, 64
    peaks = _backward_peaks(8, n_vars, d_model, 4, (2, 8), threads)
    assert peaks[8] - peaks[2] < 3 * n_vars * d_model * 4, peaks


def test_tail_shares_its_tiles_from_4096_variates(threads):
    # B = 1, D = 64: one thread runs one tile of 64 columns, two threads two tiles of 32. With
    # whole tiles two workers would hold as much as one (2 · 3·N·32 values); from N = 4096 the
    # two share each tile, holding 3·N·32.
    n_vars = 8192
    peaks = _backward_peaks(1, n_vars, 64, 5, (1, 2), threads)
    assert peaks[2] < peaks[1] - n_vars * 32 * 4, peaks


def test_backward_tiles_stay_narrow_when_the_batch_fills_the_threads(threads):
    # B = 4 at D = 512 on 2 threads: a forward alone takes whole-width tiles (the batch
    # keeps both threads busy), but from N = 512 on a backward's are at most 128 columns, so its two
    # workers hold 2 · 3·N·128 floats of [N, T] buffers rather than 2 · 3·N·512. Its peak
    # stays under dx plus what whole-width buffers alone would take.
    batch, n_vars, d_model = 4, 1000, 512
    peaks = _backward_peaks(batch, n_vars, d_model, 6, (2,), threads)
    dx_bytes = batch * n_vars * d_model * 4
    assert peaks[2] < dx_bytes + 2 * 3 * n_vars * d_model * 4, peaks
