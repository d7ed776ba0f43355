"""The results pages (bench/report.py): derived from the CSVs, and the committed ones current."""

from __future__ import annotations

import pytest

from bench import __main__ as bench_main
from bench import report, results, summary


def _row(provider: str, p50: float | None, **kw) -> dict:
    row = {
        "suite": "attention",
        "sweep": "dataset",
        "provider": provider,
        "device": "cpu",
        "device_name": "Some CPU",
        "dtype": "float32",
        "batch": 16,
        "n_vars": 862,
        "d_model": 512,
        "kernel": 3,
        "torch_version": "2.13.0",
        "threads": 2,
        "isa": "amx",
        "config": "Traffic",
        "latency_ms_p50": p50,
        "peak_mem_bytes": 3 * 2**20 if p50 else None,
        "timing": "interleaved",
        "status": "ok" if p50 else "skipped",
        "note": "" if p50 else "needs a GPU",
        "git_commit": "abc1234",
    }
    return {**row, **kw}


@pytest.mark.parametrize("folder", report.result_folders(), ids=lambda f: f.name)
def test_committed_results_page_is_what_the_report_writes_from_the_csvs(folder):
    page = folder / report.PAGE
    assert page.is_file(), f"{page} is missing: run python -m bench report {folder}"
    assert page.read_text() == report.render(folder), (
        f"{page} differs from its CSVs: run python -m bench report {folder}"
    )


def test_the_committed_results_are_found():
    # The parametrised check above must not pass by finding nothing.
    folders = report.result_folders()
    assert report.RESULTS_ROOT / "intel-r-xeon-r-processor" in folders


def test_page_gives_p50_and_the_fused_backends_ratios_against_both_baselines(tmp_path):
    results.upsert_rows(
        tmp_path / "attention.csv",
        [
            _row("casa-reference", 10.0),
            _row("casa-compile", 8.0),
            _row("casa-cpu", 5.0),
            _row("full-sdpa", 40.0, timing=""),
            _row("casa-triton", None),
            _row("full-einsum", None, status="oom", note="estimated 9 GiB > cap", batch=1),
        ],
    )
    (tmp_path / "scaling_latency.png").write_bytes(b"")
    page = report.render(tmp_path)
    header = (
        "| point | casa-reference | casa-compile | casa-cpu | full-einsum | full-sdpa "
        "| casa-cpu vs reference | casa-cpu vs compile |"
    )
    assert header in page
    assert "| Traffic B=16 | 10 | 8 | 5 |  | 40 | 2.00× | 1.60× |" in page
    assert "| Traffic B=1 |  |  |  | oom |  |  |  |" in page
    assert "| Traffic B=16 | 3 | 3 | 3 |  | 3 |" in page  # MiB
    assert "Not run: `casa-triton` (needs a GPU)." in page
    assert "`full-einsum`: oom from Traffic B=1 (estimated 9 GiB > cap)." in page
    assert "sequential: `full-sdpa`" in page and "interleaved: `casa-reference`" in page
    assert "## Other plots" in page and "![scaling_latency.png](scaling_latency.png)" in page


def test_dtypes_timed_together_get_their_ratio_and_others_do_not(tmp_path):
    both = "interleaved (float32+bfloat16)"
    results.upsert_rows(
        tmp_path / "attention.csv",
        [
            _row("casa-cpu", 10.0, timing=both, isa="avx2"),
            _row("casa-cpu", 9.0, timing=both, isa="avx2", dtype="bfloat16"),
            _row("casa-reference", 20.0, timing=both, isa="avx2"),
            _row("casa-reference", 200.0, timing=both, isa="avx2", dtype="bfloat16"),
            # Timed apart: no ratio between the dtypes.
            _row("casa-cpu", 12.0, batch=1),
            _row("casa-cpu", 11.0, batch=1, dtype="bfloat16"),
        ],
    )
    page = report.render(tmp_path)
    assert "#### bfloat16 against float32, timed together (torch 2.13.0)" in page
    assert "| casa-reference | Traffic B=16 | avx2 | 2 | 20 | 200 | 10.00× |" in page
    assert "| casa-cpu | Traffic B=16 | avx2 | 2 | 10 | 9 | 0.90× |" in page
    assert "Traffic B=1 | amx" not in page


def test_op_rate_is_given_as_a_share_of_the_gemm_peak_timed_with_it(tmp_path):
    flops = 2 * 16 * (862 * 512**2 * (3 / 4 + 1) + 3 * 3 * 512**3 / 16)
    assert report.op_flops(_row("casa-cpu", 1.0)) == flops  # 15.07 GFLOP at Traffic, B = 16
    gemm_ms = 2 * 2048**3 / 100e6  # 100 GFLOP/s
    results.upsert_rows(
        tmp_path / "attention.csv",
        [
            _row("casa-reference", flops / 50e6),
            _row("casa-cpu", flops / 80e6),
            _row("gemm-peak", gemm_ms),
        ],
    )
    page = report.render(tmp_path)
    assert (
        "| point | gemm-peak GFLOP/s | casa-reference GFLOP/s | casa-reference / gemm-peak |"
        in page
    )
    assert "| Traffic | 100 | 50 | 50.0% | 80 | 80.0% |" in page
    # gemm-peak is neither a baseline nor a fused backend: no speed-up columns of its own.
    assert "gemm-peak vs" not in page
    assert "| Traffic | 301.4 | 188.4 | 171.8 | 1.60× |" in page


def test_scaling_page_has_the_fitted_slopes_and_crossovers(tmp_path):
    rows = []
    for n in (256, 512, 1024, 2048):
        common = dict(suite="scaling", sweep="n", batch=1, n_vars=n, config=f"N={n}")
        rows.append(_row("casa-cpu", n / 100, **common))  # linear
        rows.append(_row("full-sdpa", n * n / 100_000, **common))  # quadratic
    results.upsert_rows(tmp_path / "scaling.csv", rows)
    page = report.render(tmp_path)
    assert "#### N sweep (B=1, D=512, k=3)" in page
    assert "| casa-cpu | 1.00 | 0.00 | 2048 |  |" in page
    assert "| full-sdpa | 2.00 | 0.00 | 2048 |  |" in page
    # casa-cpu is slower at 256 (2.56 vs 0.66) and 512 (5.12 vs 2.62), faster from 1024.
    assert "casa-cpu faster than full-sdpa from N=1024" in page


def test_bench_report_command_writes_the_page_of_a_named_folder(tmp_path, capsys):
    results.upsert_rows(tmp_path / "model.csv", [_row("casa-cpu", 2.0, suite="model")])
    nested = tmp_path / "variant"
    results.upsert_rows(nested / "attention.csv", [_row("casa-cpu", 1.0)])
    assert bench_main.main(["report", str(tmp_path)]) == 0
    page = (tmp_path / report.PAGE).read_text()
    assert page == report.render(tmp_path)
    assert "## Forecaster end to end" in page and "- [variant/](variant/README.md)" in page
    assert str(tmp_path / report.PAGE) in capsys.readouterr().out


def test_bench_report_rejects_a_folder_without_suite_csvs(tmp_path, capsys):
    assert bench_main.main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "attention.csv" in error
    assert not (tmp_path / report.PAGE).exists()


XEON, EPYC = "intel-r-xeon-r-processor", "amd-epyc-family-23-model-1"  # results folders
# The README's headline table: its row label -> (folder, suite, dtype, isa, dataset, batch)
# of the CSV rows it quotes.
README_HEADLINES = {
    "attention op, fp32, B = 16": (XEON, "attention", "float32", "amx", "Traffic", "16"),
    "attention op, bf16 (AMX), B = 16": (XEON, "attention", "bfloat16", "amx", "Traffic", "16"),
    "forecaster, 4 layers, fp32, B = 16": (XEON, "model", "float32", "amx", "Traffic", "16"),
    "forecaster, 4 layers, bf16 (AMX), B = 16": (XEON, "model", "bfloat16", "amx", "Traffic", "16"),
    "attention op, fp32, AVX2 only, B = 16": (
        EPYC,
        "attention",
        "float32",
        "avx2",
        "Traffic",
        "16",
    ),
    "attention op, fp32, AVX2 only, B = 1": (EPYC, "attention", "float32", "avx2", "Traffic", "1"),
    "forecaster, 4 layers, fp32, AVX2 only, B = 16": (
        EPYC,
        "model",
        "float32",
        "avx2",
        "Traffic",
        "16",
    ),
}


def test_readme_headline_results_are_the_committed_csvs():
    readme = (report.RESULTS_ROOT.parent.parent / "README.md").read_text()
    for label, (folder, suite, dtype, isa, config, batch) in README_HEADLINES.items():
        path = report.RESULTS_ROOT / folder / f"{suite}.csv"
        p50 = {
            r["provider"]: float(r["latency_ms_p50"])
            for r in results.read_rows(path)
            if (r["dtype"], r["isa"], r["config"], r["batch"], r["status"])
            == (dtype, isa, config, batch, "ok")
        }
        cpu = p50["casa-cpu"]
        row = (
            f"| {label} | {report._figure(cpu, 3)} ms "
            f"| {p50['casa-reference'] / cpu:.2f}× | {p50['casa-compile'] / cpu:.2f}× |"
        )
        assert row in readme, f"README.md should have the row {row!r} (from {folder}/{suite}.csv)"


def test_readme_scaling_figures_are_the_committed_csvs():
    readme = " ".join((report.RESULTS_ROOT.parent.parent / "README.md").read_text().split())
    folder = report.RESULTS_ROOT / "intel-r-xeon-r-processor"
    (group,) = [
        g
        for g in summary.scaling_summary(results.read_rows(folder / "scaling.csv"))
        if (g["dtype"], g["batch"], g["d_model"]) == ("float32", 1, 512)
    ]
    fits = group["providers"]
    assert f"log–log slope of {fits['casa-cpu']['latency_slope']:.2f}" in readme
    assert f"with a slope of {fits['full-einsum']['latency_slope']:.2f}" in readme
    assert f"from N = {group['overtakes']['casa-cpu vs full-einsum']}" in readme
    assert f"SDPA from N = {group['overtakes']['casa-cpu vs full-sdpa']}" in readme
    assert f"memory from N = {fits['full-einsum']['stopped']['n_vars']}" in readme
    assert f"time cap at N = {fits['full-sdpa']['stopped']['n_vars']}" in readme


def test_train_section_has_p99_and_the_memory_casa_saves(tmp_path):
    def train(provider, p50, mem, sweep="op-dataset", **kw):
        return _row(
            provider,
            p50,
            suite="train",
            sweep=sweep,
            latency_ms_p99=2 * p50,
            peak_mem_bytes=mem * 2**20,
            **kw,
        )

    rows = [
        train("casa-reference", 30.0, 10),
        train("casa-compile", 20.0, 8),
        train("casa-cpu", 10.0, 4),
        train("full-einsum", 60.0, 40),
        train("full-sdpa", 40.0, 16),
    ]
    rows += [
        train(
            p, 100.0 * k, 10 * k, sweep="step-l", seq_len=seq_len, e_layers=4, config=f"L={seq_len}"
        )
        for seq_len in (48, 720)
        for p, k in (("casa-reference", 2), ("casa-cpu", 1), ("full-einsum", 4))
    ]
    results.upsert_rows(tmp_path / "train.csv", rows)
    (tmp_path / "train_memory_step-l.png").write_bytes(b"")
    page = report.render(tmp_path)
    assert "## Training (`python -m bench train`)" in page
    assert "#### op forward+backward, dataset shapes (B=16, N=862, D=512, k=3)" in page
    assert "#### forecaster training step, L sweep (B=16, N=862, D=512, k=3, e_layers=4)" in page
    assert "| Traffic | 30 | 20 | 10 | 60 | 40 | 3.00× | 2.00× |" in page  # p50, speed-ups
    assert "| Traffic | 60 | 40 | 20 | 120 | 80 |" in page  # p99
    header = (
        "| point | casa-reference | casa-compile | casa-cpu | full-einsum | full-sdpa "
        "| casa-cpu / reference | casa-cpu / compile "
        "| casa-reference saves vs full-einsum | casa-reference saves vs full-sdpa "
        "| casa-cpu saves vs full-einsum | casa-cpu saves vs full-sdpa |"
    )
    assert header in page
    assert (
        "| Traffic | 10 | 8 | 4 | 40 | 16 | 0.40× | 0.50× | 75.0% | 37.5% | 90.0% | 75.0% |" in page
    )
    assert "| L=48 | 20 | 10 | 40 | 0.50× | 50.0% | 75.0% |" in page
    assert "![train_memory_step-l.png](train_memory_step-l.png)" in page
    # the inference suites' pages keep their tables: no p99, no memory comparisons
    results.upsert_rows(tmp_path / "attention.csv", [_row("casa-cpu", 5.0)])
    attention = report.render(tmp_path).split("## Training")[0]
    assert "p99" not in attention and "saves vs" not in attention
