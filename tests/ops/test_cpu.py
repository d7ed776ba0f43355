"""What is specific to the fused CPU kernel (backend "cpu", docs/design.md §5–§7): oneDNN
off, thread counts, grad modes on the OpenMP workers, its exact workspace, the block
epilogue, the bfloat16 GEMM tiers, the modules' default. What every backend must satisfy
(shapes, strides, gradients, opcheck, fuzzing, extremes, memory) is in test_conformance.py.
"""

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import casa_kernels as ck
from casa_kernels.ops import registry
from casa_kernels.ops.backends.cpu import block_epilogue
from casa_kernels.tolerance import (
    LOW_PRECISION_EPS,
    assert_close_to_reference,
    compare_with_exact,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_without_onednn(problem, dtype):
    # With oneDNN disabled the kernel's GEMMs take ATen's BLAS path instead of oneDNN's
    # micro-kernels (fp32) and the matrix unit (bf16): the path of CPUs without them.
    x, w = problem(3, 130, 264, 5, dtype=dtype)
    with torch.backends.mkldnn.flags(enabled=False):
        out = ck.casa_attention(x, w, backend="cpu")
    assert_close_to_reference(out, x, w)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, d_model",
    [(1, 512), (16, 128)],  # the bottleneck GEMMs' 64..128 columns, or 256..512 columns
    ids=["rows-split", "columns-split"],
)
def test_bottleneck_split_across_two_threads(problem, dtype, batch, d_model):
    # With 2 threads the bottleneck's GEMMs (each of 2^21 multiply-adds or more here, worth
    # both threads) split their columns when each thread gets 128 or more (B·D/8 >= 256
    # here), else their rows; both must give the 1-thread result. bfloat16 with bfloat16
    # GEMMs (AMX, avx512_bf16) runs the channels-last bottleneck instead, split into (batch
    # element, 64-row chunk) items and, at B = 1, into groups of output channels too.
    x, w = problem(batch, 5, d_model, 3, dtype=dtype)
    caller_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ck.casa_attention(x, w, backend="cpu")
        torch.set_num_threads(2)
        two = ck.casa_attention(x, w, backend="cpu")
    finally:
        torch.set_num_threads(caller_threads)
    assert_close_to_reference(two, x, w)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


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


def test_temporaries_are_one_scratch_per_worker(problem):
    # The CPU's exact share of the memory contract (docs/design.md §5.6; the generic bound is
    # test_conformance's): besides the output, O(B·D²) (prepared weights included: the
    # cache starts cold) plus one fp32 [N, D] scratch per worker thread.
    from bench.measure import cpu_peak_allocated

    B, N, D = 8, 2000, 64
    x, w = problem(B, N, D, 3)
    peak = cpu_peak_allocated(lambda: ck.casa_attention(x, w, backend="cpu"))
    output, n_by_d = B * N * D * 4, N * D * 4
    bound = output + (torch.get_num_threads() + 1) * n_by_d + 8 * B * D * D * 4
    assert output <= peak <= bound, f"peak {peak} bytes vs bound {bound} ([B, N, D] = {output})"
    assert bound < 2 * output  # the bound excludes any [B, N, D]-sized temporary


def _tail_idle_share(batch, d_model, tile, n_threads):
    """The threads' idle share when batch · ⌈D/T⌉ tiles are dealt out in rounds."""
    items = batch * -(-d_model // tile)
    slots = -(-items // n_threads) * n_threads
    return (slots - items) / slots


def _split_width(d_model, tiles):
    """The width of D split into `tiles` tiles: D/tiles rounded up, then up to even."""
    return (-(-d_model // tiles) + 1) // 2 * 2


@pytest.mark.parametrize("n_threads", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n_vars", [321, 511, 512, 862, 4095, 4096, 16384])
@pytest.mark.parametrize("for_backward", [True, False], ids=["for-backward", "forward-alone"])
def test_tail_tiles_are_the_whole_width_or_a_capped_split(threads, n_threads, n_vars, for_backward):
    # The tail tile rule (csrc/cpu/tail_layout.h, docs/design.md §5.3): the whole width D
    # when the batch alone keeps the threads busy (for a backward from N = 512 on, only up
    # to 128 columns); else the widest split of D of at most 128 columns (256 for a forward
    # alone from N = 4096 on) that leaves at most 1/8 of the threads' time idle (2 if none
    # does). A backward takes the layouts of the same tiles.
    from casa_kernels.ops.backends.cpu import _kernels

    threads(n_threads)
    cap = 256 if not for_backward and n_vars >= 4096 else 128
    for d_model in (8, 16, 128, 136, 256, 512, 1024):
        for batch in (1, 2, 3, 5, 16, 17):
            tile = _kernels().cpu_tail_tile(batch, n_vars, d_model, for_backward)
            label = f"B={batch}, N={n_vars}, D={d_model}, {n_threads} threads: T={tile}"
            whole_fits = not for_backward or n_vars < 512 or d_model <= cap
            if whole_fits and _tail_idle_share(batch, d_model, d_model, n_threads) <= 1 / 8:
                assert tile == d_model, label
                continue
            splits = {_split_width(d_model, tiles) for tiles in range(1, d_model // 2 + 1)}
            busy = [
                t
                for t in splits
                if t <= cap and _tail_idle_share(batch, d_model, t, n_threads) <= 1 / 8
            ]
            assert tile == max(busy, default=2), label


def test_many_variates_at_batch_one_run_256_column_tiles(problem, threads):
    # B = 1, D = 512 on 2 threads: the inference forward splits D into two 256-column
    # tiles from N = 4096 on, the training forward (whose layouts the backward takes) into
    # four of 128; both give the reference's output and gradients' forward.
    from casa_kernels.ops.backends.cpu import _tile_and_tier

    threads(2)
    x, w = problem(1, 4096, 512, 3)
    assert _tile_and_tier(x, for_backward=False)[0] == 256
    assert _tile_and_tier(x, for_backward=True)[0] == 128
    with torch.inference_mode():
        assert_close_to_reference(ck.casa_attention(x, w, backend="cpu"), x, w)
    x = x.requires_grad_()
    assert_close_to_reference(ck.casa_attention(x, w, backend="cpu").detach(), x.detach(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bottleneck_activations_are_one_allocation(problem, dtype):
    # docs/design.md §5.6: the head's and bottleneck's activations are views of one block
    # per call, and h5 has its own; one allocation per activation made glibc hand the
    # memory back and fault it in again on every call. Counted here: the allocations of a
    # warm call at least as large as the layout's smallest activation (y, the prepared
    # weights, the workers' packing buffers and tail scratch, and the GEMM library's own
    # scratch on every ISA tier, are smaller at this shape).
    from torch.profiler import ProfilerActivity, profile

    B, N, D = 16, 5, 256
    x, w = problem(B, N, D, 3, dtype=dtype)
    ck.casa_attention(x, w, backend="cpu")  # the weight cache warm
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = ck.casa_attention(x, w, backend="cpu")
    sizes = sorted(
        e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    activation = B * D * D // 8 * 4  # [D/4, B, D/2] in fp32: h1, h5
    if dtype == torch.bfloat16 and torch.ops.casa.cpu_bf16_gemm() != "none":
        # h1, then the three channels-last bfloat16 activations with a zero row each side
        padded = [(D // 2 + 2, D // 4), (D // 4 + 2, D // 2), (D // 8 + 2, D)]
        pieces = [2 * B * rows * channels for rows, channels in padded]
    else:  # io, mid and the im2col/col2im columns (k·B·D²/16 elements)
        pieces = [activation, 3 * activation // 2]
    block = activation + sum(pieces)
    large = [n for n in sizes if n >= min(pieces)]
    assert large == sorted([activation, block]), sizes
    assert_close_to_reference(y, x, w)


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


def _epilogue_params(block):
    norm, (linear0, _, linear2) = block.norm, block.mlp
    return (
        norm.weight,
        norm.bias,
        norm.eps,
        linear0.weight,
        linear0.bias,
        linear2.weight,
        linear2.bias,
    )


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
        ours = block_epilogue(y.to(dtype), *_epilogue_params(block), relu)
    assert ours.dtype == dtype and ours.shape == y.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), exact, rtol=2e-5, atol=2e-5)
    else:  # tolerance.py's rule, twice PyTorch's own bf16 error plus eps, with eps relative:
        # LayerNorm outputs reach |6|, where one bfloat16 ulp (0.03) is eps itself.
        eps = LOW_PRECISION_EPS[dtype] * exact.abs().clamp_min(1.0)
        bound = 2 * (eager.double() - exact).abs() + eps
        assert bool(((ours.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("rows", [13, 137])
def test_block_epilogue_splits_rows_evenly_over_any_thread_count(threads, rows, n_threads):
    # D = 160: enough work for every thread. The rows go in blocks of at most 64, as many per
    # worker: 137 rows on 2 threads are 4 blocks of 35 or 32, on 3 threads 3 of 46 or 45;
    # 13 rows on 8 threads are 8 blocks of 2, the last one empty. Every row is written once.
    torch.manual_seed(rows)
    block = ck.CASABlock(n_vars=3, d_model=160)
    y = torch.randn(rows, 160) * 3 + 1
    threads(n_threads)
    with torch.no_grad():
        ours = block_epilogue(y, *_epilogue_params(block), True)
        exact = _eager_epilogue(y.double(), block.norm.double(), block.mlp.double(), True)
    torch.testing.assert_close(ours.double(), exact, rtol=2e-5, atol=2e-5)


def _flat_rows(D, dtype):
    """Rows where LayerNorm's eps decides the result: constants whose sums are exact in fp32
    and bf16 (variance exactly 0: the output is the norm's bias) and rows varying by 1e-4
    and 1e-7 (variance 1e-8 and 1e-14, below eps = 1e-5) about 0 and 2 (about 2, bf16
    rounds them to constants)."""
    g = torch.Generator().manual_seed(D)
    constants = [torch.full((D,), c) for c in (0.0, 1.0, -3.0, 2.5)]
    varying = [
        centre + spread * torch.randn(D, generator=g)
        for spread in (1e-4, 1e-7)
        for centre in (0.0, 2.0)
    ]
    return torch.stack(constants + varying).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_epilogue_on_constant_and_near_constant_rows(dtype):
    # LayerNorm divides by sqrt(var + eps): on these rows eps is most of it, so eps dropped
    # (0/0 = NaN), added outside the square root or to the sum of squares shows here.
    torch.manual_seed(3)
    block = ck.CASABlock(n_vars=3, d_model=40)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    y = _flat_rows(40, dtype)
    with torch.no_grad():
        exact = _eager_epilogue(y.double(), block.norm.double(), block.mlp.double(), False)
        block.to(dtype)
        eager = _eager_epilogue(y, block.norm, block.mlp, False)
        ours = block_epilogue(y, *_epilogue_params(block), False)
    result = compare_with_exact(ours, eager, exact)
    assert result.passed, f"{dtype}: {result}"


def test_block_epilogue_reads_vectors_of_any_float_dtype_and_stride():
    # The four vectors are read as fp32 in place where they are contiguous fp32, else
    # converted element by element: a strided view or fp64 copy must give the same values.
    torch.manual_seed(5)
    block = ck.CASABlock(n_vars=3, d_model=40)
    y = torch.randn(7, 40)
    norm_w, norm_b, eps, w0, b0, w2, b2 = _epilogue_params(block)
    strided = [torch.stack([v.detach(), torch.full_like(v, 9.0)], 1)[:, 0] for v in (norm_w, b0)]
    assert not strided[0].is_contiguous()
    with torch.no_grad():
        expected = block_epilogue(y, *_epilogue_params(block), True)
        ours = block_epilogue(
            y, strided[0], norm_b.double(), eps, w0, strided[1], w2, b2.double(), True
        )
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="epilogue vectors: expected floating-point"):
            block_epilogue(y, norm_w, norm_b.long(), eps, w0, b0, w2, b2, True)


def test_block_epilogue_keeps_nan_rows_and_empty_input():
    block = ck.CASABlock(n_vars=3, d_model=16)
    y = torch.randn(5, 16)
    y[2, 7] = float("nan")
    with torch.no_grad():
        out = block_epilogue(y, *_epilogue_params(block), True)
        assert torch.equal(out.isnan(), _eager_epilogue(y, block.norm, block.mlp, True).isnan())
        assert block_epilogue(y[:0], *_epilogue_params(block), True).shape == (0, 16)


def test_block_uses_the_fused_epilogue_for_inference_only(monkeypatch):
    block = ck.CASABlock(n_vars=7, d_model=16, backend="cpu")
    x = torch.randn(2, 7, 16)
    calls = []
    cpu = registry.get_backend("cpu")
    counting = cpu.block_epilogue._replace(run=lambda *a: calls.append(1) or block_epilogue(*a))
    monkeypatch.setitem(
        registry._BACKENDS, "cpu", dataclasses.replace(cpu, block_epilogue=counting)
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
from casa_kernels.ops.backends.cpu import bf16_gemm_tier
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


BF16_ULP = {"rtol": 2**-7, "atol": 1e-2}


def _linear_operands(transposed, with_bias, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x_shape = (5, 96, 7) if transposed else (5, 7, 96)  # the embedding's input: [B, L, N]ᵀ
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in (x_shape, (64, 96), (64,)))
    w.requires_grad_(requires_grad)
    return x.transpose(1, 2) if transposed else x, w, b if with_bias else None


@pytest.mark.parametrize("tier", ["none", "amx"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_in_bfloat16_runs_fp32_gemms_only_without_bfloat16_gemms(
    monkeypatch, tier, transposed, with_bias
):
    # The forecaster's embedding and head (cpu backend's `linear`): on a CPU without
    # bfloat16 GEMMs, fp32 GEMMs on the exact conversion, rounded once (the kernel
    # cpu_linear_bf16 for inference); elsewhere F.linear.
    from casa_kernels.ops.backends import cpu

    monkeypatch.setattr(cpu, "bf16_gemm_tier", lambda: tier)
    x, w, b = _linear_operands(transposed, with_bias)
    out = cpu.linear(x, w, b)
    fp64 = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    if tier == "none":  # the exact value rounded once: within one bfloat16 ulp of it
        ulp = torch.exp2(torch.floor(torch.log2(fp64.abs().clamp_min(2**-100))) - 7)
        assert bool(((out.double() - fp64).abs() <= ulp).all())
    else:
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=0, atol=0)
    assert out.dtype == torch.bfloat16 and out.shape == fp64.shape and out.is_contiguous()
    w.mul_(-2)  # an in-place update: the kernel's Wᵀ (prepared once per version) follows it
    torch.testing.assert_close(cpu.linear(x, w, b), torch.nn.functional.linear(x, w, b), **BF16_ULP)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_in_bfloat16_carries_gradients_without_bfloat16_gemms(monkeypatch, transposed):
    # Where autograd records the call the kernel (no autograd) is not used: fp32 casts.
    from casa_kernels.ops.backends import cpu

    monkeypatch.setattr(cpu, "bf16_gemm_tier", lambda: "none")
    x, w, b = _linear_operands(transposed, True, requires_grad=True)
    out = cpu.linear(x, w, b)
    out.float().square().sum().backward()
    w32 = w.detach().float().requires_grad_()
    expected = torch.nn.functional.linear(x.float(), w32, b.float()).bfloat16()
    expected.float().square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(w.grad.float(), w32.grad.bfloat16().float(), rtol=0, atol=0)


def test_linear_kernel_rejects_bad_operands_by_name():
    x, w, b = _linear_operands(False, True)
    w = w.t().float().contiguous()  # the kernel takes Wᵀ in fp32
    kernel = torch.ops.casa.cpu_linear_bf16
    with pytest.raises(RuntimeError, match="x: expected a bfloat16 CPU tensor"):
        kernel(x.float(), w, b)
    with pytest.raises(RuntimeError, match=r"weight_t: expected a contiguous float32"):
        kernel(x, w.t(), b)
    with pytest.raises(
        RuntimeError, match=r"x: expected \[..., in_features\] with in_features = 96"
    ):
        kernel(x[..., :95], w, b)
    with pytest.raises(RuntimeError, match=r"bias: expected \[out_features\] = \[64\]"):
        kernel(x, w, b[:63])
    empty = kernel(x[:0], w, b)
    assert empty.shape == (0, 7, 64)


# The cpu backend's conformance and backward tests, rerun under lower tiers (read once per
# process): the kernel's vector loops capped (ATEN_CPU_CAPABILITY) with oneDNN and MKL
# capped alike (so bfloat16 has no bfloat16 GEMMs: the fp32 path), and the bfloat16 GEMMs
# forced to avx512_bf16, so that every tier's code is checked on any machine that has it.
_TIER_TESTS = [
    "tests/ops/test_conformance.py",
    "tests/ops/test_cpu_backward.py",
    "-k",
    "cpu and not triton and not cuda",
]
_TIERS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "CASA_CPU_BF16_GEMM": "avx512_bf16"},
}
_TIER_REPORT = """
from casa_kernels.ops.backends.cpu import bf16_gemm_tier, vector_isa
print(vector_isa(), bf16_gemm_tier())
"""


def _without_tier_settings() -> dict[str, str]:
    """This process's environment less the settings that choose a tier."""
    chosen = {name for settings in _TIERS.values() for name in settings}
    return {name: value for name, value in os.environ.items() if name not in chosen}


def _tiers_under(env: dict[str, str]) -> tuple[str, str]:
    """(vector loops, bfloat16 GEMMs) of a fresh process with ``env``."""
    out = subprocess.run(
        [sys.executable, "-c", _TIER_REPORT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_without_tier_settings(), **env},
        cwd=ROOT,
    )
    if out.returncode != 0:
        return "", out.stderr.strip().splitlines()[-1]
    vector, gemm = out.stdout.split()[-2:]
    return vector, gemm


@pytest.mark.parametrize("tier", _TIERS)
def test_lower_tiers_pass_the_cpu_tests(tier):
    native_vector, native_gemm = _tiers_under({})
    if tier == "avx2" and native_vector == "baseline":
        pytest.skip("needs a CPU with AVX2 and FMA")
    if tier == "avx512_bf16" and native_gemm == "none":
        pytest.skip("needs a CPU with bfloat16 dot products (avx512_bf16)")
    expected = {"avx2": ("avx2", "none"), "baseline": ("baseline", "none")}
    assert _tiers_under(_TIERS[tier]) == expected.get(tier, (native_vector, "avx512_bf16"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *_TIER_TESTS],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**_without_tier_settings(), **_TIERS[tier]},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1]
