"""The triton backend's calls each step of ``bench/device_check.sh`` makes, derived at
run time from the modules the steps run (their shape lists), so the carried cache
follows them:

* ``tests-triton`` — recorded: ``tests/ops/test_triton.py`` run on the CPU under the
  Triton interpreter with :mod:`.calls` as a pytest plugin (minutes here);
* ``verify`` — :data:`casa_kernels.verify.QUICK_CASES` × the CUDA dtypes;
* ``sanitize`` — :data:`bench.device_check.SANITIZE_SHAPES` × ``SANITIZE_DTYPES``;
* ``bench-attention``, ``bench-scaling``, ``bench-autotuned`` — the points of
  :mod:`bench.suites` for the suite, datasets, batches and ``--quick`` that
  device_check.sh passes (:data:`BENCH_STEPS`; a test holds the two together), bf16;
  model-level points call the op at their (B, N, D, k). ``bench-autotuned`` compiles
  every autotune config (it runs without ``CASA_TRITON_SINGLE_CONFIG``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from .calls import RECORD_ENV, Call, op_call, read_calls


@dataclass(frozen=True)
class BenchStep:
    suite: str
    datasets: tuple[str, ...]
    batches: tuple[int, ...] | None  # None: the suite's default
    quick: bool


# As bench/device_check.sh runs them (tests/test_bench_tools.py checks the two agree).
BENCH_STEPS = {
    "bench-attention": BenchStep("attention", ("Traffic", "Wide20k"), (16, 1), False),
    "bench-scaling": BenchStep("scaling", (), None, True),
    "bench-autotuned": BenchStep("attention", ("Traffic",), (16, 1), False),
}
ALL_CONFIG_STEPS = {"bench-autotuned"}
# The tests-triton step's pytest arguments, as device_check.sh passes them: the CPU-only
# compile check is left out there (it compiles every kernel afresh, as the cost model and
# CI do without a GPU).
TESTS_TRITON = (
    "tests/ops/test_triton.py",
    "--deselect",
    "tests/ops/test_triton.py::test_kernels_compile_for_sm90_without_gpu",
)
BENCH_DTYPE = torch.bfloat16


def verify_calls() -> list[Call]:
    from casa_kernels.verify import DTYPES, QUICK_CASES

    return [
        op_call(c.batch, c.n_vars, c.d_model, c.kernel, dtype)
        for dtype in DTYPES["cuda"]
        for c in QUICK_CASES
    ]


def sanitize_calls() -> list[Call]:
    from ..device_check import SANITIZE_DTYPES, SANITIZE_SHAPES

    return [
        op_call(*shape, getattr(torch, dtype))
        for shape in SANITIZE_SHAPES
        for dtype in SANITIZE_DTYPES
    ]


def bench_calls(step: BenchStep) -> list[Call]:
    from .. import suites

    opts = suites.RunOptions(
        device="cuda",
        dtypes=(BENCH_DTYPE,),
        warmup=0,
        reps=0,
        time_cap_s=0.0,
        mem_cap_bytes=0,
        out_dir=None,
        quick=step.quick,
        batches=list(step.batches or ((1,) if step.suite == "scaling" else (16, 1))),
        **({"datasets": step.datasets} if step.datasets else {}),
    )
    points = [point for _, point in suites.SUITES[step.suite](opts)]
    shapes = dict.fromkeys((p.batch, p.n_vars, p.d_model, p.kernel) for p in points)
    return [op_call(*shape, BENCH_DTYPE) for shape in shapes]


def recorded_test_calls(
    pytest_args=TESTS_TRITON, python: str = sys.executable, timeout_s: int = 1800
) -> list[Call]:
    """The launcher calls of a pytest run (``pytest_args``) under the Triton interpreter
    by ``python`` (a subprocess, which needs pytest, any Triton release). A failing test
    is reported on stderr; the calls made are kept."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        path = f.name
    env = {**os.environ, "TRITON_INTERPRET": "1", RECORD_ENV: path, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("CASA_TRITON_SINGLE_CONFIG", None)
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "bench.triton_aot.calls", *pytest_args]
    try:
        done = subprocess.run(command, env=env, timeout=timeout_s, capture_output=True, text=True)
        if done.returncode != 0:
            print(
                f"recording {' '.join(pytest_args)}: pytest exit {done.returncode}, the calls "
                f"made are kept:\n{done.stdout[-2000:]}{done.stderr[-1000:]}",
                file=sys.stderr,
            )
        return read_calls(path)
    finally:
        os.unlink(path)


def step_calls(
    test_python: str | None = sys.executable, test_calls: str | None = None
) -> dict[str, list[Call]]:
    """Every device step's calls, in the order device_check.sh runs the steps; the tests'
    read from ``test_calls`` (JSON lines) if given, else recorded by ``test_python``
    (None: left out)."""
    steps = {}
    if test_calls:
        steps["tests-triton"] = read_calls(test_calls)
    elif test_python:
        steps["tests-triton"] = recorded_test_calls(python=test_python)
    steps["verify"] = verify_calls()
    steps["sanitize"] = sanitize_calls()
    for name, step in BENCH_STEPS.items():
        steps[name] = bench_calls(step)
    return steps
