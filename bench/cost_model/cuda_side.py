"""The cuda backend's launches for the cost model: csrc/cuda/score_attention_kernels.cu
compiled with nvcc for sm_90a and read back (``cuobjdump -res-usage``, ``-sass``, with
the cuobjdump Triton ships), the launch plan read from csrc/cuda/launch_plan.h (the
launcher's own plan, built here with a host compiler into a small program), and each
launch described as a :class:`.timing.KernelWork`.

The work descriptions state each kernel's loop structure (steps per block and what a
step loads and multiplies); they follow score_attention_kernels.cu and must be kept in
step with it. The tile sizes come from the plan program.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

from casa_kernels.cutlass_headers import find_include

from . import sass

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "csrc" / "cuda" / "score_attention_kernels.cu"
PLAN_SOURCE = pathlib.Path(__file__).with_name("cuda_plan.cpp")
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
# Whether the template arguments of a mangled kernel name start with the dtype.
_MANGLED_TYPE = {
    "float32": lambda args: args.startswith("If"),
    "float16": lambda args: args.split("E", 1)[0].endswith("6half_t"),
    "bfloat16": lambda args: args.split("E", 1)[0].endswith("10bfloat16_t"),
}


class ToolMissing(RuntimeError):
    """A tool the CUDA half of the model needs is not installed; the message says which."""


def find_nvcc() -> str:
    """nvcc from $NVCC, PATH, $CUDA_HOME or /usr/local/cuda*, as .ci/compile_cuda.sh does."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    candidates += [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")]
    candidates += ["/usr/local/cuda/bin/nvcc", *sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"))]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise ToolMissing("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")


def _cuobjdump() -> str:
    try:
        import triton
    except ImportError as error:
        raise ToolMissing(
            f"cuobjdump: taken from Triton, which does not import ({error})"
        ) from None
    return triton.knobs.nvidia.cuobjdump.path


def compile_kernels(out_dir: pathlib.Path) -> tuple[str, str]:
    """nvcc -cubin of the kernels for sm_90a; returns (res-usage text, SASS text)."""
    cutlass, how = find_include()
    if cutlass is None:
        raise ToolMissing(f"CUTLASS/CuTe headers: {how}")
    cubin = out_dir / "kernels.cubin"
    subprocess.run(
        [
            find_nvcc(),
            "-cubin",
            str(KERNELS),
            "-o",
            str(cubin),
            "-std=c++17",
            "-O3",
            "-I",
            str(ROOT / "csrc"),
            "-isystem",
            cutlass,
            "-gencode",
            "arch=compute_90a,code=sm_90a",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    tool = _cuobjdump()
    dump = [
        subprocess.run([tool, flag, str(cubin)], check=True, capture_output=True, text=True).stdout
        for flag in ("-res-usage", "-sass")
    ]
    return dump[0], dump[1]


def launch_plan(out_dir: pathlib.Path, dtype: str, batch, n_vars, d_model, kernel, sms) -> dict:
    """The launcher's plan (launch_plan.h) for one problem, via the plan program."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise ToolMissing("no C++ compiler (g++ or $CXX) to build the launch-plan program")
    exe = out_dir / "cuda_plan"
    if not exe.exists():
        subprocess.run(
            [
                cxx,
                "-std=c++17",
                "-O1",
                "-I",
                str(ROOT / "csrc" / "cuda"),
                str(PLAN_SOURCE),
                "-o",
                str(exe),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    args = [DTYPE_CODES[dtype], batch, n_vars, d_model, kernel, sms]
    done = subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _taps(kernel: int, parity: int) -> int:
    """Taps of a stride-2 transposed conv (pad k//2) that reach output parity r."""
    first = (parity + kernel // 2) % 2
    return (kernel - first + 1) // 2


def work(plan: dict, launch: dict, dtype: str, batch, n_vars, d_model, kernel) -> dict:
    """KernelWork fields (without name, grid, threads) of one planned launch, with the
    trip counts the executed tensor-core share weights loops by
    (:func:`.sass.executed_tensor_core_share`): ``mma_loop_trips``, the K steps of the
    launch's longest GEMM, and ``loop_trips``, the iterations per thread of its copy or
    element-wise epilogue loops over the tile (the tail's row-major pass and its
    statistics' batched merges: the most trips of any of them)."""
    e = 4 if dtype == "float32" else 2
    vec = 16 // e
    B, N, D, k = batch, n_vars, d_model, kernel
    C1 = D // 4
    act = B * D * D // 8  # every activation of the bottleneck: [B, D²/8]
    bk = plan["tiles"]["bk"]
    threads = launch["threads"]
    name = launch["name"]
    x_bytes = B * N * D * e
    rows, cols = plan["tiles"]["conv"]
    halo_stride2, halo_transposed, halo_tail = plan["tiles"]["conv_halo"]

    def conv(channels: int, transposed: bool) -> dict:
        """The conv kernel over ``channels`` input channels: per K step of bk channels, the
        staged taps' weight tiles and the halo tile by 16-byte cp.async in a
        conv_stages-deep pipeline, one MMA per tap on them."""
        taps = max(_taps(k, 0), _taps(k, 1)) if transposed else k
        halo = halo_transposed if transposed else halo_stride2
        steps = _cdiv(channels, bk)
        copy_trips = max(_cdiv(taps * rows * bk, vec * threads), _cdiv(bk * halo, vec * threads))
        return dict(
            mma_loop_trips=steps,
            loop_trips=copy_trips,
            async_steps=steps,
            async_bytes_per_step=(taps * rows * bk + bk * halo) * e,
            stages=plan["tiles"]["conv_stages"],
            macs=steps * taps * rows * cols * bk,
        )

    if name == "head":
        # Its epilogue stores the fp32 partial sums, or with one split h1 (its bias loads).
        splits = plan["head_splits"]
        return dict(
            phases=() if splits > 1 else ((1, rows * e),),
            **conv(plan["head_chunk_rows"], False),
            hbm_bytes=x_bytes + C1 * N * k * e + (splits * act * 4 if splits > 1 else act * e),
        )
    if name == "head_reduce":
        per_thread = _cdiv(act, launch["blocks"] * threads)  # grid-stride iterations
        return dict(
            phases=((per_thread, threads * plan["head_splits"] * 4),),
            mma_loop_trips=0,
            loop_trips=max(per_thread, plan["head_splits"]),
            macs=0,
            hbm_bytes=plan["head_splits"] * act * 4 + act * e,
        )
    if "layer" in launch:  # a bottleneck conv (bottleneck_layer in launch_plan.h)
        layer = launch["layer"]
        cin, lin, cout, splits = layer["cin"], layer["lin"], layer["cout"], layer["splits"]
        bias = (1, rows * e)  # the epilogue's bias loads
        # Split-K: the split's fp32 accumulators stored (not waited on), its arrival
        # counted (one waited atomic); the last split loads the slots of max_conv_splits
        # splits (16-byte loads, its own again beyond the splits). The partials are L2
        # traffic, not compulsory HBM bytes.
        partials = (1, plan["tiles"]["max_conv_splits"] * rows * cols * 4, 16)
        phases = ((1, 0), partials, bias) if splits > 1 else (bias,)
        return dict(
            phases=phases,
            **conv(layer["chunk"], layer["transposed"]),
            hbm_bytes=(B * cin * lin + cout * cin * k + act) * e,
        )
    rows, cols = plan["tiles"]["tail"]
    tiles = plan["tail_splits"]
    if name in ("tail_stats", "tail_output"):
        # The score tile: one conv tile (rows x cols/2) per output parity, each its own
        # tail_score_stages-deep pipeline of C1 / bk steps; the first fill counts through
        # the async fields, the second as a phase of one waited step.
        score_stages = plan["tiles"]["tail_score_stages"]
        steps = _cdiv(C1, bk)
        score_macs = sum(steps * _taps(k, r) * rows * (cols // 2) * bk for r in (0, 1))
        score_bytes = (max(_taps(k, 0), _taps(k, 1)) * rows * bk + bk * halo_tail) * e
        second_fill = (score_stages - 1, 0)
        x_pass = (1, rows * cols * e)  # the row-major pass adding bias, sigmoid and x
        x_trips = _cdiv(rows * cols, vec * threads)
        # Statistics are merged by threads // cols groups of one thread per column, each
        # over every groups-th item (the tile's rows, or the row tiles' statistics) in
        # batches of merge_batch, then the groups' partials from shared memory.
        groups = threads // cols
        batch = plan["tiles"]["merge_batch"]
        scan_trips = _cdiv(_cdiv(rows, groups), batch)
        fields = dict(
            phases=(second_fill, x_pass),
            mma_loop_trips=steps,
            loop_trips=max(x_trips, scan_trips),
            async_steps=2 * steps,
            async_bytes_per_step=score_bytes,
            stages=score_stages,
            macs=score_macs,
            hbm_bytes=x_bytes + act * e + C1 * N * k * e + B * tiles * D * 8,
        )
        if name == "tail_stats":
            return fields
        value_steps = _cdiv(D, bk)
        value_fill = (plan["tiles"]["value_stages"] - 1, 0)  # the value GEMM's own pipeline
        # Its columns' statistics merged over the row tiles: per thread a max pass, then a
        # sum pass, each in steps of merge_batch tiles loaded at once.
        per_thread = _cdiv(tiles, groups)
        merge_trips = _cdiv(per_thread, batch)
        merge = (2 * merge_trips, threads * 8 * min(batch, per_thread))
        fields.update(
            # the merge first; after the value GEMM, x again for the residual
            phases=(merge, second_fill, x_pass, value_fill, x_pass),
            mma_loop_trips=max(steps, value_steps),
            loop_trips=max(x_trips, merge_trips),
            async_steps=2 * steps + value_steps,
            macs=score_macs + value_steps * rows * cols * bk,
            # the value GEMM runs on wgmma where the SASS has it (fp16/bf16 on sm_90a)
            wgmma_macs=value_steps * rows * cols * bk,
            # x twice (value GEMM, residual), y once, h5, dec2, Wv, the statistics
            hbm_bytes=3 * x_bytes + act * e + C1 * N * k * e + D * D * e + B * tiles * D * 8,
        )
        return fields
    raise ValueError(f"{name}: no work description for this CUDA launch")


def _function(
    names, kernel: str, dtype: str, kernel_size: int, flags: tuple = (), tail_cols: int = 0
) -> str:
    """The mangled name of ``kernel`` (instantiated for ``dtype``, the kernel size and, for
    the conv kernel, its bool parameters ``flags`` (transposed, split-K), for the tail
    kernels the tile width ``tail_cols``, where templated on them)."""
    mark = f"{len(kernel)}{kernel}"
    hits = [(n, n.split(mark, 1)[1]) for n in names if mark in n]
    templated = [(n, args) for n, args in hits if args.startswith("I")]
    if templated:
        found = [(n, a) for n, a in templated if _MANGLED_TYPE[dtype](a)]
        if any("Li" in a for _, a in found):
            found = [(n, a) for n, a in found if f"Li{kernel_size}E" in a]
        if any("Lb" in a for _, a in found):
            bools = "".join(f"Lb{int(flag)}E" for flag in flags)
            found = [(n, a) for n, a in found if bools in a]
        if tail_cols:
            found = [(n, a) for n, a in found if f"Li{kernel_size}ELi{tail_cols}E" in a]
    else:
        found = hits
    if len(found) != 1:
        raise ValueError(f"{kernel} ({dtype}): expected one compiled function, found {found}")
    return found[0][0]


def describe_op(batches, n_vars, d_model, kernel, dtype: str, sms: int) -> dict:
    """``{batch: [launch description, ...]}`` for the cuda backend (one nvcc compile)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(tmp)
        res_text, sass_text = compile_kernels(out_dir)
        resources = sass.parse_resources(res_text)
        functions = sass.split_functions(sass_text)
        described = {}
        for batch in batches:
            plan = launch_plan(out_dir, dtype, batch, n_vars, d_model, kernel, sms)
            launches = []
            for launch in plan["launches"]:
                if launch["blocks"] == 0:  # not launched for this problem
                    continue
                layer = launch.get("layer")
                # conv_kernel's bool parameters: transposed, split-K
                flags = (layer["transposed"], layer["splits"] > 1) if layer else ()
                tail_cols = plan["tiles"]["tail"][1] if launch["name"].startswith("tail") else 0
                fn = _function(resources, launch["kernel"], dtype, kernel, flags, tail_cols)
                res = resources[fn]
                fields = work(plan, launch, dtype, batch, n_vars, d_model, kernel)
                # The executed share at the plan's trip counts (a lower bound), and with
                # every loop run once.
                executed = [
                    round(
                        sass.executed_tensor_core_share(
                            functions[fn],
                            fields["macs"],
                            launch["threads"] // 32,
                            *trips,
                            wgmma_macs=fields.get("wgmma_macs", 0.0),
                        ),
                        3,
                    )
                    for trips in (
                        (fields["mma_loop_trips"], fields["loop_trips"]),
                        (1, 1),
                    )
                ]
                launches.append(
                    {
                        "name": launch["name"],
                        "grid": [launch["blocks"], 1, 1],
                        "programs": launch["blocks"],
                        "threads": launch["threads"],
                        "registers": res.registers,
                        "shared_bytes": launch["smem_bytes"] + res.shared,
                        "local_bytes": res.local,
                        "mix": sass.instruction_mix(functions[fn]).as_dict(),
                        "executed_tensor_core_share": executed,
                        "work": {**fields, "flops": 2.0 * launch["blocks"] * fields["macs"]},
                    }
                )
            described[str(batch)] = launches
        return described


@functools.lru_cache(maxsize=1)
def nvcc_version() -> str:
    """``nvcc 13.0.88`` (from ``nvcc --version``), or ``nvcc`` when it does not say."""
    text = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release [\d.]+, V([\d.]+)", text)
    return f"nvcc {found.group(1)}" if found else "nvcc"
