"""Compiles the Triton kernels for NVIDIA targets without a GPU (down to cubin, via
the ptxas shipped with triton), to catch lowering errors the interpreter cannot see.
Each kernel of the forward and of the fused backward's tail is compiled as its launcher
would launch it (bench/cost_model/triton_compile.py:
the launchers run on meta tensors, Triton's binder specialises the arguments) for a
small ragged problem, B=3, N=37, D=200, so no size is a multiple of 16.

Run with the interpreter off::

    python -m tests.ops.triton_compile_check --arch 90 80 --dtype fp32 fp16 bf16 --kernel 1 3 7 [--all-configs]

Exit status 1 when any kernel fails to compile. Per (arch, dtype, precision, k) one
status line, then per kernel and config its registers per thread, shared memory and
spill bytes (from ``ptxas -v`` on the kernel's PTX).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from bench.cost_model.triton_compile import (  # noqa: E402
    backward_launches,
    compile_launch,
    configs,
    op_launches,
    ptxas_usage,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCH, N_VARS, D_MODEL = 3, 37, 200
SM_COUNT = 132


def compile_all(target, dtype: str, precision: str, k: int, all_configs: bool) -> list[str]:
    """Compiles every launch of one call and of its backward (first config, or all); one
    resource line each."""
    lines = []
    tf32 = precision == "tf32"
    launches = op_launches(
        BATCH, N_VARS, D_MODEL, k, DTYPES[dtype], sm_count=SM_COUNT, allow_tf32=tf32
    ) + backward_launches(BATCH, N_VARS, D_MODEL, k, DTYPES[dtype], allow_tf32=tf32)
    for launch in launches:
        for config in configs(launch, all_configs):
            compiled = compile_launch(launch, config, target)
            regs, stores, loads = ptxas_usage(compiled.asm["ptx"], target.arch)
            meta = {**launch.kwargs, **config.kwargs}
            blocks = ",".join(f"{n}={v}" for n, v in meta.items() if n.startswith("BLOCK"))
            lines.append(
                f"    {launch.name:<22} {blocks:<40} warps={config.num_warps} "
                f"stages={config.num_stages}: {regs} regs, {compiled.metadata.shared} B smem, "
                f"spills {stores}/{loads} B (store/load)"
            )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--kernel", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument(
        "--all-configs", action="store_true", help="every autotune config, not the first"
    )
    args = parser.parse_args(argv)
    failures = 0
    for arch, dtype, k in itertools.product(args.arch, args.dtype, args.kernel):
        for precision in ("ieee", "tf32") if dtype == "fp32" else ("ieee",):
            try:
                lines = compile_all(
                    GPUTarget("cuda", arch, 32), dtype, precision, k, args.all_configs
                )
                print(f"ok   sm_{arch} {dtype} {precision} k={k}", flush=True)
                print("\n".join(lines), flush=True)
            except Exception as error:  # report every failure, then fail
                failures += 1
                print(
                    f"FAIL sm_{arch} {dtype} {precision} k={k}: {type(error).__name__}: {error}",
                    flush=True,
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
