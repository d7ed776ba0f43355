"""The CUDA kernels of csrc/cuda run on the host, against the reference — no GPU needed.

The torch-free ``score_attention_kernels.cu`` is turned into host C++ by a small
source transform (CUDA qualifiers dropped, ``__shared__`` declarations → per-block
shared memory from ``emu_shared``, ``<<<...>>>`` → ``emu_launch`` / ``emu_launch_smem``)
and built with g++ against the CUTLASS/CuTe headers and ``cuda_emulation/shim.h`` +
``shim_cute.h``, which run every CUDA thread of a block as a std::thread with a real
barrier for ``__syncthreads``. CuTe runs on the host: the kernels' TiledMMA/TiledCopy
partitions, identity-tensor epilogues and cp.async pipeline structure are the real code;
only the atoms differ (without ``__CUDA_ARCH__``: a scalar fp32 FMA atom for mma.sync,
UniversalCopy and plain 16-byte copies or zero fills for cp.async). This checks the index
math, masks and tile edges (the conv tiles' halo vectors and zero fills, the padded
activation rows, the per-tap packed weights the driver hands over as the cuda backend
does), the N splits and their merge, the epilogues and the barriers. Shared memory, static and
dynamic, is per block and starts as NaN bytes. Blocks run in a seeded pseudo-random
order (``CASA_EMU_BLOCK_ORDER``: a seed, ``forward`` or ``reverse``; every failure names
it, set it to reproduce), and one test asserts that the output bits do not depend on the
order, which catches a block reading another block's output within one launch. A
ThreadSanitizer build (blocks four at a time) reports missing barriers and races between
blocks; an AddressSanitizer + UBSan build reports out-of-bounds accesses. It does not
check the mma.sync register layouts or the cp.async hardware path. Needs g++ (C++20),
the CUDA toolkit headers (cuda_fp16.h) and the CUTLASS headers
(``pip install --no-deps nvidia-cutlass==4.2.0.0`` or ``CUTLASS_PATH``); skipped with
the reason otherwise.
"""

import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from casa_kernels import reference
from casa_kernels.cutlass_headers import find_include
from casa_kernels.tolerance import compare
from tests.conftest import make_problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "score_attention_kernels.cu")
EMULATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include_dir() -> str | None:
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "include"))
    candidates += ["/usr/local/cuda/include", *sorted(glob.glob("/usr/local/cuda-*/include"))]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    return None


def _shared_declaration(match: re.Match) -> str:
    """``__shared__ [alignas(A)] T a[M], b[N];`` as per-block shared memory (shim.h's
    emu_shared): ``static char a_key; auto& a = emu_shared<T[M], A>(&a_key); ...``."""
    indent, align, declaration = match.group(1), match.group(2) or "0", match.group(3)
    declarators, depth, start = [], 0, 0
    for i, ch in enumerate(declaration):
        depth += (ch in "<([") - (ch in ">)]")
        if ch == "," and depth == 0:
            declarators.append(declaration[start:i].strip())
            start = i + 1
    declarators.append(declaration[start:].strip())
    first = re.fullmatch(r"(.*?)\s*\b(\w+)\s*((?:\[[^\]]*\])*)", declarators[0], re.S)
    assert first and first.group(1), f"shared declaration not understood: {declaration}"
    base, out = first.group(1), []
    for i, declarator in enumerate(declarators):
        name, dims = (
            first.group(2, 3)
            if i == 0
            else re.fullmatch(r"(\w+)\s*((?:\[[^\]]*\])*)", declarator).groups()
        )
        out.append(
            f"static char emu_key_{name}; "
            f"auto& {name} = emu_shared<{base}{dims}, {align}>(&emu_key_{name});"
        )
    return indent + " ".join(out)


def host_source(cu_source: str) -> str:
    """The .cu source as host C++ for shim.h (see the module docstring)."""
    s = cu_source.replace(
        '#include "score_attention_kernels.h"',
        '#include "shim.h"\n#include "shim_cute.h"\n#include "score_attention_kernels.h"',
    )
    s = s.replace("#include <cuda_runtime.h>", "").replace("#include <mma.h>", "")
    s = re.sub(r"__launch_bounds__\([\w, ]+\)", "", s)
    s = re.sub(
        r"^(\s*)__shared__\s+(?:alignas\((\w+)\)\s+)?([^;]*);", _shared_declaration, s, flags=re.M
    )
    assert not re.search(r"^(?!\s*#)[^/]*\b__shared__", s, re.M), (
        "a __shared__ the transform does not know"
    )
    for cuda, host in [
        ("__global__", ""),
        ("__device__", ""),
        ("__host__", ""),
        ("__forceinline__", "inline"),
    ]:
        s = s.replace(cuda, host)

    # name<targs><<<grid, block, 0, stream>>>(args) -> emu_launch(name<targs>, grid, block, args);
    # with dynamic shared memory (smem not 0) -> emu_launch_smem(name<targs>, grid, block, smem, args)
    def launch(m: re.Match) -> str:
        kernel, grid, block, smem = m.groups()
        if smem == "0":
            return f"emu_launch({kernel}, {grid}, {block}, "
        return f"emu_launch_smem({kernel}, {grid}, {block}, {smem}, "

    s = re.sub(
        r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?),\s*(\w+),\s*(\w+),\s*stream>>>\(",
        launch,
        s,
        flags=re.S,
    )
    assert "<<<" not in s, "a kernel launch the transform does not know"
    return s


# The sanitizer builds: ThreadSanitizer, and AddressSanitizer with UBSan. Each stops the
# driver at the first report (see run_emulated's environment).
SANITIZERS = {
    None: [],
    "thread": ["-fsanitize=thread"],
    "address": [
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
    ],
}
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1 exitcode=66",
    "ASAN_OPTIONS": "halt_on_error=1 detect_leaks=0 exitcode=66",
    "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1",
}


def _build(out_dir, sanitize: str | None = None) -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the host emulation")
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("CUDA toolkit headers (cuda_fp16.h) not found: set CUDA_HOME")
    cutlass, how = find_include()
    if cutlass is None:
        pytest.skip(f"CUTLASS/CuTe headers: {how}")
    with open(KERNELS) as f:
        (out_dir / "kernels_host.cpp").write_text(host_source(f.read()))
    exe = str(out_dir / f"driver_{sanitize or 'plain'}")
    cmd = [
        cxx,
        *SANITIZERS[sanitize],
        "-std=c++20",
        "-O1",
        "-g",
        "-pthread",
        "-I",
        str(out_dir),
        "-I",
        os.path.join(ROOT, "csrc", "cuda"),
        "-I",
        EMULATION,
        "-I",
        include,
        "-isystem",
        cutlass,
        os.path.join(EMULATION, "driver.cpp"),
        "-o",
        exe,
    ]
    if os.path.isdir(os.path.join(include, "cccl")):
        # CUDA 13 keeps libcu++ (cuda/std/..., which CUTLASS includes) under include/cccl.
        cmd[-3:-3] = ["-isystem", os.path.join(include, "cccl")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and sanitize and "sanitize" in result.stderr:
        pytest.skip(f"the compiler cannot build with -fsanitize={sanitize}: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("cuda_emulation"))


# The block order of every run (shim.h): CASA_EMU_BLOCK_ORDER from the environment
# ("forward", "reverse" or a seed), seed 1 by default. Every failure message names it;
# rerun with CASA_EMU_BLOCK_ORDER=<it> to reproduce.
DEFAULT_ORDER = os.environ.get("CASA_EMU_BLOCK_ORDER", "1")


def _head_and_tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= 2 * n else f"{text[:n]}\n[...]\n{text[-n:]}"


def run_emulated(
    exe, x, weights, sm_count, work_dir, env=None, order=None, concurrent=1, tail_cols=None
):
    """y from the emulated launcher for ``x``/``weights`` (any float dtype), and its log
    (block order and plan). ``order``: CASA_EMU_BLOCK_ORDER (default DEFAULT_ORDER);
    ``concurrent``: blocks run at a time; ``tail_cols``: the tail tile width instead of
    the plan's (CASA_EMU_TAIL_COLS)."""
    values = np.concatenate([t.detach().float().numpy().ravel() for t in (x, *weights)])
    inp, out = work_dir / "in.bin", work_dir / "out.bin"
    values.astype(np.float32).tofile(inp)
    args = [
        exe,
        str(DTYPE_CODES[x.dtype]),
        *map(str, (*x.shape, weights.kernel)),
        str(sm_count),
        str(inp),
        str(out),
    ]
    order = str(order if order is not None else DEFAULT_ORDER)
    env = {
        **(env or os.environ),
        **SANITIZER_ENV,
        "CASA_EMU_BLOCK_ORDER": order,
        "CASA_EMU_CONCURRENT_BLOCKS": str(concurrent),
    }
    if tail_cols is not None:
        env["CASA_EMU_TAIL_COLS"] = str(tail_cols)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (
        f"CASA_EMU_BLOCK_ORDER={order} CASA_EMU_CONCURRENT_BLOCKS={concurrent} "
        f"CASA_EMU_TAIL_COLS={tail_cols} {args}: "
        f"exit {result.returncode}\n{_head_and_tail(result.stderr)}"
    )
    y = np.fromfile(out, dtype=np.float32).reshape(x.shape)
    return torch.from_numpy(y).to(x.dtype), result.stderr


# (batch, n_vars, d_model, kernel, sm_count): N = 1, D = 8, every k, ragged tiles, and
# enough SMs that the head and the tail split N (the plan is printed by the driver).
CASES = [
    (2, 1, 16, 3, 132),
    (1, 7, 8, 1, 132),
    (3, 5, 8, 7, 132),
    (2, 37, 24, 5, 132),
    (1, 130, 136, 3, 132),
    (2, 333, 128, 5, 132),
    (1, 300, 16, 5, 132),
    (1, 300, 16, 5, 1),
]


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-D{}-k{}-sm{}".format(*c))
def test_emulated_kernels_match_reference(driver, tmp_path, case, dtype):
    *shape, sm_count = case
    x, w = make_problem(*shape, dtype=dtype, seed=sum(shape))
    y, log = run_emulated(driver, x, w, sm_count, tmp_path)
    result = compare(y, x, w)
    assert result.passed, (log, result)


# The tail tile widths instantiated (launch_plan.h kTailColOptions), widest first.
TAIL_COLS = [128, 64]

# Ragged column tiles for both widths (D = 136, 200), N smaller than a row tile (N = 1,
# 5), several row tiles with a ragged last one (N = 130, 333).
TAIL_CASES = [(2, 1, 16, 3), (3, 5, 8, 7), (1, 130, 136, 3), (2, 333, 200, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", TAIL_CASES, ids=lambda c: "B{}-N{}-D{}-k{}".format(*c))
@pytest.mark.parametrize("tail_cols", TAIL_COLS, ids=lambda c: f"cols{c}")
def test_emulated_tail_tile_widths_match_reference(driver, tmp_path, tail_cols, case, dtype):
    # Every instantiated tail tile width, whichever the plan would choose for the shape.
    x, w = make_problem(*case, dtype=dtype, seed=sum(case))
    y, log = run_emulated(driver, x, w, 132, tmp_path, tail_cols=tail_cols)
    assert f"tail_cols={tail_cols}" in log, log
    result = compare(y, x, w)
    assert result.passed, (log, result)


def test_emulated_launcher_rejects_a_tail_width_it_does_not_have(driver, tmp_path):
    x, w = make_problem(1, 7, 8, 1)
    with pytest.raises(AssertionError, match="exit 3"):
        run_emulated(driver, x, w, 132, tmp_path, tail_cols=96)


def test_emulation_splits_n(driver, tmp_path):
    # The split paths (head partials, tail stats + output launches) are exercised.
    x, w = make_problem(1, 300, 16, 5)
    _, log = run_emulated(driver, x, w, 132, tmp_path)
    head, tail = map(int, re.search(r"head_splits=(\d+) tail_splits=(\d+)", log).groups())
    assert head > 1 and tail > 1, log


def _conv_splits(log: str) -> list[int]:
    return [int(s) for s in re.search(r"conv_splits=([\d,]+)", log).group(1).split(",")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_emulated_bottleneck_split_k_matches_reference(driver, tmp_path, dtype):
    # Few tiles per bottleneck conv (B = 1, D = 200): with 132 SMs the plan splits their
    # input channels (the last split of a tile to finish sums the partials, counted in
    # arrival counts the head clears; the driver's workspace starts as NaN bytes); with one
    # SM nothing splits. Both match the reference.
    x, w = make_problem(1, 70, 200, 3, dtype=dtype, seed=5)
    for sm_count, split in [(132, True), (1, False)]:
        y, log = run_emulated(driver, x, w, sm_count, tmp_path)
        assert (max(_conv_splits(log)) > 1) == split, log
        result = compare(y, x, w)
        assert result.passed, (log, result)


# Split N in the head and the tail, split-K in the bottleneck (D = 136), several tiles per
# launch, ragged tile edges.
ORDER_CASES = [(2, 300, 16, 5, 132), (2, 333, 136, 3, 132)]


@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: "B{}-N{}-D{}-k{}-sm{}".format(*c))
@pytest.mark.parametrize("tail_cols", TAIL_COLS, ids=lambda c: f"cols{c}")
def test_emulated_kernels_do_not_depend_on_block_order(driver, tmp_path, case, tail_cols):
    # Every output element is computed by one block, and every reduction in a fixed
    # order, so any block order gives the same bits; a block that reads another's output
    # within one launch (a merge without its launch boundary) does not.
    *shape, sm_count = case
    x, w = make_problem(*shape, dtype=torch.float32, seed=3)
    first, first_log = run_emulated(
        driver, x, w, sm_count, tmp_path, order="forward", tail_cols=tail_cols
    )
    assert compare(first, x, w).passed, first_log
    for order in ["reverse", 2, 3, 4]:
        y, log = run_emulated(driver, x, w, sm_count, tmp_path, order=order, tail_cols=tail_cols)
        assert torch.equal(y, first), f"block order {order} differs from forward: {log}"


@pytest.mark.parametrize(
    "shape, verdict",
    [
        ((16, 862, 512, 3), "supported"),
        ((1, 1, 8, 1), "supported"),
        ((1, 1 << 30, 8, 3), "32-bit indices"),
        ((1, 8, 1 << 30, 3), "32-bit indices"),
        ((1 << 30, 8, 512, 3), "one-dimensional grid"),
        ((1, 8, 64, 9), "kernel must be 1, 3, 5 or 7"),
    ],
)
def test_shape_limits_of_the_kernels(driver, shape, verdict):
    # gpu::problem_supported, which the cuda backend's shape_limits reports before dispatch.
    result = subprocess.run([driver, "limits", *map(str, shape)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert verdict in result.stdout, result.stdout


def test_shared_memory_fits_sm86_a100_and_h100(driver):
    # gpu::shared_memory_bytes, which the binding checks against the device's opt-in limit:
    # the largest block (the tail's output kernel at k = 7) must fit the 99 KiB per block
    # of sm_86/sm_89 GPUs, and so an A100 (163 KiB) and an H100 (227 KiB).
    result = subprocess.run([driver, "limits", "1", "1", "8", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    sizes = re.search(r"shared_memory_bytes: (\d+) (\d+) (\d+)", result.stdout)
    assert sizes, result.stdout
    assert all(48 * 1024 < int(b) <= 99 * 1024 for b in sizes.groups()), result.stdout


def test_emulated_kernels_have_no_data_races(tmp_path):
    # ThreadSanitizer over the block's threads: a missing __syncthreads is a data race;
    # with blocks running four at a time, so is a race between blocks.
    exe = _build(tmp_path, sanitize="thread")
    for dtype, shape, tail_cols in [
        (torch.float32, (1, 300, 8, 3), 128),
        (torch.bfloat16, (2, 70, 16, 1), 64),
        (torch.float32, (1, 70, 136, 3), 64),
    ]:
        x, w = make_problem(*shape, dtype=dtype)
        y, log = run_emulated(exe, x, w, 132, tmp_path, concurrent=4, tail_cols=tail_cols)
        assert "ThreadSanitizer" not in log, log
        assert compare(y, x, w).passed


def test_emulated_kernels_stay_in_bounds(tmp_path):
    # AddressSanitizer + UBSan: an access past any tensor, the workspace or a shared
    # array (one column past a tile edge, say) stops the driver with ASan's report.
    # Ragged tiles (D/2 not a multiple of the tile), split N and B > 1, so the last
    # block's last column is at the end of y and of the stats workspace.
    exe = _build(tmp_path, sanitize="address")
    for dtype, shape, sm_count, tail_cols in [
        (torch.float32, (2, 300, 16, 5), 132, 128),
        (torch.bfloat16, (2, 200, 24, 3), 132, 64),
        (torch.float16, (3, 5, 8, 7), 1, 64),
        (torch.float32, (2, 70, 200, 3), 132, 128),
        (torch.bfloat16, (2, 70, 200, 3), 132, 64),
    ]:
        x, w = make_problem(*shape, dtype=dtype)
        y, log = run_emulated(exe, x, w, sm_count, tmp_path, concurrent=2, tail_cols=tail_cols)
        assert "Sanitizer" not in log and "runtime error" not in log, log
        assert compare(y, x, w).passed, log


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"]
)
@pytest.mark.parametrize("sm_count", [1, 132], ids=["one-split", "split-n"])
def test_emulated_kernels_carry_non_finite_input_as_the_reference(
    driver, tmp_path, value, sm_count
):
    # NaN-keeping ReLUs, a NaN-propagating column max and split merge, and -inf rows that
    # add nothing: the reference's NaN/±inf pattern, with the N split and without, in
    # each tail tile width (D = 136: two or three column tiles, the last ragged).
    x, w = make_problem(1, 300, 136, 5)
    for index, tail_cols in [((0, 0, 0), 128), ((0, 150, 70), 64), ((0, 299, 135), 128)]:
        bad = x.clone()
        bad[index] = value
        y, log = run_emulated(driver, bad, w, sm_count, tmp_path, tail_cols=tail_cols)
        expected = reference.score_attention(bad, w)
        assert torch.equal(y.isnan(), expected.isnan()), (index, log)
        assert torch.equal(y.isinf(), expected.isinf()) and torch.equal(
            y[y.isinf()], expected[expected.isinf()]
        )


@pytest.mark.parametrize("sm_count", [1, 132], ids=["one-split", "split-n"])
def test_emulated_kernels_with_scores_far_beyond_exp_range(driver, tmp_path, sm_count):
    # One dominant variate per column, in a different N split per column: a merge that
    # ignores any split's maximum overflows exp.
    x, w = make_problem(1, 300, 16, 5)
    x = x * 40
    for col in range(16):
        x[0, (col * 61) % 300, col] += 250.0
    y, log = run_emulated(driver, x, w, sm_count, tmp_path)
    result = compare(y, x, w)
    assert result.passed, (log, result)
