"""Log–log figures of the scaling suite's N sweep and of the train suite's memory
(matplotlib, Agg backend; without matplotlib no figures, and one printed note).

For every (dtype, batch, D) group of the CSV measured on one device: p50 latency
(with a p20–p80 band) and peak extra memory against N, one line per provider, the fitted
slope (N >= 256) in the legend, and the N where a provider stopped (oom/timeout) marked
with an ×. Files: ``scaling_latency.png`` / ``scaling_memory.png`` for the group of the current run,
``scaling_{latency,memory}_<dtype>_b<B>_d<D>_t<threads>.png`` for any other group in the CSV.

The train suite: peak extra memory of training against N (the op's forward+backward,
sweep ``op-n``; the forecaster's training step, ``step-n``) and against L (``step-l``),
for the CASA reference, the fused CASA backends and full attention (``casa-compile`` left
out): ``train_memory_<sweep>.png`` for the group of the current run,
``train_memory_<sweep>_<dtype>_b<B>_d<D>_t<threads>.png`` for any other.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from .results import read_rows
from .summary import SLOPE_MIN_N, fit_slope, sweep_groups

METRICS = {
    "latency": ("latency_ms_p50", "p50 latency (ms)"),
    "memory": ("peak_mem_bytes", "peak extra memory (bytes)"),
}
# The x axis of a sweep: column, label, smallest value of the fitted slope (None: no fit).
N_AXIS = ("n_vars", "N (variates)", SLOPE_MIN_N)
L_AXIS = ("seq_len", "L (lookback, seq_len)", None)
# The train suite's memory plots: sweep -> (x axis, what one call is).
TRAIN_PLOTS = {
    "op-n": (N_AXIS, "op forward+backward"),
    "step-n": (N_AXIS, "forecaster training step"),
    "step-l": (L_AXIS, "forecaster training step"),
}
TRAIN_PLOT_LEFT_OUT = ("casa-compile",)


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (saying so once) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("bench: matplotlib is not installed: no plots", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_group(
    plt,
    path: Path,
    title: str,
    by_provider: dict[str, list[dict]],
    metric: str,
    axis: tuple[str, str, int | None] = N_AXIS,
) -> None:
    column, label = METRICS[metric]
    size, size_label, slope_min = axis
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rows in sorted(by_provider.items()):
        ok = [r for r in rows if r["status"] == "ok" and float(r[column] or 0) > 0]
        if not ok:
            continue
        ns = [int(r[size]) for r in ok]
        ys = [float(r[column]) for r in ok]
        fit = [(n, y) for n, y in zip(ns, ys) if slope_min is not None and n >= slope_min]
        slope = fit_slope([n for n, _ in fit], [y for _, y in fit])
        legend = f"{name} (slope {slope:.2f})" if slope is not None else name
        (line,) = ax.plot(ns, ys, marker="o", ms=3, label=legend)
        if metric == "latency":
            lo = [float(r["latency_ms_p20"]) for r in ok]
            hi = [float(r["latency_ms_p80"]) for r in ok]
            ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        stop = next((r for r in rows if r["status"] in ("oom", "timeout")), None)
        if stop is not None:
            ax.plot([ns[-1]], [ys[-1]], marker="x", ms=10, color=line.get_color())
            ax.annotate(
                f"{stop['status']} at {size_label.split()[0]}={stop[size]}",
                (ns[-1], ys[-1]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -10),
                color=line.get_color(),
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(size_label)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(out_dir: Path, dtype: str | None = None, batch: int | None = None) -> list[Path]:
    """Writes the figures: ``scaling_<metric>.png`` for the newest group matching ``dtype`` and
    ``batch``, ``scaling_<metric>_<dtype>_b<B>_d<D>_t<threads>.png`` for every other group; none
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    groups = sweep_groups(read_rows(out_dir / "scaling.csv"))
    newest = _newest(groups, dtype, batch)
    written = []
    for key, by_provider in sorted(groups.items()):
        dev, dt, b, d, threads, torch_version = key
        mem_method = _mem_method(by_provider)
        for metric in METRICS:
            title = (
                f"CASA vs full attention, forward: {dev}\n"
                f"{dt}, B={b}, D={d}, {threads} threads, torch {torch_version}"
            )
            if metric == "memory" and mem_method:
                title += f"\nmemory: {mem_method}"
            name = (
                f"scaling_{metric}.png"
                if key == newest
                else f"scaling_{metric}_{dt}_b{b}_d{d}_t{threads}.png"
            )
            _plot_group(plt, out_dir / name, title, by_provider, metric)
            written.append(out_dir / name)
    return written


def _mem_method(by_provider: dict[str, list[dict]]) -> str:
    """How the group's memory was measured (the first row that says)."""
    return next((r["mem_method"] for rs in by_provider.values() for r in rs if r["mem_method"]), "")


def _newest(groups: dict[tuple, dict[str, list[dict]]], dtype: str | None, batch: int | None):
    """The key of the group measured last among those of ``dtype`` (and ``batch`` unless None)."""
    return max(
        (key for key in groups if key[1] == dtype and batch in (None, key[2])),
        key=lambda key: max(r["timestamp"] for rs in groups[key].values() for r in rs),
        default=None,
    )


def plot_training(out_dir: Path, dtype: str | None = None) -> list[Path]:
    """Writes the train suite's memory figures (module docstring): ``train_memory_<sweep>.png``
    for the newest group of ``dtype`` in each sweep, a suffixed name for every other group
    with a point measured; none without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = [r for r in read_rows(out_dir / "train.csv") if r["provider"] not in TRAIN_PLOT_LEFT_OUT]
    written = []
    for sweep, (axis, what) in TRAIN_PLOTS.items():
        groups = sweep_groups(rows, "train", sweep, axis[0])
        newest = _newest(groups, dtype, None)
        for key, by_provider in sorted(groups.items()):
            if not any(r["status"] == "ok" for rs in by_provider.values() for r in rs):
                continue  # nothing measured: no empty figure
            dev, dt, b, d, threads, torch_version = key
            mem_method = _mem_method(by_provider)
            sizes = by_provider[next(iter(by_provider))][0]
            fixed = f"N={sizes['n_vars']}, " if axis is L_AXIS else ""
            title = (
                f"Training memory, {what}: CASA vs full attention: {dev}\n"
                f"{dt}, B={b}, {fixed}D={d}, {threads} threads, torch {torch_version}"
                + (f"\nmemory: {mem_method}" if mem_method else "")
            )
            name = (
                f"train_memory_{sweep}.png"
                if key == newest
                else f"train_memory_{sweep}_{dt}_b{b}_d{d}_t{threads}.png"
            )
            _plot_group(plt, out_dir / name, title, by_provider, "memory", axis)
            written.append(out_dir / name)
    return written
