"""Kernel mutants: small, plausible bugs applied one at a time; the tests must kill each.

``python -m tests.mutation`` applies every mutant in :data:`MUTANTS` to the working tree,
rebuilds the extension when a C++ file changed, runs the tests that guard that code, and
restores the file (also on Ctrl-C or an error), then prints one line per mutant: killed
(some test failed) or SURVIVED. It exits 1 if any mutant survived. ``--only NAME`` runs
the mutants whose name contains NAME; ``--list`` prints them.

A mutant whose text is not found exactly once is reported ``stale``: the code moved, and
the mutant must be rewritten (a stale mutant counts as a failure, not a kill).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CPU_TESTS = (
    "tests/ops/test_conformance.py",
    "tests/ops/test_cpu.py",
    "tests/ops/test_production.py",
    "tests/ops/test_stages.py",
)
EMULATION_TESTS = ("tests/ops/test_cuda_emulation.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once
    mutated: str
    tests: tuple[str, ...]
    pytest_args: tuple[str, ...] = ("-k", "not triton")


MUTANTS = [
    Mutant(
        "cpu: softmax without its shift",
        "csrc/cpu/vectorised.cpp",
        "exp_vectorisable(-(s[c] + b))) +\n                                          x_even - shift[c]);",
        "exp_vectorisable(-(s[c] + b))) +\n                                          x_even);",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: block merge ignores every block's maximum but the first",
        "csrc/cpu/vectorised.cpp",
        "for (int64_t i = 1; i < blocks; ++i) {\n    for (int64_t c = 0; c < T; ++c) top[c] =",
        "for (int64_t i = 1; i < 1; ++i) {\n    for (int64_t c = 0; c < T; ++c) top[c] =",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: ReLU that turns NaN into 0",
        "csrc/cpu/vectorised.cpp",
        "return v < acc_t(0) ? acc_t(0) : v;",
        "return v > acc_t(0) ? v : acc_t(0);",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: exp clamps -inf to a tiny number",
        "csrc/cpu/vectorised.cpp",
        "return x < -87.0f ? 0.0f :",
        "return x < -87.0f ? 1e-38f :",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: value bias dropped",
        "csrc/cpu/vectorised.cpp",
        "store_pair(yr, c, e[c] * scale[c] * (v[c] + value_bias[c]) + x_even,",
        "store_pair(yr, c, e[c] * scale[c] * v[c] + x_even,",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: head chunk offset by one row",
        "csrc/cpu/score_attention_cpu.cpp",
        "head_chunk(x[b].data_ptr<scalar_t>() + n0 * D, n0, rows, scratch,",
        "head_chunk(x[b].data_ptr<scalar_t>() + n0 * D, n0 > 0 ? n0 - 1 : 0, rows, scratch,",
        CPU_TESTS,
    ),
    Mutant(
        "cpu: tail statistics in the wrong parity",
        "csrc/cpu/score_attention_cpu.cpp",
        "if (mode == TailMode::kStats)\n            row[2 * c + q] = common[i][q * half + c];",
        "if (mode == TailMode::kStats)\n            row[2 * c + q] = common[i][(1 - q) * half + c];",
        ("tests/ops/test_stages.py",),
    ),
    Mutant(
        "cpu: block epilogue without the residual",
        "csrc/cpu/vectorised.cpp",
        "for (int64_t c = 0; c < D; ++c) o[c] += bias[c] + z[c];",
        "for (int64_t c = 0; c < D; ++c) o[c] += bias[c];",
        ("tests/ops/test_cpu.py",),
    ),
    Mutant(
        "cuda: ReLU that turns NaN into 0",
        "csrc/cuda/score_attention_kernels.cu",
        "return v < 0.f ? 0.f : v;",
        "return fmaxf(v, 0.f);",
        EMULATION_TESTS,
        (),
    ),
    Mutant(
        "cuda: split merge ignores one split's maximum",
        "csrc/cuda/score_attention_kernels.cu",
        "for (int t = 0; t < splits; ++t)\n        m_all = max_nan(",
        "for (int t = 1; t < splits; ++t)\n        m_all = max_nan(",
        EMULATION_TESTS,
        (),
    ),
]


def _rebuild() -> None:
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _needs_build(path: str) -> bool:
    return path.startswith("csrc/cpu/") or path == "csrc/score_attention.cpp"


def run_mutant(mutant: Mutant) -> str:
    """'killed', 'SURVIVED' or 'stale' for one mutant; the tree is restored afterwards."""
    file = ROOT / mutant.path
    original = file.read_text()
    if original.count(mutant.original) != 1:
        return "stale"
    try:
        file.write_text(original.replace(mutant.original, mutant.mutated))
        if _needs_build(mutant.path):
            try:
                _rebuild()
            except RuntimeError:
                return "killed (does not build)"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                *mutant.pytest_args,
                *mutant.tests,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return "killed" if result.returncode != 0 else "SURVIVED"
    finally:
        file.write_text(original)
        if _needs_build(mutant.path):
            _rebuild()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path}; {' '.join(m.tests)})")
        return 0
    failures = 0
    for m in chosen:
        start = time.perf_counter()
        verdict = run_mutant(m)
        failures += not verdict.startswith("killed")
        print(f"{verdict:<24} {time.perf_counter() - start:6.0f} s  {m.name}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutants killed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
