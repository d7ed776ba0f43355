"""The triton backend's launches for the cost model: compiled for sm_90a with the
specialisation their launchers give (:mod:`.triton_compile`), read back (resources,
SASS), and each described as a :class:`.timing.KernelWork` from its launch arguments,
grid and config.

The work descriptions state each kernel's loop structure (steps per program and what a
step loads and multiplies); they follow casa_kernels/ops/triton_kernels/ and must be
kept in step with it.

``python -m bench.cost_model.triton_side --batch 16 1 --shape N D K`` prints, as JSON, the
compiled facts of every launch (for the cost model to run under another Triton release,
in another virtual environment).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from . import sass
from .triton_compile import Config, Launch, compile_launch, configs, cuobjdump, grid, op_launches


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def work(launch: Launch, config: Config) -> dict:
    """KernelWork fields of one launch at ``config`` (without name, grid and threads)."""
    a = {**launch.bound_args(), **launch.kwargs, **config.kwargs}
    name = launch.name
    k = a.get("KERNEL", 1)
    if name == "_head_kernel":
        x, w, out = a["x_ptr"], a["w_ptr"], a["out_ptr"]
        e = x.element_size()
        bn, bc, bt = a["BLOCK_N"], a["BLOCK_C"], a["BLOCK_T"]
        p = k // 2
        shifts = (k - 1 - p) // 2 + (p + 1) // 2 + 1  # contiguous slabs per chunk
        # Per BLOCK_N chunk of variates (one pipelined loop step): the slabs
        # [BLOCK_N, 2·BLOCK_T] and every tap's weight block [BLOCK_C, BLOCK_N].
        return dict(
            phases=((1, bc * bt * 4),),  # the partials' store
            async_steps=a["CHUNKS_PER_SPLIT"],
            async_bytes_per_step=(shifts * bn * 2 * bt + k * bc * bn) * e,
            stages=config.num_stages,
            macs=a["CHUNKS_PER_SPLIT"] * k * bc * bn * bt,
            hbm_bytes=_bytes(x) + _bytes(w) + _bytes(out),
        )
    if name == "_h1_kernel":
        parts, out = a["parts_ptr"], a["out_ptr"]
        tile = a["BLOCK_L"] * a["BLOCK_C"]
        return dict(
            # the split sum, SPLIT_UNROLL [BLOCK_L, BLOCK_C] fp32 tiles per step; the store
            phases=(
                (_cdiv(a["SPLITS"], a["SPLIT_UNROLL"]), a["SPLIT_UNROLL"] * tile * 4),
                (1, tile * out.element_size()),
            ),
            macs=0,
            hbm_bytes=_bytes(parts) + _bytes(out),
        )
    if name == "_bottleneck_layer_kernel":
        x, w, out = a["in_ptr"], a["w_ptr"], a["out_ptr"]
        e = x.element_size()
        bk, bl, bo = a["BLOCK_K"], a["BLOCK_L"], a["BLOCK_O"]
        chunks = _cdiv(a["CIN"], bk)
        rows = bl // 2 if a["TRANSPOSED"] else bl  # rows per dot (a parity's, transposed)
        # Per BLOCK_K chunk (one pipelined loop step), every tap's activation slab and
        # weight block (a transposed conv: a loop per output parity, taps summing to k).
        loops = 2 if a["TRANSPOSED"] else 1
        return dict(
            phases=((1, bo * 4), (loops, rows * bo * out.element_size())),  # bias; stores
            async_steps=loops * chunks,
            async_bytes_per_step=k / loops * (rows * bk + bk * bo) * e,
            stages=config.num_stages,
            macs=chunks * k * rows * bk * bo,
            hbm_bytes=_bytes(x) + _bytes(w) + _bytes(a["bias_ptr"]) + _bytes(out),
        )
    if name in ("_tail_stats_kernel", "_tail_output_kernel"):
        x, h, w = a["x_ptr"], a["h_ptr"], a["w_ptr"]
        e = x.element_size()
        bn, bd, bc, C1 = a["BLOCK_N"], a["BLOCK_D"], a["BLOCK_C"], a["C1"]
        stages = config.num_stages
        # The score tile's transposed conv: a pipelined loop per output parity over
        # BLOCK_C chunks of C1; a step loads its taps' dec2 block and fp32 h5 block (the
        # taps of both parities summing to k).
        chunks = _cdiv(C1, bc)
        score_steps, score_bytes = 2 * chunks, k / 2 * (bn * bc * e + bc * (bd // 2) * 4)
        score_macs = chunks * k * bn * bc * (bd // 2)
        epilogue = (1, bn * bd * e)  # bias and the x tile
        if name == "_tail_stats_kernel":
            stats = _bytes(a["max_ptr"]) + _bytes(a["sum_ptr"])
            return dict(
                # the second parity loop's pipeline fill (the model counts the first)
                phases=((stages - 1, 0), epilogue, (1, 2 * bd * 4)),
                async_steps=score_steps,
                async_bytes_per_step=score_bytes,
                stages=stages,
                macs=score_macs,
                hbm_bytes=_bytes(x) + _bytes(h) + _bytes(w) + stats,
            )
        # Persistent: a program takes every programs-th tile; per tile the value GEMM's
        # pipelined loop over BLOCK_E chunks of D, then the score tile's two.
        D, B, be = a["D"], a["B"], a["BLOCK_E"]
        tiles = _cdiv(a["N"], bn) * _cdiv(D, bd) * B
        per_program = _cdiv(tiles, math.prod(grid(launch, config)))
        value_steps, value_bytes = _cdiv(D, be), (bn * be + be * bd) * e
        steps = value_steps + score_steps
        return dict(
            phases=(
                (per_program, 3 * bd * 4),  # value bias and statistics
                (per_program, epilogue[1]),
                # every tile's three pipeline fills but the first (counted by the model)
                (per_program * 3 * (stages - 1) - (stages - 1), 0),
            ),
            async_steps=per_program * steps,
            async_bytes_per_step=(value_steps * value_bytes + score_steps * score_bytes) / steps,
            stages=stages,
            macs=per_program * (score_macs + value_steps * bn * be * bd),
            hbm_bytes=2 * _bytes(x) + _bytes(h) + _bytes(w) + _bytes(a["wvt_ptr"]),
        )
    if name == "_stats_merge_kernel":
        part_max, col_max = a["part_max_ptr"], a["max_ptr"]
        tiles, bt, bd = a["N_TILES"], a["BLOCK_T"], a["BLOCK_D"]
        steps = _cdiv(tiles, bt)  # BLOCK_T tiles' statistics per step
        return dict(
            phases=((steps, bt * bd * 4), (steps, 2 * bt * bd * 4)),  # max pass, sum pass
            macs=0,
            hbm_bytes=2 * _bytes(part_max) + 2 * _bytes(col_max),
        )
    raise ValueError(f"{name}: no work description for this Triton kernel")


def describe(launch: Launch, config: Config, target) -> dict:
    """The compiled facts and the work of one launch at ``config``: JSON-ready."""
    compiled = compile_launch(launch, config, target)
    cubin = compiled.asm["cubin"]
    resources = next(iter(sass.parse_resources(cuobjdump(cubin, "-res-usage")).values()))
    mix = sass.instruction_mix(cuobjdump(cubin, "-sass"))
    dims = grid(launch, config)
    threads = config.num_warps * 32
    fields = work(launch, config)
    programs = math.prod(dims)
    return {
        "name": launch.name,
        "grid": list(dims),
        "programs": programs,
        "threads": threads,
        "num_stages": config.num_stages,
        "config": config.kwargs,
        "registers": resources.registers,
        "shared_bytes": compiled.metadata.shared + resources.shared,
        "local_bytes": resources.local,
        "mix": mix.as_dict(),
        "work": {**fields, "flops": 2.0 * programs * fields["macs"]},
    }


def describe_op(
    batch: int, n_vars: int, d_model: int, kernel: int, dtype: torch.dtype, sm_count: int
) -> list[dict]:
    """Every launch of one call (first config of each autotuned kernel), described."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    return [
        describe(launch, config, target)
        for launch in op_launches(batch, n_vars, d_model, kernel, dtype, sm_count=sm_count)
        for config in configs(launch)
    ]


def main(argv=None) -> int:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "D", "K"), required=True)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args(argv)
    n, d, k = args.shape
    dtype = getattr(torch, args.dtype)
    out = {
        "triton_version": triton.__version__,
        "launches": {str(b): describe_op(b, n, d, k, dtype, args.sms) for b in args.batch},
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
