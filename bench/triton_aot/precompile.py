"""The fallback where the carried cache cannot serve the GPU machine (another Triton
release, GPU arch or ptxas): the same plan, computed there for that GPU, compiled into
the run's Triton cache by a pool of processes (one per core) while the CUDA build runs,
so that the steps find the kernels compiled instead of compiling them one at a time.

The pool forks before anything touches CUDA (the GPU's arch and SM count come from a
child process), and each worker compiles the entries whose index it is given; Triton
writes each into ``TRITON_CACHE_DIR`` under its own key, where the steps look.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import subprocess
import sys
import time

_entries: list = []  # the planned entries, inherited by the forked workers


def gpu_facts() -> tuple[int, int]:
    """(Triton's arch number, SM count) of GPU 0, read in a child process."""
    probe = (
        "import torch; p = torch.cuda.get_device_properties(0); "
        "print(10 * p.major + p.minor, p.multi_processor_count)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    arch, sms = out.split()
    return int(arch), int(sms)


def _compile(index: int) -> tuple[str, float, str]:
    from triton.backends.compiler import GPUTarget

    from ..cost_model.triton_compile import compile_launch

    entry = _entries[index]
    t0 = time.perf_counter()
    try:
        compile_launch(entry["launch"], entry["config"], GPUTarget("cuda", entry["arch"], 32))
        error = ""
    except Exception as e:  # noqa: BLE001 - reported; the step compiles it again and fails there
        error = f"{type(e).__name__}: {e}"
    return entry["kernel"], time.perf_counter() - t0, error


def precompile(test_calls: pathlib.Path | None, jobs: int, log=print) -> int:
    """Plans every step's kernels for this machine's GPU and compiles them in ``jobs``
    processes; returns how many failed."""
    from . import cache, steps

    arch, sms = gpu_facts()
    calls = steps.step_calls(None, str(test_calls) if test_calls and test_calls.is_file() else None)
    entries, _ = cache.plan(calls, steps.ALL_CONFIG_STEPS, sms, arch)
    _entries[:] = [{**e, "arch": arch} for e in entries.values()]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        done = pool.map(_compile, range(len(_entries)), chunksize=1)
    failed = [(k, err) for k, _, err in done if err]
    for kernel, error in failed:
        log(f"triton cache: precompile of {kernel} failed: {error}")
    log(
        f"triton cache: precompiled {len(done) - len(failed)} kernels for "
        f"{cache.arch_name(arch)} in {time.perf_counter() - t0:.0f}s on {jobs} processes "
        f"({sum(s for _, s, _ in done):.0f}s of compiling)"
    )
    return len(failed)


def jobs() -> int:
    """MAX_JOBS, else one process per core."""
    return int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
