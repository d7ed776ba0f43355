"""From described launches (:mod:`.triton_side`, :mod:`.cuda_side`: grid, resources,
instruction mix, work) to per-kernel and total estimates, with the op's compute and
HBM floors. Pure arithmetic over JSON-ready dicts."""

from __future__ import annotations

import math

from casa_kernels.weights import weight_shapes

from .hardware import Gpu
from .sass import InstructionMix
from .timing import Compiled, KernelWork, estimate


def op_floors(gpu: Gpu, batch: int, n_vars: int, d_model: int, kernel: int, elem: int) -> dict:
    """The op's compute floor (its useful FLOPs, docs/design.md §4, at the tensor-core
    peak) and HBM floor (x read, y written, weights read once), in µs."""
    n, d, k = n_vars, d_model, kernel
    macs = batch * (n * d * d * (k / 4 + 1) + 3 * k * d**3 / 16)
    weights = sum(math.prod(shape) for shape in weight_shapes(n, d, k).values())
    traffic = (2 * batch * n * d + weights) * elem
    return {
        "useful_flops": 2 * macs,
        "compute_floor_us": 2 * macs / (gpu.tensor_tflops * 1e6),
        "hbm_floor_us": traffic / (gpu.hbm_tb_s * 1e6),
    }


def kernel_estimate(gpu: Gpu, launch: dict) -> dict:
    """One described launch → its row: grid, waves, resources, mix shares, work, µs."""
    mix = InstructionMix.from_dict(launch["mix"])
    w = launch["work"]
    work = KernelWork(
        name=launch["name"],
        grid=launch["programs"],
        threads=launch["threads"],
        phases=tuple(tuple(p) for p in w["phases"]),
        macs=w["macs"],
        flops=w["flops"],
        hbm_bytes=w["hbm_bytes"],
        async_steps=w.get("async_steps", 0),
        async_bytes_per_step=w.get("async_bytes_per_step", 0.0),
        stages=w.get("stages", 1),
        wgmma_macs=w.get("wgmma_macs", 0.0),
    )
    compiled = Compiled(launch["registers"], launch["shared_bytes"], launch["local_bytes"], mix)
    e = estimate(gpu, work, compiled)
    row = {
        "grid": launch["grid"],
        "programs": launch["programs"],
        "threads": launch["threads"],
        "blocks_per_sm": e.resident,
        "waves": e.waves,
        "registers": launch["registers"],
        "shared_bytes": launch["shared_bytes"],
        "local_bytes": launch["local_bytes"],
        "tensor_core_share": round(mix.tensor_core_share, 3),
        "tensor_core_of_all": round(mix.tensor_core_of_all, 4),
        "mix": launch["mix"],
        "flops": w["flops"],
        "hbm_bytes": w["hbm_bytes"],
        "latency_rounds": round(e.latency_rounds, 1),
        "bound": e.bound,
        "us": round(e.us, 2),
        "us_low": round(e.us_low, 2),
        "us_high": round(e.us_high, 2),
    }
    for key in ("config", "num_stages", "executed_tensor_core_share"):
        if key in launch:
            row[key] = launch[key]
    return row


def unique_names(launches: list[dict]) -> list[str]:
    """Row names: the launch names without a leading ``_`` or a ``_kernel`` suffix, made
    unique by a ``#2``, ``#3`` ... suffix."""
    names, seen = [], {}
    for launch in launches:
        base = launch["name"].lstrip("_").removesuffix("_kernel")
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def backend_estimate(gpu: Gpu, launches: list[dict], floors: dict) -> dict:
    """``{"total_us", "kernels": {name: row}, ...}`` for one backend at one batch size."""
    rows = {
        name: kernel_estimate(gpu, launch) for name, launch in zip(unique_names(launches), launches)
    }
    total = sum(r["us"] for r in rows.values())
    return {
        "total_us": round(total, 1),
        "total_us_low": round(sum(r["us_low"] for r in rows.values()), 1),
        "total_us_high": round(sum(r["us_high"] for r in rows.values()), 1),
        "launches": len(rows),
        "flops": sum(r["flops"] for r in rows.values()),
        "useful_flops": floors["useful_flops"],
        "compute_floor_us": round(floors["compute_floor_us"], 1),
        "hbm_floor_us": round(floors["hbm_floor_us"], 1),
        "kernels": rows,
    }
