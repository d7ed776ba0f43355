"""``python -m bench SUITE [SUITE ...] [options]`` — benchmarks of CASA against full attention.

Suites: ``attention`` (op at the dataset shapes), ``scaling`` (op vs N, D, B; model vs L),
``model`` (end-to-end forecasters), ``train`` (the op's forward+backward and the forecaster's
training step at the dataset shapes, vs N and vs L: :mod:`bench.training`), ``distributed``
(variate-parallel CASA, alone under ``torchrun --nproc-per-node P``:
:mod:`bench.distributed`). Results are upserted into ``<out>/<suite>.csv``; ``summary.json``,
the scaling suite's and the train suite's plots and the results page ``README.md`` are
rebuilt from the CSVs after each run. ``python -m bench report [FOLDER ...]`` rebuilds the
results pages alone (:mod:`bench.report`); ``python -m bench estimate`` is the static GPU cost
model (:mod:`bench.cost_model.cli`, no GPU needed).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _total_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 2**30


def _shape_list(shapes: dict[str, tuple[int, int, int]]) -> str:
    """``name N=.. D=..`` for each (n_vars, d_model, e_layers) entry, comma-separated."""
    return ", ".join(f"{name} N={n} D={d}" for name, (n, d, _) in shapes.items())


def build_parser() -> argparse.ArgumentParser:
    from .providers import PROVIDERS
    from .suites import DATASETS, EXTRA_SHAPES, SUITES, TRAIN_DATASETS_QUICK

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmarks of CASA against full attention (forward in inference mode; the train\n"
            "suite: forward+backward and training steps).\n"
            "suites:\n"
            "  attention  the op [B,N,D]->[B,N,D] at the dataset shapes, B=16 and B=1:\n"
            "             " + _shape_list(DATASETS) + "\n"
            "  scaling    the op vs N (8 .. 131072, x2; --quick: .. 4096), vs D, vs B; the forecaster vs L\n"
            "             (L only enters the embedding Linear(L->D), so it is swept at the model level)\n"
            "  model      CASAModel vs ITransformerModel end to end at the dataset configurations\n"
            "  train      training: the op's forward+backward (x and all weights) and the forecaster's\n"
            "             step (forward, MSE loss, backward, AdamW), at the dataset shapes (B=16 and B=1),\n"
            "             vs N (8 .. 16384, x2; B=1) and vs L (48, 96, 192, 336, 720 at Traffic, B=16)\n"
            "             (--quick: N 8 and 512, L 48 and 720, ETTh1, all at B=1)\n"
            "  distributed  variate-parallel CASAModel, strong and weak scaling in N, bytes per layer\n"
            "             (alone, under torchrun --nproc-per-node P; rows in distributed.csv)\n"
            "  estimate   (alone) the static GPU cost model: per-kernel ESTIMATES for sm_90a without\n"
            "             a GPU (python -m bench estimate --help)\n"
            "output (--out): <suite>.csv upserted (key: suite, sweep, provider, device, dtype, sizes,\n"
            "versions, threads), summary.json (slopes, crossovers, largest N), scaling_*.png,\n"
            "train_memory_*.png (training memory vs N and L),\n"
            "README.md (the results page; python -m bench report [FOLDER ...] rebuilds it alone)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "providers: " + ", ".join(PROVIDERS) + "\n"
            "Providers whose backend is unavailable are recorded as 'skipped' with the reason.\n"
            "Status per row: ok, oom (caught or estimated above --mem-cap), timeout (one call over\n"
            "--time-cap), skipped (unavailable here), error (any other exception; see note)."
        ),
    )
    parser.add_argument(
        "suites",
        nargs="+",
        choices=sorted([*SUITES, "distributed"]),
        metavar="SUITE",
        help=f"one or more of {', '.join(SUITES)}; or distributed alone",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to measure (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help=f"one of {', '.join(DTYPES)}, or a comma list: each provider runs in each dtype "
        "(with --interleave, timed together, for ratios between dtypes from one run; the "
        "distributed suite takes one); default float32",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma list of providers (default: all; unavailable ones are recorded as skipped)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result folder (default: bench/results/<device-name>/)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer points (N up to 4096, shorter D/L/B sweeps), fewer reps, shorter time cap",
    )
    parser.add_argument(
        "--batch",
        default=None,
        help="comma list of batch sizes (default: 16,1 for attention/model/train, 1 with train "
        "--quick; 1 for scaling; the scaling suite's B sweep and the train suite's N and L "
        "sweeps ignore it)",
    )
    parser.add_argument(
        "--datasets",
        default=None,
        help="comma list of dataset shapes for attention/model/train (default: all of "
        + ", ".join(DATASETS)
        + "; also "
        + ", ".join(EXTRA_SHAPES)
        + "; train --quick: "
        + ", ".join(TRAIN_DATASETS_QUICK)
        + ")",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="timed calls per point (default 20; --quick 5)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls first (default 3; --quick 1)"
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=None,
        help="seconds one call may take, else 'timeout' and the provider stops growing "
        "(default 20; --quick 3)",
    )
    parser.add_argument(
        "--mem-cap",
        type=float,
        default=None,
        help="GiB; points whose estimated memory exceeds it are recorded 'oom' without running "
        "(default: 40%% of RAM on cpu, 90%% of GPU memory on cuda)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the providers of each point interleaved, in rounds calling each once, so "
        "their ratios come from the same machine state (shared, noisy machines); rows say "
        "timing=interleaved",
    )
    parser.add_argument(
        "--sweeps",
        default=None,
        help="comma list: only the points of these sweeps (the sweep column: dataset, n, d, "
        "b, l; train: op-dataset, step-dataset, op-n, step-n, step-l; default: all)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    _inductor_cache_per_tier()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from . import report

        return report.main(argv[1:])
    if argv[:1] == ["estimate"]:  # the static GPU cost model: its own options
        from .cost_model import cli

        return cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    dtype_names = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtype_names if d not in DTYPES]
    if bad or not dtype_names or len(set(dtype_names)) < len(dtype_names):
        print(
            f"--dtype: expected distinct names among {list(DTYPES)}, got {args.dtype!r}",
            file=sys.stderr,
        )
        return 2
    if "distributed" in args.suites:
        if len(dtype_names) > 1:
            print(
                f"--dtype: the distributed suite takes one dtype, got {args.dtype!r}",
                file=sys.stderr,
            )
            return 2
        from . import distributed

        return distributed.main(args)
    from . import plots, providers, report, results, suites, summary

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    out_dir = args.out or results.default_out_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = providers.select(args.providers)
    datasets = tuple(
        d.strip() for d in (args.datasets or ",".join(suites.DATASETS)).split(",") if d.strip()
    )
    unknown = [d for d in datasets if d not in suites.SHAPES]
    if unknown:
        print(
            f"--datasets: unknown {unknown}; expected some of {list(suites.SHAPES)}",
            file=sys.stderr,
        )
        return 2
    sweeps = (
        None
        if args.sweeps is None
        else tuple(s.strip() for s in args.sweeps.split(",") if s.strip())
    )
    mem_cap = (
        args.mem_cap * 2**30
        if args.mem_cap
        else (0.9 if device != "cpu" else 0.4) * _total_memory_bytes(device)
    )

    for suite in args.suites:
        batch = args.batch or _default_batches(suite, args.quick)
        opts = suites.RunOptions(
            device=device,
            dtypes=tuple(DTYPES[d] for d in dtype_names),
            warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
            reps=args.reps if args.reps is not None else (5 if args.quick else 20),
            time_cap_s=args.time_cap
            if args.time_cap is not None
            else (3.0 if args.quick else 20.0),
            mem_cap_bytes=int(mem_cap),
            out_dir=out_dir,
            quick=args.quick,
            batches=[int(b) for b in batch.split(",") if b.strip()],
            datasets=datasets
            if args.datasets or not (suite == "train" and args.quick)
            else suites.TRAIN_DATASETS_QUICK,
            interleave=args.interleave,
            sweeps=sweeps,
        )
        if sweeps is not None and not any(
            point.sweep in sweeps for _, point in suites.SUITES[suite](opts)
        ):
            print(f"--sweeps: {suite} has none of {list(sweeps)}", file=sys.stderr)
            return 2
        started = time.perf_counter()
        rows = suites.run_suite(suite, chosen, opts, progress=not args.no_progress)
        elapsed = time.perf_counter() - started
        _print_rows(rows)
        print(f"{suite}: {len(rows)} rows in {elapsed:.1f} s -> {out_dir / (suite + '.csv')}")
        # The unsuffixed figures show the first dtype; every other group has its own.
        if suite == "scaling":
            for path in plots.plot_scaling(out_dir, dtype=dtype_names[0], batch=opts.batches[0]):
                print(f"plot: {path}")
        if suite == "train":
            for path in plots.plot_training(out_dir, dtype=dtype_names[0]):
                print(f"plot: {path}")
    print(f"summary: {summary.write_summary(out_dir)}")
    print(f"results page: {report.write_page(out_dir)}")
    return 0


def _inductor_cache_per_tier() -> None:
    """torch.compile's CPU kernels cached apart per ATen vector tier, unless
    TORCHINDUCTOR_CACHE_DIR is set: with one cache shared by runs under
    ATEN_CPU_CAPABILITY=avx2 and uncapped runs, an uncapped casa-compile crashed (heap
    corruption) inside a cached kernel. Called first: importing triton fixes the cache
    directory."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        tier = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{tier}"
        )


def _default_batches(suite: str, quick: bool) -> str:
    if suite == "scaling" or (suite == "train" and quick):
        return "1"
    return "16,1"


def _print_rows(rows: list[dict]) -> None:
    header = f"{'provider':<15} {'sweep':<12} {'config':<9} {'B':>3} {'N':>6} {'D':>5} {'p50 ms':>10} {'peak MiB':>9}  status"
    print(header)
    for r in rows:
        p50 = r.get("latency_ms_p50") or ""
        mem = (
            f"{int(r['peak_mem_bytes']) / 2**20:.1f}"
            if r.get("peak_mem_bytes") not in (None, "")
            else ""
        )
        status = r["status"] + (f" ({r['note'][:60]})" if r["status"] != "ok" else "")
        print(
            f"{r['provider']:<15} {r['sweep']:<12} {r['config']:<9} {r['batch']:>3} {r['n_vars']:>6} {r['d_model']:>5} "
            f"{p50:>10} {mem:>9}  {status}"
        )


if __name__ == "__main__":
    sys.exit(main())
