"""``summary.json``: what the CSVs say, per suite and provider.

For the ``scaling`` suite's N sweep, grouped by (device name, dtype, batch, D):

* ``latency_slope`` / ``memory_slope`` — least-squares slope of log(p50 latency) and
  log(peak memory) against log(N) over the ``ok`` points with N >= 256 (1 = linear,
  2 = quadratic); ``null`` with fewer than two such points;
* ``largest_n`` — the largest N measured ``ok``; ``stopped`` — status and N where it stopped;
* ``overtakes`` — for each CASA provider and full-attention provider, the smallest N from
  which CASA is faster (p50) at that N and at every larger N CASA measured (a full
  provider that hit oom/timeout counts as slower); ``null`` if never.

For ``attention`` and ``model``: p50 latency and peak memory per dataset and batch, and
each CASA provider's speed-up over each full-attention provider. For ``train``: the same
for its dataset sweeps (``op-dataset``, ``step-dataset``) and the N sweep's figures for
``op-n`` and ``step-n``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .providers import PROVIDERS
from .results import read_rows

SLOPE_MIN_N = 256
# The train suite's sweeps summarised like the dataset shapes and like the N sweep.
TRAIN_SHAPE_SWEEPS = ("op-dataset", "step-dataset")
TRAIN_N_SWEEPS = ("op-n", "step-n")


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than two positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _family(provider: str) -> str:
    return PROVIDERS[provider].family if provider in PROVIDERS else provider.split("-")[0]


def _f(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def sweep_groups(
    rows: list[dict], suite: str = "scaling", sweep: str = "n", size: str = "n_vars"
) -> dict[tuple, dict[str, list[dict]]]:
    """The rows of one sweep of one suite by (device_name, dtype, batch, d_model, threads,
    torch_version), then provider, ascending in the swept ``size`` column."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("suite") == suite and r.get("sweep") == sweep:
            key = (
                r["device_name"],
                r["dtype"],
                int(r["batch"]),
                int(r["d_model"]),
                int(r["threads"] or 0),
                r["torch_version"],
            )
            groups[key][r["provider"]].append(r)
    for by_provider in groups.values():
        for rs in by_provider.values():
            rs.sort(key=lambda r: int(r[size]))
    return groups


def scaling_summary(rows: list[dict], suite: str = "scaling", sweep: str = "n") -> list[dict]:
    """Slopes, largest N and crossovers of an N sweep (by default the scaling suite's)."""
    out = []
    for (dev, dtype, batch, d, threads, torch_version), by_provider in sorted(
        sweep_groups(rows, suite, sweep).items()
    ):
        providers = {}
        for name, rs in by_provider.items():
            ok = [r for r in rs if r["status"] == "ok"]
            fit = [r for r in ok if int(r["n_vars"]) >= SLOPE_MIN_N]
            bad = [r for r in rs if r["status"] in ("oom", "timeout")]
            providers[name] = {
                "status": "ok" if ok else (rs[0]["status"] if rs else "absent"),
                "latency_slope": fit_slope(
                    [int(r["n_vars"]) for r in fit], [_f(r["latency_ms_p50"]) for r in fit]
                ),
                "memory_slope": fit_slope(
                    [int(r["n_vars"]) for r in fit], [_f(r["peak_mem_bytes"]) for r in fit]
                ),
                "largest_n": max((int(r["n_vars"]) for r in ok), default=None),
                "stopped": (
                    {
                        "status": bad[0]["status"],
                        "n_vars": int(bad[0]["n_vars"]),
                        "note": bad[0]["note"],
                    }
                    if bad
                    else None
                ),
                "note": rs[0]["note"] if not ok and rs else "",
            }
        overtakes = {}
        for casa, crs in by_provider.items():
            if _family(casa) != "casa":
                continue
            for full, frs in by_provider.items():
                if _family(full) != "full":
                    continue
                overtakes[f"{casa} vs {full}"] = _overtake_n(crs, frs)
        out.append(
            {
                "device_name": dev,
                "dtype": dtype,
                "batch": batch,
                "d_model": d,
                "threads": threads,
                "torch_version": torch_version,
                "providers": providers,
                "overtakes": overtakes,
            }
        )
    return out


def _overtake_n(casa_rows: list[dict], full_rows: list[dict]) -> int | None:
    full = {int(r["n_vars"]): r for r in full_rows}
    wins = []
    for r in casa_rows:
        if r["status"] != "ok":
            continue
        n, f = int(r["n_vars"]), full.get(int(r["n_vars"]))
        if f is None or f["status"] in ("skipped", "error"):
            continue
        faster = f["status"] in ("oom", "timeout") or _f(r["latency_ms_p50"]) < _f(
            f["latency_ms_p50"]
        )
        wins.append((n, faster))
    crossover = None
    for n, faster in reversed(wins):
        if not faster:
            break
        crossover = n
    return crossover


def dataset_summary(rows: list[dict], suite: str, sweep: str = "dataset") -> list[dict]:
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("suite") != suite or r.get("sweep") != sweep:
            continue
        key = (r["device_name"], r["dtype"], r["config"], int(r["batch"]), int(r["threads"] or 0))
        table[key][r["provider"]] = r
    out = []
    for (dev, dtype, config, batch, threads), by_provider in sorted(table.items()):
        p50 = {p: _f(r["latency_ms_p50"]) for p, r in by_provider.items() if r["status"] == "ok"}
        speedups = {
            f"{c} vs {f}": round(p50[f] / p50[c], 3)
            for c in p50
            if _family(c) == "casa"
            for f in p50
            if _family(f) == "full"
        }
        out.append(
            {
                "device_name": dev,
                "dtype": dtype,
                "config": config,
                "batch": batch,
                "threads": threads,
                "latency_ms_p50": p50,
                "peak_mem_bytes": {
                    p: int(r["peak_mem_bytes"])
                    for p, r in by_provider.items()
                    if r["status"] == "ok"
                },
                "not_ok": {
                    p: f"{r['status']}: {r['note']}"
                    for p, r in by_provider.items()
                    if r["status"] != "ok"
                },
                "speedup_p50": speedups,
            }
        )
    return out


def write_summary(out_dir: Path) -> Path:
    """Builds ``summary.json`` from every ``<suite>.csv`` in ``out_dir``."""
    summary = {}
    slope_fit = (
        "least squares of log p50 latency / log peak memory on log N, "
        f"ok points with N >= {SLOPE_MIN_N}"
    )
    for suite in ("attention", "scaling", "model", "train"):
        rows = read_rows(out_dir / f"{suite}.csv")
        if not rows:
            continue
        if suite == "scaling":
            summary[suite] = {"n_sweep": scaling_summary(rows), "slope_fit": slope_fit}
        elif suite == "train":
            summary[suite] = {
                **{sweep: dataset_summary(rows, suite, sweep) for sweep in TRAIN_SHAPE_SWEEPS},
                **{sweep: scaling_summary(rows, suite, sweep) for sweep in TRAIN_N_SWEEPS},
                "slope_fit": slope_fit,
            }
        else:
            summary[suite] = dataset_summary(rows, suite)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
