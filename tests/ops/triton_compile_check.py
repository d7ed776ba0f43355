"""Compiles the Triton kernels for NVIDIA targets without a GPU (down to cubin, via
the ptxas shipped with triton), to catch lowering errors the interpreter cannot see.

Run with the interpreter off::

    python -m tests.ops.triton_compile_check --arch 90 80 --dtype fp32 fp16 bf16 --kernel 1 3 7 [--all-configs]

Exit status 1 when any kernel fails to compile; one line per (arch, dtype, precision, k).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from casa_kernels.ops import triton_kernels as tk  # noqa: E402


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap the autotuner
        kernel = kernel.fn
    return kernel


def _compile(kernel, signature, constexprs, target, num_warps):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = triton.compiler.ASTSource(fn=_jit_function(kernel), signature=signature, constexprs=constexprs)
    triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": 3})


def compile_all(target, dtype: str, precision: str, k: int, all_configs: bool) -> None:
    p = "*" + dtype
    common = {"KERNEL": k, "PRECISION": precision, "UPCAST": False}
    tail_configs = tk._tail_configs() if all_configs else tk._tail_configs()[:1]
    for cfg in tail_configs:
        sig = {"x_ptr": p, "h_ptr": "*fp32", "w_ptr": p, "bias_ptr": p, "wv_ptr": p, "bv_ptr": p, "y_ptr": p,
               "N": "i32", "D": "i32", "C1": "i32"}
        _compile(tk._tail_kernel, sig, {**common, **cfg.kwargs}, target, cfg.num_warps)
    head_configs = tk._head_configs() if all_configs else tk._head_configs()[:1]
    for cfg, fuse in itertools.product(head_configs, (True, False)):
        sig = {"x_ptr": p, "w_ptr": p, "b_ptr": p, "out_ptr": "*fp32",
               "B": "i32", "N": "i32", "D": "i32", "C1": "i32", "CHUNKS_PER_SPLIT": "i32"}
        consts = {**common, "FUSE_EPILOGUE": fuse, "BLOCK_N": tk.HEAD_BLOCK_N, **cfg.kwargs}
        _compile(tk._head_kernel, sig, consts, target, cfg.num_warps)
    sig = {"h1_ptr": "*fp32"}
    for i in range(1, 5):
        sig[f"w{i}_ptr"] = p
        sig[f"b{i}_ptr"] = p
    sig.update({"s2_ptr": "*fp32", "s3_ptr": "*fp32", "s4_ptr": "*fp32", "out_ptr": "*fp32", "D": "i32"})
    _compile(tk._bottleneck_kernel, sig, {**common, **tk._BOTTLENECK_BLOCKS}, target, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--kernel", type=int, nargs="+", default=[1, 3, 7])
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not the first")
    args = parser.parse_args(argv)
    failures = 0
    for arch, dtype, k in itertools.product(args.arch, args.dtype, args.kernel):
        for precision in ("ieee", "tf32") if dtype == "fp32" else ("ieee",):
            try:
                compile_all(GPUTarget("cuda", arch, 32), dtype, precision, k, args.all_configs)
                print(f"ok   sm_{arch} {dtype} {precision} k={k}", flush=True)
            except Exception as error:  # report every failure, then fail
                failures += 1
                print(f"FAIL sm_{arch} {dtype} {precision} k={k}: {type(error).__name__}: {error}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
