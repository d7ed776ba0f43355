"""``torchrun --nproc-per-node P -m bench distributed``: variate-parallel CASA over P processes.

The whole forecaster (:class:`~casa_kernels.distributed.VariateParallelCASAModel`), forward,
inference mode, at D = 128, L = H = 96, two layers, k = 3:

* ``strong`` — N fixed, split over the P ranks; and the single-process CASAModel at the same N
  (provider ``casa-<backend>-p1``, run by rank 0 alone with the same threads per process);
* ``weak`` — N/P fixed per rank (N grows with P); and the single-process model at N/P.

Per point: latency p20/p50/p80 (each repetition starts on all ranks after a barrier and
counts as long as its slowest rank), the CPU time of a call (``cpu_ms_p50``: the process's,
the slowest rank's; on a shared machine the work done rather than the time it took), peak
extra memory of one forward (the largest over
the ranks), the parameter bytes a rank holds, and the bytes all-reduced per layer —
counted by wrapping ``torch.distributed.all_reduce`` during one forward — next to the keys
and values an all-gather would need for full attention over variates (``2·B·N·D``
elements per layer). Ring algorithms put ``2(P−1)/P`` of an all-reduce's payload and
``(P−1)/P`` of an all-gather's result on each rank's wire; both are in the rows.

Rows go to ``<out>/distributed.csv`` (rank 0 writes), the plot of bytes per layer against N
to ``<out>/distributed_bytes.png`` (skipped with a note without matplotlib), and the folder's
results page is rebuilt (:mod:`bench.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from casa_kernels import CASAModel
from casa_kernels.distributed import communicated_elements, shard_model
from casa_kernels.distributed.stages import resolve_stages
from casa_kernels.reference.stages import accumulation_dtype

from . import report
from .measure import measure_peak_memory, percentile
from .results import default_out_dir, environment_columns, read_rows, upsert_rows

D_MODEL, KERNEL, SEQ_LEN, E_LAYERS = 128, 3, 96, 2
STRONG_N = {False: (1024, 4096, 16384), True: (256, 1024, 4096)}  # by --quick
WEAK_N_PER_RANK = {False: (512, 2048, 8192), True: (128, 512, 2048)}
DEFAULT_BATCH = 4
PLOT_N_MAX = 2**20


@dataclass(frozen=True)
class Point:
    sweep: str  # "strong" or "weak"
    world_size: int  # 1: the single-process model
    n_vars: int  # all variates
    batch: int


def points(world_size: int, batch: int, quick: bool) -> list[Point]:
    """The strong and weak points, each with its single-process (P = 1) counterpart first."""
    out = []
    for n in STRONG_N[quick]:
        out += [Point("strong", 1, n, batch), Point("strong", world_size, n, batch)]
    for n in WEAK_N_PER_RANK[quick]:
        out += [Point("weak", 1, n, batch), Point("weak", world_size, n * world_size, batch)]
    return out


def kv_allgather_bytes(batch: int, n_vars: int, d_model: int, dtype: torch.dtype) -> int:
    """Keys and values of all variates for one full-attention layer: ``2·B·N·D`` elements."""
    return 2 * batch * n_vars * d_model * torch.finfo(dtype).bits // 8


def casa_allreduce_bytes(batch: int, d_model: int, dtype: torch.dtype) -> int:
    """What one CASA layer's forward all-reduces (in the accumulation dtype), whatever N is."""
    return communicated_elements(batch, d_model) * torch.finfo(accumulation_dtype(dtype)).bits // 8


@contextlib.contextmanager
def counting_all_reduce() -> Iterator[list[int]]:
    """Counts the bytes of every floating-point tensor passed to ``torch.distributed.all_reduce``
    in the block: the layers' payloads. The agreement check's int64 call descriptor (one
    per call, not per layer; :mod:`casa_kernels.distributed.agreement`) is left out."""
    counted = [0]
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if tensor.is_floating_point():
            counted[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield counted
    finally:
        dist.all_reduce = real


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rep_times_ms(
    fn: Callable[[], object], device: str, warmup: int, reps: int, together: bool
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of ``reps`` calls after ``warmup``.

    CPU time is this process's (all its threads; a rank waiting in an all-reduce does not
    spin): on a machine shared with other jobs it is the work done, the wall time what it
    took. ``together``: every rank starts each call after a barrier.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        if together:
            dist.barrier()
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - cpu_start) * 1e3)
    return wall, cpu


def _max_over_ranks(values: list[float], device: str) -> list[float]:
    """The elementwise maximum of ``values`` over the ranks (on ``device``: NCCL takes GPU tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _model(point: Point, device: str, dtype: torch.dtype, backend: str) -> CASAModel:
    torch.manual_seed(0)
    return (
        CASAModel(
            n_vars=point.n_vars,
            d_model=D_MODEL,
            kernel=KERNEL,
            seq_len=SEQ_LEN,
            pred_len=SEQ_LEN,
            e_layers=E_LAYERS,
            backend=backend,
        )
        .to(device, dtype)
        .eval()
    )


def measure(
    point: Point, device: str, dtype: torch.dtype, backend: str, warmup: int, reps: int
) -> dict | None:
    """Measures ``point`` (every rank calls this); the row on rank 0, None elsewhere."""
    rank = dist.get_rank()
    if point.world_size == 1:  # the single-process model on rank 0; the others wait
        stats = _measure_single(point, device, dtype, backend, warmup, reps) if rank == 0 else None
        dist.barrier()
        return stats
    model = shard_model(_model(point, device, dtype, backend))
    x = torch.randn(point.batch, SEQ_LEN, model.shard.n_local, device=device, dtype=dtype)
    with torch.inference_mode():
        with counting_all_reduce() as counted:
            model(x)
        wall, cpu = rep_times_ms(lambda: model(x), device, warmup, reps, together=True)
        both = _max_over_ranks(wall + cpu, device)  # per repetition, the slowest rank
        wall, cpu = both[:reps], both[reps:]
        peak, method = measure_peak_memory(lambda: model(x), device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak, param_bytes = (int(v) for v in _max_over_ranks([peak, param_bytes], device))
    if rank != 0:
        return None
    return _row(
        point,
        dtype,
        wall,
        cpu,
        peak,
        method,
        param_bytes,
        counted[0] // E_LAYERS,
        model.shard.n_local,
    )


def _measure_single(
    point: Point, device: str, dtype: torch.dtype, backend: str, warmup: int, reps: int
) -> dict:
    model = _model(point, device, dtype, backend)
    x = torch.randn(point.batch, SEQ_LEN, point.n_vars, device=device, dtype=dtype)
    with torch.inference_mode():
        wall, cpu = rep_times_ms(lambda: model(x), device, warmup, reps, together=False)
        peak, method = measure_peak_memory(lambda: model(x), device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return _row(point, dtype, wall, cpu, peak, method, param_bytes, 0, point.n_vars)


def _row(
    point: Point,
    dtype: torch.dtype,
    wall: list[float],
    cpu: list[float],
    peak: int,
    method: str,
    param_bytes: int,
    allreduce_bytes_per_layer: int,
    n_local: int,
) -> dict:
    p = point.world_size
    times = sorted(wall)
    kv = kv_allgather_bytes(point.batch, point.n_vars, D_MODEL, dtype)
    p50_s = percentile(times, 0.5) / 1e3
    return {
        "suite": "distributed",
        "sweep": point.sweep,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": point.batch,
        "n_vars": point.n_vars,
        "d_model": D_MODEL,
        "kernel": KERNEL,
        "seq_len": SEQ_LEN,
        "e_layers": E_LAYERS,
        "config": f"N={point.n_vars} P={p} ({n_local}/rank)",
        "latency_ms_p20": f"{percentile(times, 0.2):.6g}",
        "latency_ms_p50": f"{percentile(times, 0.5):.6g}",
        "latency_ms_p80": f"{percentile(times, 0.8):.6g}",
        "reps": len(times),
        "samples_per_s": f"{point.batch / p50_s:.6g}",
        "tokens_per_s": f"{point.batch * point.n_vars / p50_s:.6g}",
        "peak_mem_bytes": peak,
        "mem_method": method + ("; the largest over the ranks" if p > 1 else ""),
        "status": "ok",
        "note": "",
        "world_size": p,
        "cpu_ms_p50": f"{percentile(sorted(cpu), 0.5):.6g}",
        "n_vars_per_rank": n_local,
        "param_bytes_per_rank": param_bytes,
        "allreduce_bytes_per_layer": allreduce_bytes_per_layer,
        "allreduce_wire_bytes_per_layer_ring": round(2 * (p - 1) / p * allreduce_bytes_per_layer),
        "kv_allgather_bytes_per_layer": kv if p > 1 else 0,
        "kv_allgather_wire_bytes_per_layer_ring": round((p - 1) / p * kv),
    }


def plot_bytes(out_dir: Path, rows: list[dict]) -> Path | None:
    """``distributed_bytes.png``: bytes per layer vs N, CASA's all-reduce (measured) and a K/V all-gather."""
    try:
        import matplotlib
    except ImportError:
        print("plot: matplotlib is not installed; no distributed_bytes.png", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(rows, key=lambda r: r["timestamp"])
    batch, dtype = int(last["batch"]), getattr(torch, last["dtype"])
    measured = sorted(
        (int(r["n_vars"]), int(r["allreduce_bytes_per_layer"]))
        for r in rows
        if int(r["world_size"]) > 1
        and r["status"] == "ok"
        and (r["batch"], r["dtype"]) == (last["batch"], last["dtype"])
    )
    ns = [2**i for i in range(3, PLOT_N_MAX.bit_length())]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(
        ns,
        [casa_allreduce_bytes(batch, D_MODEL, dtype)] * len(ns),
        "--",
        color="C0",
        lw=1,
        label="CASA: all-reduce of h1 [B,D/4,D/2] + softmax max, sum [B,D]",
    )
    sizes = sorted({int(r["world_size"]) for r in rows if int(r["world_size"]) > 1})
    ax.plot(
        [n for n, _ in measured],
        [b for _, b in measured],
        "o",
        color="C0",
        label=f"CASA, counted during a forward (P = {', '.join(map(str, sizes))})",
    )
    ax.plot(
        ns,
        [kv_allgather_bytes(batch, n, D_MODEL, dtype) for n in ns],
        "-",
        color="C3",
        label="full attention: all-gather of keys and values, 2·B·N·D",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (variates, all ranks)")
    ax.set_ylabel("bytes per layer per rank (forward)")
    ax.set_title(
        f"Communication per layer: variate-parallel CASA vs full attention\n"
        f"{last['device_name']}, {last['dtype']}, B={batch}, D={D_MODEL}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "distributed_bytes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    """Runs the suite on this rank (launched by torchrun); rank 0 writes the rows and the plot."""
    if args.suites != ["distributed"]:
        print(
            "distributed: run it alone (torchrun --nproc-per-node P -m bench distributed)",
            file=sys.stderr,
        )
        return 2
    if "WORLD_SIZE" not in os.environ:
        print(
            "distributed: launch with torchrun --nproc-per-node P -m bench distributed (P >= 2)",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return _run(args, device)
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, device: str) -> int:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size < 2:
        print(
            "distributed: expected at least 2 processes (--nproc-per-node P >= 2)", file=sys.stderr
        )
        return 2
    dtype = getattr(torch, args.dtype)
    backend, _ = resolve_stages("auto", torch.device(device), dtype)  # the stages that will run
    batch = int(args.batch.split(",")[0]) if args.batch else DEFAULT_BATCH
    warmup = args.warmup if args.warmup is not None else 1
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    out_dir = args.out or default_out_dir(device)
    csv_path = out_dir / "distributed.csv"
    env = environment_columns(device)
    for point in points(world_size, batch, args.quick):
        row = measure(point, device, dtype, backend, warmup, reps)
        if rank == 0:
            row = {
                **env,
                **row,
                "provider": f"casa-{backend}-p{point.world_size}",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            upsert_rows(csv_path, [row])
            print(
                f"{point.sweep:<6} {row['config']:<28} p50 {float(row['latency_ms_p50']):9.2f} ms (cpu {float(row['cpu_ms_p50']):8.2f})  "
                f"peak {int(row['peak_mem_bytes']) / 2**20:8.1f} MiB/rank  "
                f"all-reduce {int(row['allreduce_bytes_per_layer']) / 2**10:7.1f} KiB/layer  "
                f"K,V all-gather {int(row['kv_allgather_bytes_per_layer']) / 2**20:8.2f} MiB/layer",
                flush=True,
            )
    if rank == 0:
        rows = [r for r in read_rows(csv_path) if r["device_name"] == env["device_name"]]
        plot = plot_bytes(out_dir, rows)
        print(f"distributed: rows -> {csv_path}" + (f", plot -> {plot}" if plot else ""))
        print(f"distributed: results page -> {report.write_page(out_dir)}")
    return 0
