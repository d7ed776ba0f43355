"""What is specific to the ``triton`` backend (docs/design.md §7): head splits, tail tile
heights, the bottleneck at every width, TF32, launches, the single-config switch, the
weight packing, its stages with explicit tiles, non-finite values over split tails, bf16
rounding, the cubin compile check, CUDA graphs. What every backend must satisfy (shapes,
strides, low precision, gradients, opcheck, fuzzing, extremes, memory) is in
test_conformance.py.

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
from casa_kernels.ops.registry import ProblemShape, get_backend, resolve_backend
from casa_kernels.reference import stages as ref_stages
from casa_kernels.tolerance import assert_close_to_reference

from ..conftest import make_problem

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = triton.language

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (CUDA or INTERPRET):
    pytest.skip(
        "needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1)",
        allow_module_level=True,
    )

from casa_kernels.ops.triton_kernels import HEAD_BLOCK_N, triton_score_attention  # noqa: E402
from casa_kernels.ops.triton_kernels import kernels as tkernels  # noqa: E402
from casa_kernels.ops.triton_kernels import launch as tk  # noqa: E402
from casa_kernels.ops.triton_kernels import tiles as ttiles  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def _problem(shape, dtype=torch.float32, seed=0):
    return make_problem(*shape, dtype=dtype, device=DEVICE, seed=seed)


def test_backend_registered_for_this_machine():
    backend = get_backend("triton")
    assert backend.unavailable_reason() is None
    assert backend.reason_not_serving(torch.device(DEVICE), torch.float32) is None
    assert backend.reason_not_serving(torch.device(DEVICE), torch.float64) is not None
    assert ("cpu" in backend.device_types) == INTERPRET


def test_reason_without_cuda_or_interpreter(monkeypatch):
    from casa_kernels.ops.backends import triton as triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = triton_backend._unavailable_reason()
    assert reason is not None and "TRITON_INTERPRET" in reason


@pytest.mark.skipif(not CUDA, reason="auto picks triton only for CUDA tensors")
def test_auto_picks_triton_on_cuda_where_measured_faster(monkeypatch, tmp_path):
    # auto on a GPU follows the figures measured on its model (casa_kernels/ops/measured.py).
    from casa_kernels.ops import measured

    monkeypatch.delenv("CASA_BACKEND", raising=False)
    monkeypatch.setattr(measured, "FIGURES", tmp_path / "measured_speedups.json")
    measured._figures.cache_clear()
    measured._decision.cache_clear()
    entry = {"speedups": {"triton": 2.0}, "source": "test"}
    name = torch.cuda.get_device_name()
    measured.merge_into(measured.FIGURES, {name: {"float16": {"B>1 N>512": entry}}})
    shape = ProblemShape(16, 862, 512, 3)
    assert resolve_backend("auto", torch.device("cuda"), torch.float16, shape).name == "triton"
    measured.merge_into(measured.FIGURES, {name: {}})
    with pytest.warns(UserWarning, match="no figures measured"):
        assert (
            resolve_backend("auto", torch.device("cuda"), torch.float16, shape).name == "reference"
        )
    measured._figures.cache_clear()
    measured._decision.cache_clear()


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_head_split_over_n(splits):
    # N spans three head chunks, so every split count here really splits the reduction.
    x, w = _problem((1, 2 * HEAD_BLOCK_N + 3, 16, 3), seed=2)
    assert_close_to_reference(triton_score_attention(x, w, splits=splits), x, w)


@pytest.mark.parametrize(
    "shape", [(2, 6, 16, 1), (1, 9, 32, 3), (2, 4, 24, 5), (1, 3, 64, 7)], ids=str
)
def test_bottleneck_stage_every_width(shape):
    # One tensor-core bottleneck for every D (no library fallback); D = 64 spans several
    # output-channel and column tiles of the interpreter's 16-wide blocks.
    x, w = _problem(shape, seed=9)
    h1 = ref_stages.head_partial(x, w.enc0_weight)
    torch.testing.assert_close(
        tk.bottleneck(h1, w), ref_stages.bottleneck(h1, w), atol=2e-5, rtol=2e-5
    )


def _layer_programs(batch, d_model, tile):
    block_l, block_o = tile
    return [
        batch * -(-(2 * lin if transposed else lin // 2) // block_l) * -(-cout // block_o)
        for _, cout, lin, transposed in tk.bottleneck_layers(d_model)
    ]


@pytest.mark.parametrize("batch,at_least", [(16, 132), (1, 64)])
def test_bottleneck_plan_fills_an_h100(batch, at_least):
    # Traffic (D = 512) on 132 SMs: every layer runs at least 132 programs at B = 16 and
    # 64 at B = 1 with the GPU tiles; at B = 16 the largest tile that does.
    tile = tk.bottleneck_tile(batch, 512, 132, tiles=tk.GPU_LAYER_TILES)
    assert min(_layer_programs(batch, 512, tile)) >= at_least
    larger = [t for t in tk.GPU_LAYER_TILES if t[0] * t[1] > tile[0] * tile[1]]
    assert all(min(_layer_programs(batch, 512, t)) < 132 for t in larger)


# (batch, n_vars, d_model, kernel), tail tile height 16: N inside one tile, ragged
# over two, across seven tiles; D = 40 ends mid column tile; every k.
TAIL_SPLITS = [(2, 1, 16, 3), (1, 17, 40, 1), (1, 100, 16, 5), (2, 33, 24, 7), (1, 16, 8, 3)]


@pytest.mark.parametrize("shape", TAIL_SPLITS, ids=lambda s: "B{}-N{}-D{}-k{}".format(*s))
def test_tail_split_over_n(shape):
    x, w = _problem(shape, seed=10)
    assert_close_to_reference(triton_score_attention(x, w, block_n=16), x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_head_accumulates_in_fp32(dtype):
    # fp16/bf16 operands, fp32 accumulation: each product is exact in fp32, so the head's
    # sum over N·k of them stays within fp32 rounding of the float64 sum. An accumulator
    # rounded to the input dtype between steps is off by ~1e-3 relative; the end-to-end
    # rule (twice torch's own low-precision error) cannot see that through the softmax.
    x, w = _problem((2, 300, 32, 3), dtype=dtype, seed=21)
    got = tk.head_partial(x, w.enc0_weight)
    want = ref_stages.head_partial(x.double(), w.enc0_weight.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="TF32 dots need a CUDA device (tensor cores)")
def test_fp32_with_tf32_allowed_stays_close():
    x, w = _problem((2, 64, 64, 3), seed=5)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        y = casa_kernels.casa_attention(x, w, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(
        y.double().cpu(),
        reference.score_attention(x.double(), w.to(torch.float64)).cpu(),
        atol=1e-2,
        rtol=1e-2,
    )


@pytest.mark.skipif(CUDA, reason="with a GPU the native tests compile the kernels for it")
def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    # The interpreter never lowers the kernels; compile them down to cubin (one config
    # each), in a fresh cache so nothing is skipped.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.ops.triton_compile_check",
            "--arch",
            "90",
            "--dtype",
            "fp32",
            "bf16",
            "--kernel",
            "3",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- launches, empty batch, single-config switch -------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Names of the kernels launched, in order, while the test runs."""
    seen = []
    real = tk._launch

    def counting(kernel, grid, *args, **kwargs):
        seen.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tk, "_launch", counting)
    return seen


def test_nine_launches_per_call(launches):
    x, w = _problem((2, 40, 16, 3), seed=11)
    triton_score_attention(x, w, block_n=16)
    assert len(launches) == 9, launches


def test_empty_batch_returns_empty_without_launch(launches):
    x, w = _problem((1, 5, 16, 3), seed=12)
    empty = x[:0]
    y = get_backend("triton").forward(empty, w)
    assert y.shape == (0, 5, 16) and y.dtype == x.dtype
    assert launches == []


def test_empty_batch_through_the_stages(launches):
    x, w = _problem((1, 5, 16, 3), seed=12)
    stages = get_backend("triton").stages
    h1 = stages.head_partial(x[:0], w.enc0_weight)
    h5 = stages.bottleneck(h1, w)
    col_max, col_sum = stages.tail_stats(x[:0], h5, w.dec2_weight, w.dec2_bias)
    y = stages.tail_output(
        x[:0], h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, col_max, col_sum
    )
    assert (h1.shape, h5.shape, col_max.shape, col_sum.shape, y.shape) == (
        (0, 4, 8),
        (0, 4, 8),
        (0, 16),
        (0, 16),
        (0, 5, 16),
    )
    assert launches == []


def test_single_config_switch(monkeypatch):
    monkeypatch.setattr(tkernels, "SINGLE_CONFIG", True)
    assert tkernels._tuned(["first", "second"]) == ["first"]
    monkeypatch.setattr(tkernels, "SINGLE_CONFIG", False)
    assert tkernels._tuned(["first", "second"]) == ["first", "second"]


def test_weights_packed_once_per_version(monkeypatch):
    from casa_kernels.ops import weight_cache

    weight_cache.clear()
    prepared = []
    real = tk.cached
    monkeypatch.setattr(
        tk,
        "cached",
        lambda tag, sources, prepare: real(tag, sources, lambda: prepared.append(tag) or prepare()),
    )
    x, w = _problem((1, 5, 16, 3), seed=22)
    y = triton_score_attention(x, w)
    assert len(prepared) == 7  # six conv weights packed tap-major, the value weight transposed
    assert torch.equal(triton_score_attention(x, w), y) and len(prepared) == 7
    w.dec2_weight.mul_(1.0)  # an in-place update: a new version of one weight
    triton_score_attention(x, w)
    assert prepared[7:] == ["triton.packed_transposed"]


# --- stages ----------------------------------------------------------------------------


def test_stages_registered():
    stages = get_backend("triton").stages
    assert stages is not None
    names = ("head_partial", "bottleneck", "tail_stats", "tail_output")
    assert [getattr(stages, name).__name__ for name in names] == list(names)
    assert stages.backward is None  # no backward of its own for the stages (design §12.4)


@pytest.mark.parametrize("shape", [(2, 37, 24, 3), (1, 5, 16, 7)], ids=str)
def test_each_stage_equals_reference_stage(shape):
    x, w = _problem(shape, seed=13)
    stages = get_backend("triton").stages
    close = dict(atol=2e-5, rtol=2e-5)
    h1 = stages.head_partial(x, w.enc0_weight)
    torch.testing.assert_close(h1, ref_stages.head_partial(x, w.enc0_weight), **close)
    h5 = stages.bottleneck(h1, w)
    torch.testing.assert_close(h5, ref_stages.bottleneck(h1, w), **close)
    stats = stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias, block_n=16)
    ref = ref_stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias)
    for got, want in zip(stats, ref):
        torch.testing.assert_close(got, want, **close)
    y = stages.tail_output(x, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, *ref)
    torch.testing.assert_close(
        y,
        ref_stages.tail_output(
            x, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, *ref
        ),
        **close,
    )


# --- non-finite values: the reference's pattern exactly --------------------------------


def _assert_same_non_finite_pattern(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"NaN at {int(torch.isnan(got).sum())} positions, reference {int(torch.isnan(want).sum())}"
    )
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=2e-5, rtol=2e-5)


# numpy, under the interpreter, warns where it meets the non-finite values on purpose.
non_finite = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@non_finite
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"]
)
@pytest.mark.parametrize("where", [(0, 3, 5), (1, 0, 0), (0, 20, 31)], ids=str)
def test_non_finite_input_pattern(value, where):
    x, w = _problem((2, 21, 32, 3), seed=15)
    x[where] = value
    _assert_same_non_finite_pattern(
        triton_score_attention(x, w, block_n=16), reference.score_attention(x, w)
    )


@non_finite
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "+inf"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_non_finite_input_pattern_low_precision(dtype, value):
    x, w = _problem((2, 21, 32, 3), dtype=dtype, seed=15)
    x[0, 3, 5] = value
    y, ref = triton_score_attention(x, w, block_n=16), reference.score_attention(x, w)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isposinf(), ref.isposinf())
    assert torch.equal(y.isneginf(), ref.isneginf())


@non_finite
def test_all_neg_inf_column():
    # A column whose scores are all -inf: the reference's softmax gives NaN there.
    x, w = _problem((1, 20, 16, 3), seed=16)
    x[0, :, 7] = float("-inf")
    _assert_same_non_finite_pattern(
        triton_score_attention(x, w, block_n=16), reference.score_attention(x, w)
    )


@non_finite
def test_neg_inf_scores_over_a_whole_n_tile_add_nothing():
    # One column's scores are -inf over a whole N tile and finite elsewhere: that tile's
    # sum is 0 (its shift taken as 0, not -inf: exp(-inf - (-inf)) is NaN), so the merged
    # statistics are those of the other tiles.
    x, w = _problem((1, 40, 16, 3), seed=20)
    h5 = ref_stages.bottleneck(ref_stages.head_partial(x, w.enc0_weight), w)
    x[0, :16, 5] = float("-inf")
    col_max, col_sum = tk.tail_stats(x, h5, w.dec2_weight, w.dec2_bias, block_n=16)
    ref_max, ref_sum = ref_stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias)
    torch.testing.assert_close(col_sum * torch.exp(col_max - ref_max), ref_sum)


@pytest.mark.parametrize(
    "field,index",
    [
        ("enc0_weight", (1, 0, 0)),
        ("enc0_bias", (2,)),
        ("enc1_weight", (0, 1, 2)),
        ("enc2_weight", (3, 0, 1)),
        ("dec0_weight", (0, 0, 0)),
        ("dec1_weight", (2, 1, 2)),
        ("dec1_bias", (0,)),
        ("dec2_weight", (0, 4, 0)),
        ("dec2_weight", (1, 2, 2)),
        ("dec2_bias", (6,)),
        ("value_weight", (5, 3)),
        ("value_bias", (1,)),
    ],
    ids=lambda v: str(v),
)
@non_finite
def test_nan_weight_pattern(field, index):
    x, w = _problem((2, 9, 16, 3), seed=17)
    t = getattr(w, field).clone()
    t[index] = float("nan")
    w = w._replace(**{field: t})
    _assert_same_non_finite_pattern(
        triton_score_attention(x, w, block_n=16), reference.score_attention(x, w)
    )


# --- bf16 rounding ---------------------------------------------------------------------


@triton.jit
def _round_kernel(src_ptr, dst_ptr, n, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n)
    tl.store(
        dst_ptr + offs, ttiles._round_to(v, dst_ptr.dtype.element_ty, EMULATE_BF16), mask=offs < n
    )


def test_bf16_stores_round_to_nearest_even():
    # Regression of verify's `triton bfloat16 B=3 N=130 D=64 k=3` failure: the
    # interpreter's fp32->bf16 cast truncated (-4.53124 stored as -4.5, one ulp off).
    g = torch.Generator().manual_seed(18)
    values = torch.cat(
        [
            torch.randn(200, generator=g) * 10,
            torch.tensor(
                [
                    -4.531242,
                    1.0 + 2**-8,
                    1.0 + 3 * 2**-8,
                    3.3895e38,
                    float("nan"),
                    float("inf"),
                    float("-inf"),
                    0.0,
                    -0.0,
                    1e-40,
                ]
            ),
        ]
    ).to(DEVICE)
    out = torch.empty(values.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](
        values, out, values.numel(), EMULATE_BF16=tk._emulate_bf16(torch.bfloat16), BLOCK=256
    )
    want = values.to(torch.bfloat16)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()].float(), want[~want.isnan()].float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_split_tail(dtype):
    x, w = _problem((3, 50, 24, 3), dtype=dtype, seed=19)
    assert_close_to_reference(triton_score_attention(x, w, block_n=16), x, w)


# --- on a GPU: CUDA graphs and torch.compile ------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 300, 64, 3), (1, 130, 64, 3)], ids=str)
def test_cuda_graph_capture_replay_equals_eager(shape):
    # B = 1 compiles its own specialisation (a constant B) and plans its own tiles.
    x, w = _problem(shape, dtype=torch.bfloat16, seed=20)
    eager = triton_score_attention(x, w)  # tunes and compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_score_attention(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, triton_score_attention(x, w), atol=0, rtol=0)
    assert not torch.equal(captured, eager)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_compiled_model_reduce_overhead_matches():
    from casa_kernels.modules import CASAModel

    torch.manual_seed(21)
    model = (
        CASAModel(n_vars=21, d_model=64, seq_len=96, pred_len=24, e_layers=2, backend="triton")
        .cuda()
        .eval()
    )
    x = torch.randn(4, 96, 21, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            got = compiled(x)
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
