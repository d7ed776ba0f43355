"""Log–log figures of the scaling suite's N sweep (matplotlib, Agg backend; without
matplotlib no figures, and one printed note).

For every (dtype, batch, D) group of the CSV measured on one device: p50 latency
(with a p20–p80 band) and peak extra memory against N, one line per provider, the fitted
slope (N >= 256) in the legend, and the N where a provider stopped (oom/timeout) marked
with an ×. Files: ``scaling_latency.png`` / ``scaling_memory.png`` for the group of the current run,
``scaling_{latency,memory}_<dtype>_b<B>_d<D>_t<threads>.png`` for any other group in the CSV.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from .results import read_rows
from .summary import SLOPE_MIN_N, fit_slope, n_sweep_groups

METRICS = {
    "latency": ("latency_ms_p50", "p50 latency (ms)"),
    "memory": ("peak_mem_bytes", "peak extra memory (bytes)"),
}


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
    plt, path: Path, title: str, by_provider: dict[str, list[dict]], metric: str
) -> None:
    column, label = METRICS[metric]
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rows in sorted(by_provider.items()):
        ok = [r for r in rows if r["status"] == "ok" and float(r[column] or 0) > 0]
        if not ok:
            continue
        ns = [int(r["n_vars"]) for r in ok]
        ys = [float(r[column]) for r in ok]
        fit = [(n, y) for n, y in zip(ns, ys) if n >= SLOPE_MIN_N]
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
                f"{stop['status']} at N={stop['n_vars']}",
                (ns[-1], ys[-1]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -10),
                color=line.get_color(),
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (variates)")
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
    rows = read_rows(out_dir / "scaling.csv")
    groups = n_sweep_groups(rows)
    newest = max(
        (key for key in groups if key[1] == dtype and key[2] == batch),
        key=lambda key: max(r["timestamp"] for rs in groups[key].values() for r in rs),
        default=None,
    )
    written = []
    for key, by_provider in sorted(groups.items()):
        dev, dt, b, d, threads, torch_version = key
        mem_method = next(
            (r["mem_method"] for rs in by_provider.values() for r in rs if r["mem_method"]), ""
        )
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
