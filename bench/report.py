"""``python -m bench report [FOLDER ...]``: the results page of a folder of benchmark CSVs.

Writes ``<folder>/README.md`` from the ``<suite>.csv`` files in it (the CSVs are the record;
the page is derived, never edited by hand). Without arguments: every folder under
``bench/results/`` that holds a suite CSV, nested folders included.

Per suite, the rows are grouped by where they were measured (device, dtype, instruction-set
tier ``isa``, threads, torch version); per group and sweep one table of p50 latency per
provider with each fused backend's speed-up over ``casa-reference`` and ``casa-compile``
(their p50 over its p50: above 1 is faster), and one table of peak extra memory. The
scaling suite's N sweep adds its fitted slopes and crossovers (:mod:`bench.summary`); the
train suite a table of p99 latency, its fused backends' memory as a fraction of the
baselines' and the memory CASA saves against full attention, and its N sweeps' slopes;
the distributed suite its per-rank columns. PNG plots in the folder are linked under their
suite (``scaling_*.png``, ``train_*.png``, ``distributed_*.png``). The output depends on
the CSVs alone, so ``tests/test_bench_report.py`` can hold every committed page to what
this module writes.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from .results import read_rows
from .summary import scaling_summary

SUITES = ("attention", "model", "scaling", "train", "distributed")
BASELINES = ("casa-reference", "casa-compile")
GEMM_PEAK, GEMM_PEAK_SIZE = "gemm-peak", 2048  # bench/providers.py
PAGE = "README.md"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"

SUITE_TITLES = {
    "attention": "Attention op (`python -m bench attention`)",
    "model": "Forecaster end to end (`python -m bench model`)",
    "scaling": "Scaling (`python -m bench scaling`)",
    "train": "Training (`python -m bench train`)",
    "distributed": "Variate parallelism (`torchrun … -m bench distributed`)",
}
SWEEP_TITLES = {
    "dataset": "dataset shapes",
    "n": "N sweep",
    "d": "D sweep",
    "b": "B sweep",
    "l": "L sweep, forecaster",
    "op-dataset": "op forward+backward, dataset shapes",
    "step-dataset": "forecaster training step, dataset shapes",
    "op-n": "op forward+backward, N sweep",
    "step-n": "forecaster training step, N sweep",
    "step-l": "forecaster training step, L sweep",
    "strong": "strong scaling (N fixed)",
    "weak": "weak scaling (N per rank fixed)",
}
# Sizes a table's caption names when they are the same in every row.
SIZE_COLUMNS = (
    ("batch", "B"),
    ("n_vars", "N"),
    ("d_model", "D"),
    ("kernel", "k"),
    ("seq_len", "L"),
    ("e_layers", "e_layers"),
)
MIB = 2**20


def _float(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: str | None) -> int:
    number = _float(value)
    return int(number) if number is not None else 0


def _figure(value: float, digits: int) -> str:
    """``digits`` significant digits, whole numbers from ``10**(digits-1)`` on (no exponent)."""
    return f"{value:.0f}" if abs(value) >= 10 ** (digits - 1) else f"{value:.{digits}g}"


def _ms(value: float) -> str:
    return _figure(value, 4)


def _mib(value: float) -> str:
    return _figure(value / MIB, 3)


def _ratio(value: float) -> str:
    return f"{value:.2f}×"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def provider_order(name: str) -> tuple[int, str]:
    """Column order: the two baselines, the fused CASA backends, full attention, then the
    machine's GEMM rate (``gemm-peak``)."""
    if name in BASELINES:
        return (BASELINES.index(name), name)
    if name == GEMM_PEAK:
        return (4, name)
    return (2 if name.startswith("casa-") else 3, name)


def op_flops(row: dict) -> float:
    """FLOPs of the op's forward at a row's sizes (docs/design.md §4): 2·B·(N·D²·(k/4 + 1)
    + 3·k·D³/16)."""
    b, n, d, k = (_int(row[c]) for c in ("batch", "n_vars", "d_model", "kernel"))
    return 2.0 * b * (n * d * d * (k / 4 + 1) + 3 * k * d**3 / 16)


def rate_lines(points: dict[tuple, dict[str, dict]], providers: list[str]) -> list[str]:
    """The op's FLOP rate per CASA provider and point, and its share of ``gemm-peak``'s rate
    at that point (a GEMM of 2048², timed with them); empty without ``gemm-peak`` rows."""
    if GEMM_PEAK not in providers:
        return []
    casa = [p for p in providers if p.startswith("casa-")]
    body = []
    for (_, point), by_provider in points.items():
        peak_ms = _p50(by_provider.get(GEMM_PEAK))
        peak = 2.0 * GEMM_PEAK_SIZE**3 / peak_ms / 1e6 if peak_ms else None
        cells = [point, _figure(peak, 3) if peak else ""]
        for provider in casa:
            row, mine = by_provider.get(provider), _p50(by_provider.get(provider))
            rate = op_flops(row) / mine / 1e6 if mine else None
            cells += [
                _figure(rate, 3) if rate else "",
                _percent(rate / peak) if rate and peak else "",
            ]
        body.append(cells)
    header = ["point", f"{GEMM_PEAK} GFLOP/s"]
    for provider in casa:
        header += [f"{provider} GFLOP/s", f"{provider} / {GEMM_PEAK}"]
    return [
        f"FLOP rate: the op's FLOPs (docs/design.md §4) over its p50, and its share of "
        f"`{GEMM_PEAK}` ({GEMM_PEAK_SIZE}² `torch.mm` in the same dtype, timed with it):",
        "",
        *_table(header, body),
        "",
    ]


def is_fused(name: str) -> bool:
    """A CASA provider that runs a fused backend (neither baseline nor full attention)."""
    return name.startswith("casa-") and name not in BASELINES


DTYPE_ORDER = ("float32", "bfloat16", "float16")


def _setting(row: dict) -> tuple[str, int, str, str, int, str]:
    """Where a row was measured: device, dtype (float32 first), ``isa``, threads, torch."""
    dtype = row["dtype"]
    rank = DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else len(DTYPE_ORDER)
    return (
        row["device_name"],
        rank,
        dtype,
        row.get("isa", ""),
        _int(row["threads"]),
        row["torch_version"],
    )


def _setting_title(setting: tuple[str, int, str, str, int, str]) -> str:
    _, _, dtype, isa, threads, torch_version = setting
    tier = f", `isa` {isa}" if isa else ""
    return f"{dtype}{tier}, threads={threads}, torch {torch_version}"


def _point_key(row: dict) -> tuple[int, ...]:
    return tuple(_int(row[c]) for c in ("n_vars", "d_model", "seq_len", "batch"))


LABEL_SIZES = (("n_vars", "N"), ("d_model", "D"), ("batch", "B"))


def _labeller(rows: list[dict]) -> Callable[[dict], str]:
    """A row's label in a table of ``rows``: its config, then the sizes that vary in the
    table and that the config does not name already."""
    varying = [
        (column, name)
        for column, name in LABEL_SIZES
        if len({r[column] for r in rows}) > 1
        and not any(r["config"].startswith(f"{name}=") for r in rows)
    ]

    def label(row: dict) -> str:
        sizes = ", ".join(f"{name}={row[column]}" for column, name in varying)
        return f"{row['config']} {sizes}" if sizes else row["config"]

    return label


def _caption(rows: list[dict]) -> str:
    fixed = []
    for column, name in SIZE_COLUMNS:
        values = {row.get(column, "") for row in rows}
        if len(values) == 1 and (value := values.pop()):
            fixed.append(f"{name}={value}")
    return ", ".join(fixed)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _by_point(rows: list[dict], label: Callable[[dict], str]) -> dict[tuple, dict[str, dict]]:
    points: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in sorted(rows, key=_point_key):
        points[(_point_key(row), label(row))][row["provider"]] = row
    return points


def _cell(row: dict | None, column: str, fmt: Callable[[float], str]) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    value = _float(row.get(column))
    return fmt(value) if value is not None else ""


def _p50(row: dict | None) -> float | None:
    return _float(row["latency_ms_p50"]) if row is not None and row["status"] == "ok" else None


def _memory(row: dict | None) -> float | None:
    return _float(row["peak_mem_bytes"]) if row is not None and row["status"] == "ok" else None


def provider_tables(rows: list[dict], training: bool = False, rates: bool = False) -> list[str]:
    """p50 latency (ms) and peak extra memory (MiB) per point and provider, with the fused
    backends' speed-ups over the two baselines, and which providers did not run and why.

    ``training`` (the train suite) adds a table of p99 latency, and to the memory table each
    fused backend's peak memory as a fraction of the baselines' (below 1 is less) and the
    memory the CASA reference and the fused backends save against each full-attention
    provider (1 - theirs / full's). ``rates`` (the op's forward points) adds the op's FLOP
    rate against ``gemm-peak``'s (:func:`rate_lines`)."""
    providers = sorted(
        {r["provider"] for r in rows if r["status"] != "skipped"}, key=provider_order
    )
    fused = [p for p in providers if is_fused(p)]
    baselines = [b for b in BASELINES if b in providers]
    label = _labeller(rows)
    points = _by_point(rows, label)
    header = ["point", *providers] + [
        f"{p} vs {b.removeprefix('casa-')}" for p in fused for b in baselines
    ]
    body = []
    for (_, point), by_provider in points.items():
        cells = [point] + [_cell(by_provider.get(p), "latency_ms_p50", _ms) for p in providers]
        for p in fused:
            for b in baselines:
                mine, theirs = _p50(by_provider.get(p)), _p50(by_provider.get(b))
                cells.append(_ratio(theirs / mine) if mine and theirs else "")
        body.append(cells)
    lines = ["p50 latency, ms:", "", *_table(header, body), ""]
    if rates:
        lines += rate_lines(points, providers)
    if training:
        p99 = [
            [point] + [_cell(by_provider.get(p), "latency_ms_p99", _ms) for p in providers]
            for (_, point), by_provider in points.items()
        ]
        lines += ["p99 latency, ms:", "", *_table(["point", *providers], p99), ""]
    pairs = _memory_pairs(providers, fused, baselines) if training else []
    memory = []
    for (_, point), by_provider in points.items():
        cells = [point] + [_cell(by_provider.get(p), "peak_mem_bytes", _mib) for p in providers]
        for mine, theirs, fmt in pairs:
            mem, base = _memory(by_provider.get(mine)), _memory(by_provider.get(theirs))
            cells.append(fmt(mem, base) if mem is not None and base else "")
        memory.append(cells)
    memory_header = ["point", *providers] + [
        f"{mine} {'/' if fmt is _fraction else 'saves vs'} {theirs.removeprefix('casa-')}"
        for mine, theirs, fmt in pairs
    ]
    lines += ["Peak extra memory, MiB:", "", *_table(memory_header, memory), ""]
    lines += _timing_lines(rows, providers)
    skipped = sorted(
        {(r["provider"], r["note"]) for r in rows if r["status"] == "skipped"},
        key=lambda item: (provider_order(item[0]), item[1]),
    )
    lines += [f"Not run: `{name}` ({note})." for name, note in skipped]
    first_failure: dict[str, dict] = {}
    for row in sorted(rows, key=_point_key):
        if row["status"] in ("oom", "timeout", "error"):
            first_failure.setdefault(row["provider"], row)
    lines += [
        f"`{name}`: {row['status']} from {label(row)} ({row['note']})."
        for name, row in sorted(first_failure.items(), key=lambda item: provider_order(item[0]))
    ]
    failed = first_failure
    if skipped or failed:
        lines.append("")
    return lines


def _fraction(mine: float, theirs: float) -> str:
    return _ratio(mine / theirs)


def _saved(mine: float, theirs: float) -> str:
    return _percent(1 - mine / theirs)


def _memory_pairs(
    providers: list[str], fused: list[str], baselines: list[str]
) -> list[tuple[str, str, Callable[[float, float], str]]]:
    """The memory table's comparison columns: (provider, against, how), the fused backends
    against the baselines, then the reference and the fused backends against full attention."""
    full = [p for p in providers if p.startswith("full-")]
    casa = [p for p in ("casa-reference", *fused) if p in providers]
    return [(p, b, _fraction) for p in fused for b in baselines] + [
        (p, f, _saved) for p in casa for f in full
    ]


def _timing_lines(rows: list[dict], providers: list[str]) -> list[str]:
    by_timing: dict[str, list[str]] = defaultdict(list)
    for provider in providers:
        timings = sorted(
            {r.get("timing") or "sequential" for r in rows if r["provider"] == provider}
        )
        by_timing[" and ".join(timings)].append(f"`{provider}`")
    if len(by_timing) < 2:
        return []
    parts = [f"{timing}: {', '.join(names)}" for timing, names in sorted(by_timing.items())]
    return [
        "Timing: " + "; ".join(parts) + " (ratios between providers timed interleaved "
        "come from the same machine state).",
        "",
    ]


def dtype_tables(rows: list[dict]) -> list[str]:
    """Each provider's p50 in the dtypes it was timed together in (``timing``
    ``interleaved (float32+bfloat16)``: ``--dtype`` a list with ``--interleave``), and the
    ratio of every later dtype's p50 to the first's (below 1 is faster), per tier."""
    prefix, suffix = "interleaved (", ")"
    together: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        timing = row.get("timing") or ""
        if timing.startswith(prefix) and timing.endswith(suffix) and row["status"] == "ok":
            key = (
                row["device_name"],
                row.get("isa", ""),
                _int(row["threads"]),
                row["torch_version"],
                timing.removeprefix(prefix).removesuffix(suffix),
                row["sweep"],
                _point_key(row),
                row["config"],
                provider_order(row["provider"]),
            )
            together[key][row["dtype"]] = row
    tables: dict[tuple, list[list[str]]] = defaultdict(list)
    for key, by_dtype in sorted(together.items()):
        _, isa, threads, torch_version, dtypes, _, _, config, (_, provider) = key
        first, *others = dtypes.split("+")
        for other in others:
            mine, theirs = _p50(by_dtype.get(other)), _p50(by_dtype.get(first))
            if mine is None or theirs is None:
                continue
            point = f"{config} B={by_dtype[first]['batch']}"
            cells = [
                provider,
                point,
                isa,
                str(threads),
                _ms(theirs),
                _ms(mine),
                _ratio(mine / theirs),
            ]
            tables[(first, other, torch_version)].append(cells)
    lines = []
    for (first, other, torch_version), body in tables.items():
        header = [
            "provider",
            "point",
            "`isa`",
            "threads",
            f"{first}, ms",
            f"{other}, ms",
            f"{other} / {first}",
        ]
        lines += [
            f"#### {other} against {first}, timed together (torch {torch_version})",
            "",
            "p50 latency of each provider in both dtypes, timed interleaved in one run; "
            "below 1, the second dtype is faster:",
            "",
            *_table(header, body),
            "",
        ]
    return lines


def _provenance(rows: list[dict]) -> list[str]:
    commits = sorted({r["git_commit"] for r in rows if r.get("git_commit")})
    methods = sorted({r["mem_method"] for r in rows if r.get("mem_method")})
    lines = []
    if commits:
        lines.append("Commits measured: " + ", ".join(f"`{c}`" for c in commits) + ".")
    if methods:
        lines.append("Memory: " + "; ".join(methods) + ".")
    return [*lines, ""] if lines else []


def scaling_fit_lines(rows: list[dict], suite: str = "scaling", sweep: str = "n") -> list[str]:
    """An N sweep's fitted log–log slopes, largest N and crossovers (bench.summary)."""
    lines = []
    for group in scaling_summary(rows, suite, sweep):
        body = []
        for name in sorted(group["providers"], key=provider_order):
            fit = group["providers"][name]
            stopped = fit["stopped"]
            body.append(
                [
                    name,
                    _slope(fit["latency_slope"]),
                    _slope(fit["memory_slope"]),
                    str(fit["largest_n"] or ""),
                    f"{stopped['status']} at N={stopped['n_vars']}" if stopped else "",
                ]
            )
        lines += [
            f"Fitted log–log slopes over N ≥ 256 (1 linear, 2 quadratic), B={group['batch']}, "
            f"D={group['d_model']}:",
            "",
            *_table(["provider", "latency slope", "memory slope", "largest N", "stopped"], body),
            "",
        ]
        overtakes = [
            f"{pair.replace(' vs ', ' faster than ')} from N={n}"
            for pair, n in sorted(group["overtakes"].items())
            if n is not None
        ]
        if overtakes:
            lines += [
                "Crossovers (faster at that N and every larger one): " + "; ".join(overtakes) + ".",
                "",
            ]
    return lines


def _slope(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else ""


DISTRIBUTED_COLUMNS = (
    ("p50 wall, ms", "latency_ms_p50", _ms),
    ("p50 CPU per rank, ms", "cpu_ms_p50", _ms),
    ("peak memory per rank, MiB", "peak_mem_bytes", _mib),
    ("parameters per rank, MiB", "param_bytes_per_rank", _mib),
    ("all-reduced per layer, KiB", "allreduce_bytes_per_layer", lambda v: f"{v / 2**10:.1f}"),
    ("K/V all-gather per layer, MiB", "kv_allgather_bytes_per_layer", _mib),
)


def distributed_table(rows: list[dict]) -> list[str]:
    """One row per provider and point: wall and CPU time, per-rank memory and bytes moved."""
    body = [
        [f"`{r['provider']}`", r["config"]]
        + [_cell(r, column, fmt) for _, column, fmt in DISTRIBUTED_COLUMNS]
        for r in sorted(rows, key=lambda r: (provider_order(r["provider"]), _point_key(r)))
    ]
    return [
        *_table(["provider", "point", *(title for title, _, _ in DISTRIBUTED_COLUMNS)], body),
        "",
    ]


def suite_section(suite: str, rows: list[dict], plots: list[str]) -> list[str]:
    """The page's section for one suite's rows."""
    lines = [f"## {SUITE_TITLES[suite]}", ""]
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        key = _setting(row)
        if suite == "distributed":  # the ranks' rows of one run carry their backend's tier
            key = (*key[:3], "", *key[4:])
        by_setting[key].append(row)
    for setting, setting_rows in sorted(by_setting.items()):
        lines += [f"### {_setting_title(setting)}", ""]
        by_sweep: dict[str, list[dict]] = defaultdict(list)
        for row in setting_rows:
            by_sweep[row["sweep"]].append(row)
        for sweep, sweep_rows in sorted(
            by_sweep.items(),
            key=lambda item: (
                list(SWEEP_TITLES).index(item[0]) if item[0] in SWEEP_TITLES else len(SWEEP_TITLES)
            ),
        ):
            caption = _caption(sweep_rows)
            lines += [
                f"#### {SWEEP_TITLES.get(sweep, sweep)}" + (f" ({caption})" if caption else ""),
                "",
            ]
            if suite == "distributed":
                lines += distributed_table(sweep_rows)
            else:
                op_forward = suite in ("attention", "scaling") and sweep != "l"
                lines += provider_tables(sweep_rows, training=suite == "train", rates=op_forward)
            if sweep in ("n", "op-n", "step-n"):
                lines += scaling_fit_lines(sweep_rows, suite, sweep)
        lines += _provenance(setting_rows)
    lines += dtype_tables(rows)
    lines += [f"![{name}]({name})" for name in plots]
    return [*lines, ""] if plots else lines


def result_folders(root: Path = RESULTS_ROOT) -> list[Path]:
    """Every folder under ``root`` (``root`` included) that holds a suite CSV, sorted."""
    folders = {path.parent for suite in SUITES for path in root.rglob(f"{suite}.csv")}
    return sorted(folders)


def render(folder: Path) -> str:
    """The results page of ``folder``: a function of its CSVs, PNG names and sub-folders."""
    rows_by_suite = {suite: read_rows(folder / f"{suite}.csv") for suite in SUITES}
    devices = sorted({r["device_name"] for rows in rows_by_suite.values() for r in rows})
    pngs = sorted(path.name for path in folder.glob("*.png"))
    lines = [
        f"# Benchmark results: {', '.join(devices) or folder.name}",
        "",
        "Generated by `python -m bench report` from the CSVs in this folder; do not edit by hand "
        "(`tests/test_bench_report.py` fails when this page and the CSVs disagree). "
        "Every row of the tables is a row of a CSV; the method is in docs/design.md §8.",
        "",
    ]
    placed = set()
    for suite, rows in rows_by_suite.items():
        if not rows:
            continue
        plots = [name for name in pngs if name.startswith(f"{suite}_")]
        placed.update(plots)
        lines += suite_section(suite, rows, plots)
    others = [name for name in pngs if name not in placed]
    lines += _link_section("Other plots", [f"![{name}]({name})" for name in others])
    nested = [sub.relative_to(folder).as_posix() for sub in result_folders(folder) if sub != folder]
    lines += _link_section("Sub-folders", [f"- [{name}/]({name}/{PAGE})" for name in nested])
    return "\n".join(lines).rstrip("\n") + "\n"


def _link_section(title: str, links: list[str]) -> list[str]:
    return [f"## {title}", "", *links, ""] if links else []


def write_page(folder: Path) -> Path:
    """Writes ``folder/README.md`` (see :func:`render`) and returns its path."""
    path = folder / PAGE
    path.write_text(render(folder))
    return path


def write_pages(folders: Iterable[Path]) -> list[Path]:
    return [write_page(folder) for folder in folders]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench report",
        description="Writes <folder>/README.md, the results page, from the folder's suite CSVs.",
    )
    parser.add_argument(
        "folders",
        nargs="*",
        type=Path,
        help="result folders (default: every folder under bench/results/ holding a suite CSV)",
    )
    args = parser.parse_args(argv)
    folders = args.folders or result_folders()
    missing = [f for f in folders if not any((f / f"{s}.csv").is_file() for s in SUITES)]
    if missing:
        print(
            f"report: {', '.join(map(str, missing))} holds no suite CSV "
            f"(expected one of {', '.join(s + '.csv' for s in SUITES)})",
            file=sys.stderr,
        )
        return 2
    for path in write_pages(folders):
        print(f"report: {path}")
    return 0
