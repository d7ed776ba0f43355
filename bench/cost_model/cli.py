"""``python -m bench estimate`` — the static GPU cost model (docs/design.md §15): per
kernel of the triton and cuda backends, compiled for sm_90a without a GPU, an ESTIMATE of
its time on an H100/H200 SXM, never a measurement.

Writes ``<out>/estimate.json`` ({"triton": {"16": {"total_us", "kernels", ...}, "1": ...},
"cuda": ...}) and ``<out>/estimate.md`` for the Traffic shape (the default; another
shape with ``--shape N D K`` is printed, and written only with ``--out``). A backend
whose tools are missing (Triton, nvcc, CUTLASS headers, a C++ compiler) is reported
with the reason and left out; the exit status is 0 unless the arguments are wrong.

The Triton figures come from the GPU image's Triton release where an interpreter with it
is given (``--triton-python``, default ``$CASA_TRITON_GPU_PYTHON`` or
``.venv-triton36/bin/python``), else from the Triton imported here; both are shown
when both are available.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from . import cuda_side, report
from .hardware import H100_SXM
from .model import backend_estimate, op_floors

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAFFIC = (862, 512, 3)
DEFAULT_OUT = ROOT / "bench" / "results" / "sm90a-estimate"
GPU_TRITON = "3.6.0"  # the GPU machine's image
ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _triton_here(batches, shape, dtype: str, sms: int) -> dict:
    """Described Triton launches with the Triton imported by this interpreter."""
    import torch
    import triton

    from . import triton_side

    n, d, k = shape
    return {
        "triton_version": triton.__version__,
        "launches": {
            str(b): triton_side.describe_op(b, n, d, k, getattr(torch, dtype), sms) for b in batches
        },
    }


def _triton_in(python: str, batches, shape, dtype: str, sms: int) -> dict:
    """The same, run by another interpreter (another Triton release)."""
    cmd = [python, "-m", "bench.cost_model.triton_side", "--batch", *map(str, batches)]
    cmd += ["--shape", *map(str, shape), "--dtype", dtype, "--sms", str(sms)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{python}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def _gpu_python(arg: str | None) -> str | None:
    for candidate in (
        arg,
        os.environ.get("CASA_TRITON_GPU_PYTHON"),
        ROOT / ".venv-triton36/bin/python",
    ):
        if candidate and os.path.isfile(candidate):
            return str(candidate)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench estimate",
        description="The static GPU cost model (docs/design.md §15): per-kernel ESTIMATES of "
        "the triton and cuda backends on an H100/H200 SXM, from code compiled for sm_90a "
        "without a GPU; never measurements.",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("N", "D", "K"),
        default=TRAFFIC,
        help="n_vars, d_model, kernel (default: Traffic, 862 512 3)",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--dtype", choices=sorted(ELEM_BYTES), default="bfloat16")
    parser.add_argument(
        "--backends", nargs="+", choices=("triton", "cuda"), default=["triton", "cuda"]
    )
    parser.add_argument(
        "--triton-python",
        default=None,
        help=f"an interpreter with the GPU image's Triton ({GPU_TRITON})",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"result folder (default for the Traffic shape: {DEFAULT_OUT.relative_to(ROOT)})",
    )
    parser.add_argument("--no-write", action="store_true", help="print only (CI)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (
        any(v <= 0 for v in (*args.shape, *args.batch))
        or args.shape[1] % 8
        or args.shape[2] % 2 == 0
    ):
        print(
            f"--shape/--batch: expected positive sizes, D % 8 == 0 and an odd kernel, received "
            f"shape {args.shape}, batch {args.batch}",
            file=sys.stderr,
        )
        return 2
    gpu, shape, started = H100_SXM, tuple(args.shape), time.perf_counter()
    notes: list[str] = []
    described: dict[str, dict] = {}
    if "triton" in args.backends:
        releases = {}
        python = _gpu_python(args.triton_python)
        if python is None:
            notes.append(
                f"triton {GPU_TRITON} (the GPU image's): no interpreter with it "
                "(--triton-python); figures from the Triton imported here only"
            )
        else:
            try:
                got = _triton_in(python, args.batch, shape, args.dtype, gpu.sms)
                releases[got["triton_version"]] = got["launches"]
            except Exception as error:  # report and go on with the other release
                notes.append(f"triton via {python}: {error}")
        try:
            got = _triton_here(args.batch, shape, args.dtype, gpu.sms)
            releases.setdefault(got["triton_version"], got["launches"])
        except Exception as error:
            notes.append(f"triton (imported here): {type(error).__name__}: {error}")
        if releases:
            described["triton"] = releases
    if "cuda" in args.backends:
        try:
            described["cuda"] = {
                "nvcc": cuda_side.describe_op(args.batch, *shape, args.dtype, gpu.sms)
            }
        except (cuda_side.ToolMissing, subprocess.CalledProcessError, OSError) as error:
            detail = getattr(error, "stderr", "") or ""
            notes.append(f"cuda: {error} {detail.strip()[-300:]}".strip())

    result, others = {}, {}
    for backend, releases in described.items():
        ordered = sorted(releases, key=lambda v: v != GPU_TRITON)  # the GPU image's first
        for i, release in enumerate(ordered):
            per_batch = {
                b: {
                    "compiler": release if backend == "triton" else cuda_side.nvcc_version(),
                    **backend_estimate(
                        gpu, launches, op_floors(gpu, int(b), *shape, ELEM_BYTES[args.dtype])
                    ),
                }
                for b, launches in releases[release].items()
            }
            if i == 0:
                result[backend] = per_batch
            else:
                others[f"{backend} {release}"] = per_batch
    elapsed = time.perf_counter() - started
    text = report.markdown(gpu, shape, args.dtype, result, others, notes, elapsed)
    print(text)
    out = args.out or (DEFAULT_OUT if shape == TRAFFIC and args.dtype == "bfloat16" else None)
    if out is not None and not args.no_write and result:
        out.mkdir(parents=True, exist_ok=True)
        (out / "estimate.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "estimate.md").write_text(text)
        print(f"estimate: {out / 'estimate.json'}, {out / 'estimate.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
