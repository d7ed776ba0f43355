"""``python -m casa_kernels.verify``: every available backend against the float64 reference.

Runs each backend × dtype over a fixed set of shapes (ragged N, small D, every kernel size
1/3/5/7, B = 1 to 8, one non-contiguous input, N past every backend's head split) through
the public :func:`casa_kernels.casa_attention`, and checks the output with the accuracy
contract of :mod:`casa_kernels.tolerance` (fixed tolerance for fp32/fp64, and the attention
term against the reference's relative to itself; for fp16/bf16 relative to the error of
PyTorch's own computation in that dtype). One block case runs a :class:`CASABlock` on the
backend under ``no_grad`` (the fused block epilogue where the backend has one) against the
float64 eager block. Prints one line per case and exits with status 1 if any case fails
(0 otherwise; 2 for bad arguments or when nothing ran).

Dtypes: on a CPU float32, bfloat16, float64; on a CUDA device float32, float16, bfloat16
(each only where the backend declares it). Backends that cannot run here are listed as
SKIP with their reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from dataclasses import dataclass

import torch

from . import availability, backend_names, casa_attention
from .modules import CASABlock
from .ops.registry import get_backend
from .tolerance import (
    ATTENTION_TERM_RTOL,
    Comparison,
    compare,
    compare_attention_term,
    compare_with_exact,
    reference_float64,
)
from .weights import ScoreAttentionWeights

DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


@dataclass(frozen=True)
class Case:
    """``[batch, n_vars, d_model]`` input and kernel size; ``block``: a whole CASABlock."""

    batch: int
    n_vars: int
    d_model: int
    kernel: int
    contiguous: bool = True
    block: bool = False

    def __str__(self) -> str:
        text = f"B={self.batch} N={self.n_vars} D={self.d_model} k={self.kernel}"
        if not self.contiguous:
            text += " non-contig"
        if self.block:
            text += " block"
        return text


# Together: N in {1, 7, 37, 130, 300, 800} (no tile multiple), D in {8, 16, 24, 40, 64,
# 128}, k in {1, 3, 5, 7}, B in {1, 2, 3, 8}, one non-contiguous input. The head is split
# over N on every fused backend (Triton's and CUDA's split-K programs) and on the CPU,
# whose head reduces N in chunks of at most 256 rows shared by up to ⌈threads / B⌉ worker
# groups: N = 300 at B = 1 gives two chunks in two groups (with 2 threads or more), N = 800
# at B = 8 four chunks, so that each group sums several (up to 24 threads). The block case
# has 74 rows (B·N), past one 64-row block of the CPU's fused epilogue.
CASES = (
    Case(1, 1, 8, 1),
    Case(3, 7, 24, 3),
    Case(2, 37, 64, 3, contiguous=False),
    Case(3, 1, 8, 3),
    Case(1, 7, 64, 5),
    Case(3, 37, 128, 7),
    Case(1, 130, 24, 1),
    Case(3, 130, 64, 3),
    Case(1, 130, 128, 5),
    Case(3, 7, 8, 7),
    Case(1, 300, 16, 3),
    Case(8, 800, 16, 1),
    Case(2, 37, 40, 3, block=True),
)
QUICK_CASES = CASES[:3]


def make_inputs(
    case: Case, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ScoreAttentionWeights]:
    """Seeded ``x: [B, N, D]`` and weights (PyTorch-default init), drawn in float64 then cast."""
    g = torch.Generator().manual_seed(7919 * case.n_vars + 31 * case.d_model + case.kernel)
    weights = ScoreAttentionWeights.random(
        case.n_vars, case.d_model, case.kernel, dtype=dtype, device=device, generator=g
    )
    if case.contiguous:
        x = torch.randn(case.batch, case.n_vars, case.d_model, generator=g, dtype=torch.float64)
        x = x.to(device=device, dtype=dtype)
    else:  # [B, D, N] storage seen as [B, N, D]
        x = torch.randn(case.batch, case.d_model, case.n_vars, generator=g, dtype=torch.float64)
        x = x.to(device=device, dtype=dtype).transpose(1, 2)
        assert not x.is_contiguous() or case.n_vars == 1 or case.d_model == 1
    return x, weights


def make_block(case: Case, backend: str, dtype: torch.dtype, device: str) -> CASABlock:
    """A seeded CASABlock on ``backend``: the attention weights of :func:`make_inputs`, the
    MLP drawn like PyTorch's default init, the LayerNorm's weight in [0.5, 1.5] and bias in
    [-0.5, 0.5] (not 1 and 0, so that the epilogue's use of them shows)."""
    _, weights = make_inputs(case, torch.float64, "cpu")
    g = torch.Generator().manual_seed(7919 * case.n_vars + 31 * case.d_model + 1)
    with torch.random.fork_rng(devices=[]):  # the module's own init draws are replaced below
        block = CASABlock(
            n_vars=case.n_vars, d_model=case.d_model, kernel=case.kernel, backend=backend
        ).double()
    bound = case.d_model**-0.5
    with torch.no_grad():
        for param, value in zip(block.weights(), weights):
            param.copy_(value)
        for param in block.mlp.parameters():
            param.uniform_(-bound, bound, generator=g)
        block.norm.weight.uniform_(0.5, 1.5, generator=g)
        block.norm.bias.uniform_(-0.5, 0.5, generator=g)
    return block.to(device=device, dtype=dtype)


def _compare_attention(out, x, weights) -> Comparison:
    """tolerance.compare, and for fp32/fp64 the attention term's rule too (the first failing
    rule is reported, or both)."""
    ref64 = reference_float64(x, weights)
    results = [compare(out, x, weights, ref64)]
    if out.dtype in ATTENTION_TERM_RTOL:
        results.append(compare_attention_term(out, x, weights, ref64))
    failed = [r for r in results if not r.passed]
    if failed or len(results) == 1:
        return failed[0] if failed else results[0]
    rule = f"{results[0].rule}; y - x: rtol {ATTENTION_TERM_RTOL[out.dtype]:g}"
    return dataclasses.replace(results[0], rule=rule)


def _run_attention(backend, dtype, case, device):
    """(x, output, its comparison as a function) of the op on case's inputs."""
    x, weights = make_inputs(case, dtype, device)
    with torch.no_grad():
        out = casa_attention(x, weights, backend=backend)
    return x, out, functools.partial(_compare_attention, out, x, weights)


def _run_block(backend, dtype, case, device):
    """(x, output, its comparison as a function) of case's block on ``backend``: against the
    float64 eager block, relative to the eager block in ``dtype`` (``compare_with_exact``)."""
    x64, _ = make_inputs(case, torch.float64, "cpu")
    x = x64.to(device=device, dtype=dtype)
    with torch.no_grad():
        exact = make_block(case, "reference", torch.float64, "cpu")(x64)
        same_dtype = make_block(case, "reference", dtype, device)(x)
        out = make_block(case, backend, dtype, device)(x)
    return x, out, functools.partial(compare_with_exact, out, same_dtype, exact)


@dataclass(frozen=True)
class Outcome:
    backend: str
    dtype: str
    case: str
    max_abs: float | None
    max_rel: float | None
    rule: str
    verdict: str  # PASS, FAIL or SKIP


def run_case(backend: str, dtype: torch.dtype, case: Case, device: str) -> Outcome:
    name = str(dtype).removeprefix("torch.")
    try:
        run = _run_block if case.block else _run_attention
        x, out, comparison = run(backend, dtype, case, device)
        if out.shape != x.shape or out.dtype != x.dtype:
            return Outcome(
                backend,
                name,
                str(case),
                None,
                None,
                f"output {tuple(out.shape)} {out.dtype}, expected {tuple(x.shape)} {x.dtype}",
                "FAIL",
            )
        result = comparison()
    except Exception as error:  # noqa: BLE001 - a crash is a failure, reported in the table
        first = (str(error).strip().splitlines() or [""])[0][:120]
        return Outcome(
            backend, name, str(case), None, None, f"{type(error).__name__}: {first}", "FAIL"
        )
    return Outcome(
        backend,
        name,
        str(case),
        result.max_abs_error,
        result.max_rel_error,
        result.rule,
        "PASS" if result.passed else "FAIL",
    )


def verify(backends: list[str], device: str, cases=CASES) -> list[Outcome]:
    """Outcomes of every backend × dtype × case on ``device`` (SKIP rows say why not)."""
    outcomes = []
    torch_device = torch.device(device)
    for backend in backends:
        for dtype in DTYPES[torch_device.type]:
            reason = get_backend(backend).reason_not_serving(torch_device, dtype)
            if reason is not None:
                outcomes.append(
                    Outcome(
                        backend,
                        str(dtype).removeprefix("torch."),
                        "all",
                        None,
                        None,
                        reason,
                        "SKIP",
                    )
                )
                continue
            outcomes.extend(run_case(backend, dtype, case, device) for case in cases)
    return outcomes


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def print_table(outcomes: list[Outcome], file=None) -> None:
    file = file or sys.stdout
    print(
        f"{'backend':<10} {'dtype':<9} {'shape':<32} {'max abs':>9} {'max rel':>9}  {'result':<6} rule",
        file=file,
    )
    for o in outcomes:
        print(
            f"{o.backend:<10} {o.dtype:<9} {o.case:<32} {_fmt(o.max_abs):>9} {_fmt(o.max_rel):>9}  "
            f"{o.verdict:<6} {o.rule}",
            file=file,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m casa_kernels.verify",
        description="Check every available backend against the float64 reference (docs/design.md §7).",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to verify (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma list (default: all registered: {', '.join(backend_names())})",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"only the first {len(QUICK_CASES)} shapes"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("verify: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    names = (
        [b.strip() for b in args.backends.split(",") if b.strip()]
        if args.backends
        else backend_names()
    )
    unknown = [b for b in names if b not in backend_names()]
    if unknown:
        print(
            f"verify: unknown backend(s) {unknown}; registered: {backend_names()}", file=sys.stderr
        )
        return 2
    device = "cuda:0" if args.device == "cuda" else "cpu"
    print(f"casa_kernels.verify: torch {torch.__version__}, device {device}")
    for name, reason in availability().items():
        if name in names:
            print(f"  backend {name}: {'available' if reason is None else reason}")
    outcomes = verify(names, device, QUICK_CASES if args.quick else CASES)
    print_table(outcomes)
    counts = {v: sum(o.verdict == v for o in outcomes) for v in ("PASS", "FAIL", "SKIP")}
    print(
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped (backend x dtype)"
    )
    if counts["FAIL"]:
        return 1
    if not counts["PASS"]:
        print("verify: nothing ran", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
