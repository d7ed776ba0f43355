"""Compiles the Triton kernels for NVIDIA targets without a GPU (down to cubin, via
the ptxas shipped with triton), to catch lowering errors the interpreter cannot see.

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
import pathlib
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from casa_kernels.ops import triton_kernels as tk  # noqa: E402


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap the autotuner
        kernel = kernel.fn
    return kernel


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) as ``ptxas -v`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        suffix = "a" if arch == 90 else ""
        done = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name=sm_{arch}{suffix}",
                str(src),
                "-o",
                str(pathlib.Path(tmp, "kernel.cubin")),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = done.stdout + done.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (
        int(v)
        for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    )
    return regs, stores, loads


def _compile(kernel, signature, constexprs, target, num_warps, num_stages=3) -> str:
    """Compiles one kernel to cubin; returns its resource line."""
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    fn = _jit_function(kernel)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    regs, stores, loads = _ptxas_usage(compiled.asm["ptx"], target.arch)
    blocks = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK"))
    return (
        f"    {fn.__name__:<22} {blocks:<40} warps={num_warps} stages={num_stages}: "
        f"{regs} regs, {compiled.metadata.shared} B smem, spills {stores}/{loads} B (store/load)"
    )


def _configs(configs, all_configs: bool):
    return configs if all_configs else configs[:1]


def compile_all(target, dtype: str, precision: str, k: int, all_configs: bool) -> list[str]:
    """Compiles every kernel (first config, or all); returns one resource line per compile."""
    p = "*" + dtype
    common = {"KERNEL": k, "PRECISION": precision, "EMULATE_BF16": False}
    lines = []
    for cfg in _configs(tk._head_configs(), all_configs):
        sig = {
            "x_ptr": p,
            "w_ptr": p,
            "out_ptr": "*fp32",
            "B": "i32",
            "N": "i32",
            "D": "i32",
            "C1": "i32",
            "CHUNKS_PER_SPLIT": "i32",
        }
        consts = {**common, "BLOCK_N": tk.HEAD_BLOCK_N, **cfg.kwargs}
        lines.append(_compile(tk._head_kernel, sig, consts, target, cfg.num_warps, cfg.num_stages))
    sig = {"parts_ptr": "*fp32", "b0_ptr": p}
    for i in range(1, 5):
        sig[f"w{i}_ptr"] = p
        sig[f"b{i}_ptr"] = p
    sig.update(
        {"scratch_ptr": "*fp32", "out_ptr": "*fp32", "SPLITS": "i32", "B": "i32", "D": "i32"}
    )
    consts = {**common, **tk._BOTTLENECK_BLOCKS}
    lines.append(
        _compile(
            tk._bottleneck_kernel, sig, consts, target, tk._BOTTLENECK_WARPS, tk._BOTTLENECK_STAGES
        )
    )
    for cfg in _configs(tk._stats_configs(), all_configs):
        sig = {
            "x_ptr": p,
            "h_ptr": "*fp32",
            "w_ptr": p,
            "bias_ptr": p,
            "max_ptr": "*fp32",
            "sum_ptr": "*fp32",
            "N": "i32",
            "D": "i32",
            "C1": "i32",
            "N_TILES": "i32",
        }
        consts = {**common, "BLOCK_N": tk.TAIL_BLOCK_N, **cfg.kwargs}
        lines.append(
            _compile(tk._tail_stats_kernel, sig, consts, target, cfg.num_warps, cfg.num_stages)
        )
    sig = {
        "part_max_ptr": "*fp32",
        "part_sum_ptr": "*fp32",
        "max_ptr": "*fp32",
        "sum_ptr": "*fp32",
        "D": "i32",
        "N_TILES": "i32",
    }
    lines.append(_compile(tk._stats_merge_kernel, sig, {"BLOCK_D": tk._MERGE_BLOCK_D}, target, 4))
    for cfg in _configs(tk._output_configs(), all_configs):
        sig = {
            "x_ptr": p,
            "h_ptr": "*fp32",
            "w_ptr": p,
            "bias_ptr": p,
            "wvt_ptr": p,
            "bv_ptr": p,
            "max_ptr": "*fp32",
            "sum_ptr": "*fp32",
            "y_ptr": p,
            "N": "i32",
            "D": "i32",
            "C1": "i32",
        }
        consts = {**common, "BLOCK_N": tk.TAIL_BLOCK_N, **cfg.kwargs}
        lines.append(
            _compile(tk._tail_output_kernel, sig, consts, target, cfg.num_warps, cfg.num_stages)
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
