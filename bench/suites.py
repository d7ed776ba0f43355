"""The points of each suite and the loop that measures every provider at every point.

Suites (docs/design.md §8):

* ``attention`` — the op alone (``[B, N, D] -> [B, N, D]``) at the dataset shapes.
* ``scaling`` — the op alone while one size grows: sweep ``n`` (N geometric ×2 from 8),
  ``d`` (D), ``b`` (B); plus sweep ``l`` (seq_len L) at the model level, since L only
  enters the forecaster's embedding ``Linear(L→D)`` and its instance normalisation, not
  the attention op.
* ``model`` — the whole forecaster ``[B, L, N] -> [B, H, N]``: CASAModel per CASA provider,
  ITransformerModel (einsum / sdpa attention) per full provider.
* ``train`` — training: the op's forward+backward (sweeps ``op-dataset``, ``op-n``) and the
  forecaster's training step, forward, MSE loss, backward, AdamW step (``step-dataset``,
  ``step-n``, ``step-l``), per provider (:mod:`bench.training`).

Within a sweep the points are in ascending order; a provider that hits ``oom`` or
``timeout`` stops growing: its larger points of that sweep are recorded with the same
status and a note, and not run; the other providers go on.
"""

from __future__ import annotations

import functools
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .measure import Latency, MeasurementTimeout, measure_latencies, measure_peak_memory
from .providers import Point, Provider
from .results import environment_columns, upsert_rows

# name: (n_vars, d_model, e_layers); L = H = 96 (docs/design.md §8; e_layers as in iTransformer's scripts).
DATASETS = {
    "ETTh1": (7, 128, 2),
    "Weather": (21, 512, 3),
    "Solar": (137, 512, 3),
    "ECL": (321, 512, 3),
    "Traffic": (862, 512, 4),
}
# Shapes run only when --datasets names them: many variates at the Traffic width.
EXTRA_SHAPES = {"Wide20k": (20000, 512, 4)}
SHAPES = {**DATASETS, **EXTRA_SHAPES}
SEQ_LEN = PRED_LEN = 96
N_MAX, N_MAX_QUICK = 131072, 4096
SWEEP_AT = DATASETS["Traffic"]  # the fixed sizes of the d, b and l sweeps
# The train suite: N doubling from 8, the seq_len of the paper's Figure 6 (at Traffic), and
# the batch size of its sweeps: N at B = 1 like the scaling suite, L at B = 16, the official
# Traffic training batch. --quick (every point compiles casa-compile afresh, forward and
# backward): two N, two L, the dataset shapes of TRAIN_DATASETS_QUICK, all at B = 1.
TRAIN_N_MAX = 16384
TRAIN_N_QUICK = (8, 512)
TRAIN_DATASETS_QUICK = ("ETTh1",)
TRAIN_SEQ_LENS = (48, 96, 192, 336, 720)
TRAIN_SEQ_LENS_QUICK = (48, 720)
TRAIN_SWEEP_BATCH = {"n": 1, "l": 16}


@dataclass
class RunOptions:
    device: str
    # Each provider runs in each of these dtypes; with ``interleave`` all of them are timed
    # together at each point, so that ratios between dtypes share the machine's state too.
    dtypes: tuple[torch.dtype, ...]
    warmup: int
    reps: int
    time_cap_s: float
    mem_cap_bytes: int
    out_dir: Path
    quick: bool
    batches: list[int]
    datasets: tuple[str, ...] = tuple(DATASETS)
    # Time the providers of a point interleaved (measure.measure_latencies) rather than
    # one after another.
    interleave: bool = False
    # Only the points of these sweeps (``Point.sweep``: dataset, n, d, b, l, op-dataset,
    # step-dataset, op-n, step-n, step-l); None: every sweep of the suite.
    sweeps: tuple[str, ...] | None = None


def attention_points(opts: RunOptions) -> list[tuple[str, Point]]:
    return [
        (name, Point("attention", "dataset", b, *SHAPES[name][:2]))
        for b in opts.batches
        for name in opts.datasets
    ]


def model_points(opts: RunOptions) -> list[tuple[str, Point]]:
    return [
        (
            name,
            Point(
                "model",
                "dataset",
                b,
                *SHAPES[name][:2],
                seq_len=SEQ_LEN,
                pred_len=PRED_LEN,
                e_layers=SHAPES[name][2],
            ),
        )
        for b in opts.batches
        for name in opts.datasets
    ]


def scaling_points(opts: RunOptions) -> list[tuple[str, Point]]:
    n_top = N_MAX_QUICK if opts.quick else N_MAX
    n_fix, d_fix, e_fix = SWEEP_AT
    points = []
    for b in opts.batches:
        points += [(f"N={n}", Point("scaling", "n", b, n, 512)) for n in _doubling(8, n_top)]
        for d in (64, 128, 256, 512) if opts.quick else (64, 128, 256, 512, 1024, 2048):
            points.append((f"D={d}", Point("scaling", "d", b, n_fix, d)))
        for seq_len in (96, 336) if opts.quick else (96, 192, 336, 720, 1440):
            points.append(
                (
                    f"L={seq_len}",
                    Point(
                        "scaling",
                        "l",
                        b,
                        n_fix,
                        d_fix,
                        seq_len=seq_len,
                        pred_len=PRED_LEN,
                        e_layers=e_fix,
                    ),
                )
            )
    for b in (1, 4, 16) if opts.quick else (1, 2, 4, 8, 16, 32, 64):
        points.append((f"B={b}", Point("scaling", "b", b, n_fix, d_fix)))
    return points


def train_points(opts: RunOptions) -> list[tuple[str, Point]]:
    """The op's forward+backward (sweeps ``op-*``) and the forecaster's training step
    (``step-*``): at the dataset shapes at every batch size; as N grows (D = 512; the step
    at Traffic's L, H and e_layers) at ``TRAIN_SWEEP_BATCH["n"]``; as L grows at Traffic
    (``TRAIN_SEQ_LENS``) at ``TRAIN_SWEEP_BATCH["l"]``."""
    quick = opts.quick
    n_fix, d_fix, e_fix = SWEEP_AT

    def op(sweep: str, b: int, n: int, d: int) -> Point:
        return Point("train", f"op-{sweep}", b, n, d, training=True)

    def step(sweep: str, b: int, n: int, d: int, seq_len: int, e_layers: int) -> Point:
        return Point(
            "train",
            f"step-{sweep}",
            b,
            n,
            d,
            seq_len=seq_len,
            pred_len=PRED_LEN,
            e_layers=e_layers,
            training=True,
        )

    points = []
    for b in opts.batches:
        for name in opts.datasets:
            n, d, e_layers = SHAPES[name]
            points += [
                (name, op("dataset", b, n, d)),
                (name, step("dataset", b, n, d, SEQ_LEN, e_layers)),
            ]
    n_sweep = TRAIN_N_QUICK if quick else _doubling(8, TRAIN_N_MAX)
    b = 1 if quick else TRAIN_SWEEP_BATCH["n"]
    points += [(f"N={n}", op("n", b, n, d_fix)) for n in n_sweep]
    points += [(f"N={n}", step("n", b, n, d_fix, SEQ_LEN, e_fix)) for n in n_sweep]
    b = 1 if quick else TRAIN_SWEEP_BATCH["l"]
    points += [
        (f"L={seq_len}", step("l", b, n_fix, d_fix, seq_len, e_fix))
        for seq_len in (TRAIN_SEQ_LENS_QUICK if quick else TRAIN_SEQ_LENS)
    ]
    return points


def _doubling(first: int, last: int) -> list[int]:
    """``first, 2·first, …`` up to ``last``."""
    values = []
    while first <= last:
        values.append(first)
        first *= 2
    return values


SUITES = {
    "attention": attention_points,
    "scaling": scaling_points,
    "model": model_points,
    "train": train_points,
}


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text
        for s in ("out of memory", "not enough memory", "can't allocate", "failed to allocate")
    )


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# What one row measures: a provider in a dtype.
Unit = tuple[Provider, torch.dtype]


def _unit_name(unit: Unit) -> str:
    provider, dtype = unit
    return f"{provider.name} {_dtype_name(dtype)}"


def _timing(group: list[Unit]) -> str:
    """The ``timing`` column of a group timed together: ``sequential`` alone, else
    ``interleaved``, naming the dtypes when the group spans several (``interleaved
    (float32+bfloat16)``)."""
    if len(group) == 1:
        return "sequential"
    dtypes = list(dict.fromkeys(_dtype_name(dtype) for _, dtype in group))
    return "interleaved" if len(dtypes) == 1 else f"interleaved ({'+'.join(dtypes)})"


def _base_row(
    provider: Provider, dtype: torch.dtype, config: str, point: Point, opts: RunOptions
) -> dict:
    return {
        **environment_columns(opts.device),
        **{
            k: ("" if v is None else v)
            for k, v in asdict(point).items()
            if k not in ("pred_len", "training")
        },
        "provider": provider.name,
        "dtype": _dtype_name(dtype),
        "config": config,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _not_run_row(unit: Unit, row: dict, point: Point, opts: RunOptions) -> dict | None:
    """The row of a provider that is not run at this point in this dtype (unavailable
    here, or its memory estimate over the cap), else None."""
    provider, dtype = unit
    reason = provider.unavailable(opts.device, dtype)
    if reason is not None:
        return {**row, "status": "skipped", "note": reason}
    estimate = provider.estimate_bytes(point, dtype)
    if estimate > opts.mem_cap_bytes:
        return {
            **row,
            "status": "oom",
            "note": (
                f"not run: estimated {estimate / 2**30:.3g} GiB > --mem-cap {opts.mem_cap_bytes / 2**30:.3g} GiB"
            ),
        }
    return None


def _failed_row(row: dict, error: BaseException) -> dict:
    if isinstance(error, MeasurementTimeout):
        return {**row, "status": "timeout", "note": str(error)}
    status = "oom" if _is_oom(error) else "error"
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return {**row, "status": status, "note": f"{type(error).__name__}: {first_line}"}


def _ok_row(row: dict, latency: Latency, peak: int, method: str, point: Point) -> dict:
    seconds = latency.p50_ms / 1e3
    return {
        **row,
        "latency_ms_p20": f"{latency.p20_ms:.6g}",
        "latency_ms_p50": f"{latency.p50_ms:.6g}",
        "latency_ms_p80": f"{latency.p80_ms:.6g}",
        "latency_ms_p99": f"{latency.p99_ms:.6g}",
        "reps": latency.reps,
        "samples_per_s": f"{point.batch / seconds:.6g}",
        "tokens_per_s": f"{point.batch * point.n_vars / seconds:.6g}",
        "peak_mem_bytes": peak,
        "mem_method": method,
        "status": "ok",
        "note": "",
    }


def measure_points(units: list[Unit], config: str, point: Point, opts: RunOptions) -> list[dict]:
    """One CSV row per unit (a provider in a dtype) at the point: measured, or why it was not.

    The units given together are timed interleaved (:func:`measure.measure_latencies`),
    so the ratios between them come from the same machine state; their peak memory is
    measured one at a time afterwards. One unit's failure (error, oom, timeout) is
    recorded in its row; the others go on.
    """
    timing = _timing(units)
    names = [_unit_name(unit) for unit in units]
    rows = {
        name: {**_base_row(*unit, config, point, opts), "timing": timing}
        for name, unit in zip(names, units)
    }
    done: dict[str, dict] = {}
    fns = {}
    compiled = [n for n, (p, _) in zip(names, units) if p.name == "casa-compile"]
    try:
        for name, unit in zip(names, units):
            not_run = _not_run_row(unit, rows[name], point, opts)
            if not_run is not None:
                done[name] = not_run
                continue
            provider, dtype = unit
            try:
                # Built outside inference mode, as a deployed model is, so that weights
                # prepared once per weight version stay prepared (inference tensors have
                # no version).
                fns[name] = provider.build(point, opts.device, dtype)
            except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
                done[name] = _failed_row(rows[name], error)
        # Inference mode for the forward suites; the train suite needs autograd.
        with torch.inference_mode(not point.training):
            for name in (n for n in compiled if n in fns):
                try:
                    fns[name]()  # compilation is not part of the time cap
                except Exception as error:  # noqa: BLE001 - recorded, the others go on
                    done[name] = _failed_row(rows[name], error)
                    del fns[name]
            latencies = measure_latencies(
                fns, opts.device, warmup=opts.warmup, reps=opts.reps, time_cap_s=opts.time_cap_s
            )
            for name, latency in latencies.items():
                if isinstance(latency, Exception):
                    done[name] = _failed_row(rows[name], latency)
                    continue
                try:
                    peak, method = measure_peak_memory(fns[name], opts.device)
                    done[name] = _ok_row(rows[name], latency, peak, method, point)
                except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
                    done[name] = _failed_row(rows[name], error)
    finally:
        fns.clear()
        _free(opts.device)
    return [done[name] for name in names]


def _lane(unit: Unit, point: Point) -> tuple:
    """What stops growing together: a provider in a dtype along one sweep at one batch size."""
    provider, dtype = unit
    return (provider.name, dtype, point.sweep, point.batch if point.sweep != "b" else None)


class _NoProgressBar:
    """What run_suite asks of a tqdm bar, doing nothing."""

    def set_postfix_str(self, text: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@functools.cache
def _tqdm():
    """tqdm's bar class, or None (saying so once) when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("bench: tqdm is not installed: no progress bar", file=sys.stderr)
        return None
    return tqdm


def _progress_bar(total: int, desc: str, enabled: bool):
    bar = _tqdm() if enabled else None
    return bar(total=total, desc=desc, unit="pt") if bar else _NoProgressBar()


def run_suite(
    suite: str, providers: list[Provider], opts: RunOptions, progress: bool = True
) -> list[dict]:
    """Measures every provider in every dtype at every point of ``suite``; upserts
    ``<suite>.csv`` after each group of rows."""
    points = [
        (config, point)
        for config, point in SUITES[suite](opts)
        if opts.sweeps is None or point.sweep in opts.sweeps
    ]
    units = [(provider, dtype) for dtype in opts.dtypes for provider in providers]
    csv_path = opts.out_dir / f"{suite}.csv"
    stopped: dict[tuple, str] = {}  # (provider, dtype, sweep, batch) -> why it stopped growing
    rows = []
    bar = _progress_bar(len(points) * len(units), suite, progress)
    for config, point in points:
        point_rows: dict[str, dict] = {}
        to_run = []
        for unit in units:
            lane = _lane(unit, point)
            if lane in stopped and point.grows:
                status, where = stopped[lane]
                point_rows[_unit_name(unit)] = measure_point_stub(
                    unit, config, point, opts, status, where
                )
            else:
                to_run.append(unit)
        # Interleaved: every unit at once; else one after another.
        groups = [to_run] if opts.interleave and to_run else [[u] for u in to_run]
        for group in groups:
            bar.set_postfix_str(f"{'+'.join(map(_unit_name, group))} {config} B={point.batch}")
            for unit, row in zip(group, measure_points(group, config, point, opts)):
                point_rows[_unit_name(unit)] = row
                if row["status"] in ("oom", "timeout") and point.grows:
                    stopped[_lane(unit, point)] = (row["status"], config)
            upsert_rows(csv_path, [point_rows[_unit_name(u)] for u in group])
            bar.update(len(group))
        stubs = [point_rows[_unit_name(u)] for u in units if u not in to_run]
        if stubs:
            upsert_rows(csv_path, stubs)
            bar.update(len(stubs))
        rows += [point_rows[_unit_name(u)] for u in units]
    bar.close()
    return rows


def measure_point_stub(
    unit: Unit, config: str, point: Point, opts: RunOptions, status: str, where: str
) -> dict:
    """The row of a point not run because the provider stopped growing, in this dtype, at
    ``where``."""
    return {
        **_base_row(*unit, config, point, opts),
        "status": status,
        "note": f"not run: stopped growing after {status} at {where}",
    }
