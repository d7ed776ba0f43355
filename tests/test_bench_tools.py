"""The benchmark machinery's logic (no timings asserted): CSV upsert, slopes, crossover,
allocator-based memory measurement, time cap, stop-growing after oom; optional packages
(tqdm, matplotlib, hypothesis) missing; bench/device_check's records, archive and dry run."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import casa_kernels
from bench import device_check, measure, plots, providers, report, results, suites, summary
from casa_kernels.ops import registry


def _row(**kw):
    base = {c: "" for c in results.KEY_COLUMNS}
    base.update(
        suite="scaling",
        sweep="n",
        provider="casa-cpu",
        device="cpu",
        device_name="X",
        dtype="float32",
        batch=1,
        d_model=512,
        status="ok",
    )
    base.update(kw)
    return base


def test_upsert_replaces_rows_with_the_same_key_and_keeps_others(tmp_path):
    path = tmp_path / "scaling.csv"
    results.upsert_rows(
        path, [_row(n_vars=8, latency_ms_p50=1.0), _row(n_vars=16, latency_ms_p50=2.0)]
    )
    results.upsert_rows(
        path, [_row(n_vars=8, latency_ms_p50=5.0), _row(n_vars=32, latency_ms_p50=3.0)]
    )
    rows = results.read_rows(path)
    assert sorted((int(r["n_vars"]), float(r["latency_ms_p50"])) for r in rows) == [
        (8, 5.0),
        (16, 2.0),
        (32, 3.0),
    ]
    # a different version is a different key: kept side by side
    results.upsert_rows(path, [_row(n_vars=8, torch_version="9.9", latency_ms_p50=7.0)])
    assert len(results.read_rows(path)) == 4


def test_checkout_is_dirty_for_code_changes_not_for_results(tmp_path):
    # A run of several suites writes bench/results/ between them: the later rows must
    # still name a clean checkout, and an edit to the measured code must show.
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "kernel.cpp").write_text("int a;\n")
    (tmp_path / "bench" / "results" / "model.csv").write_text("suite\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = results.checkout_state(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "bench" / "results" / "model.csv").write_text("suite\nmodel\n")
    assert results.checkout_state(tmp_path) == clean
    (tmp_path / "kernel.cpp").write_text("int b;\n")
    assert results.checkout_state(tmp_path) == clean + "+dirty"


def test_slug_is_filesystem_safe():
    assert results.slug("Intel(R) Xeon(R) Processor @ 2.0GHz") == "intel-r-xeon-r-processor-2-0ghz"
    assert results.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def _cpuinfo(name: str, family: str, model: str) -> str:
    """/proc/cpuinfo of two processors; the second's fields differ, so that a parser
    reading past the first block is caught."""
    first = f"processor\t: 0\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: {name}\n"
    return first + "\nprocessor\t: 1\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: other\n"


def test_cpu_model_keeps_a_full_name_and_tells_masked_ones_apart():
    full = "AMD EPYC 7763 64-Core Processor"
    assert results.cpu_model_from_cpuinfo(_cpuinfo(full, "25", "1")) == full
    zen3 = results.cpu_model_from_cpuinfo(_cpuinfo("AMD EPYC", "25", "1"))
    zen1 = results.cpu_model_from_cpuinfo(_cpuinfo("AMD EPYC", "23", "1"))
    assert (zen3, zen1) == ("AMD EPYC (family 25 model 1)", "AMD EPYC (family 23 model 1)")
    assert results.slug(zen3) == "amd-epyc-family-25-model-1"
    assert results.cpu_model_from_cpuinfo("processor\t: 0\nflags\t: fpu\n") == ""


def test_fit_slope_recovers_power_laws():
    ns = [256, 512, 1024, 2048]
    assert summary.fit_slope(ns, [3 * n for n in ns]) == pytest.approx(1.0)
    assert summary.fit_slope(ns, [0.5 * n**2 for n in ns]) == pytest.approx(2.0)
    assert summary.fit_slope([256], [1.0]) is None


def test_overtake_is_the_smallest_n_from_which_casa_stays_faster():
    casa = [
        _row(n_vars=n, latency_ms_p50=t)
        for n, t in ((256, 10), (512, 5), (1024, 30), (2048, 40), (4096, 50))
    ]
    full = [
        _row(provider="full-einsum", n_vars=n, latency_ms_p50=t)
        for n, t in ((256, 1), (512, 6), (1024, 20), (2048, 80))
    ]
    full.append(_row(provider="full-einsum", n_vars=4096, status="oom"))
    assert summary._overtake_n(casa, full) == 2048  # the win at 512 is not kept at 1024
    assert summary._overtake_n(casa[:3], full[:3]) is None


def test_cpu_peak_memory_sees_allocator_events():
    n = 1 << 20  # 4 MiB of float32

    def two_live_then_one():
        a = torch.ones(n)
        b = a + 1  # a and b alive: 8 MiB
        del a
        return b * 2  # b and the result: 8 MiB

    peak = measure.cpu_peak_allocated(two_live_then_one)
    assert 2 * 4 * n <= peak < 3 * 4 * n


def test_time_cap_raises_after_two_slow_calls():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    with pytest.raises(measure.MeasurementTimeout):
        measure.measure_latency(slow, "cpu", warmup=1, reps=3, time_cap_s=0.01)
    assert len(calls) == 2


def _options(out_dir, **overrides) -> suites.RunOptions:
    """Quick CPU run options (fp32, 1 warm-up, 1 rep, B=1), with ``overrides``."""
    fields = dict(
        device="cpu",
        dtypes=(torch.float32,),
        warmup=1,
        reps=1,
        time_cap_s=60,
        mem_cap_bytes=1 << 40,
        out_dir=out_dir,
        quick=True,
        batches=[1],
    )
    return suites.RunOptions(**{**fields, **overrides})


def test_interleaved_timing_rotates_the_order_and_keeps_failures_apart():
    order = []

    def named(name, fail_on=None):
        def fn():
            order.append(name)
            if fail_on is not None and len(order) >= fail_on:
                raise RuntimeError(f"{name} broke")

        return fn

    fns = {"a": named("a"), "b": named("b"), "c": named("c")}
    result = measure.measure_latencies(fns, "cpu", warmup=1, reps=3, time_cap_s=10)
    assert order[:3] == ["a", "b", "c"]  # warm-ups
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated rounds
    assert all(isinstance(r, measure.Latency) and r.reps == 3 for r in result.values())

    order.clear()
    fns = {"a": named("a"), "bad": named("bad", fail_on=5), "c": named("c")}
    result = measure.measure_latencies(fns, "cpu", warmup=1, reps=3, time_cap_s=10)
    assert isinstance(result["bad"], RuntimeError) and "bad broke" in str(result["bad"])
    assert result["a"].reps == 3 and result["c"].reps == 3
    assert order.count("bad") == 2  # warm-up, then the call that raised; never again


def test_a_provider_failing_to_compile_is_recorded_and_the_others_go_on(tmp_path):
    def broken_compile(point, device, dtype):
        def fn():
            raise RuntimeError("inductor says no")

        return fn

    compile_ = dataclasses.replace(providers.PROVIDERS["casa-compile"], build=broken_compile)
    chosen = [providers.PROVIDERS["casa-reference"], compile_]
    point = providers.Point("attention", "dataset", 1, 7, 16)
    units = [(p, torch.float32) for p in chosen]
    rows = suites.measure_points(units, "tiny", point, _options(tmp_path, reps=2))
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error" and "inductor says no" in rows[1]["note"]


def test_interleaved_timing_caps_the_rounds_by_the_time_cap():
    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    fns = {"fast": sleeper(0.001), "slow": sleeper(0.02)}
    result = measure.measure_latencies(fns, "cpu", warmup=1, reps=1000, time_cap_s=0.1)
    # Rounds take ~21 ms; the budget is the cap per callable: 0.2 s, so ≤ ~10 rounds.
    assert 1 <= result["slow"].reps == result["fast"].reps <= 12
    assert result["slow"].p50_ms > result["fast"].p50_ms


def test_suite_interleaved_rows_say_so(tmp_path):
    opts = _options(tmp_path, reps=2, mem_cap_bytes=1 << 30, datasets=("ETTh1",), interleave=True)
    chosen = [providers.PROVIDERS["casa-reference"], providers.PROVIDERS["full-einsum"]]
    rows = suites.run_suite("attention", chosen, opts, progress=False)
    assert [r["provider"] for r in rows] == ["casa-reference", "full-einsum"]
    assert all(r["status"] == "ok" and r["timing"] == "interleaved" for r in rows)
    written = results.read_rows(tmp_path / "attention.csv")
    assert sorted(r["provider"] for r in written) == ["casa-reference", "full-einsum"]


def test_dtypes_interleaved_are_timed_together_and_rowed_apart(tmp_path, monkeypatch):
    groups = []
    timed = suites.measure_latencies

    def record(fns, *args, **kwargs):
        groups.append(sorted(fns))
        return timed(fns, *args, **kwargs)

    monkeypatch.setattr(suites, "measure_latencies", record)
    opts = _options(
        tmp_path,
        reps=2,
        datasets=("ETTh1",),
        interleave=True,
        dtypes=(torch.float32, torch.bfloat16),
    )
    chosen = [providers.PROVIDERS["casa-reference"], providers.PROVIDERS["casa-cpu"]]
    rows = suites.run_suite("attention", chosen, opts, progress=False)
    assert groups == [
        [
            "casa-cpu bfloat16",
            "casa-cpu float32",
            "casa-reference bfloat16",
            "casa-reference float32",
        ]
    ]
    assert [(r["provider"], r["dtype"]) for r in rows] == [
        ("casa-reference", "float32"),
        ("casa-cpu", "float32"),
        ("casa-reference", "bfloat16"),
        ("casa-cpu", "bfloat16"),
    ]
    assert {r["timing"] for r in rows} == {"interleaved (float32+bfloat16)"}
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    assert len(results.read_rows(tmp_path / "attention.csv")) == 4


@pytest.mark.parametrize(
    "suite, value, why",
    [
        ("attention", "float64", "expected distinct names"),
        ("attention", "float32,float32", "expected distinct names"),
        ("attention", "", "expected distinct names"),
        ("distributed", "float32,bfloat16", "the distributed suite takes one dtype"),
    ],
)
def test_bad_dtype_lists_are_refused_with_the_argument_named(suite, value, why, tmp_path, capsys):
    from bench import __main__ as bench_main

    assert bench_main.main([suite, "--dtype", value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("--dtype:") and why in err and repr(value) in err


def test_percentile_interpolates():
    assert measure.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert measure.percentile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert math.isnan(measure.percentile([], 0.5))


def test_provider_over_mem_cap_is_oom_and_stops_growing(tmp_path):
    opts = _options(tmp_path, mem_cap_bytes=1 << 20)
    einsum = providers.PROVIDERS["full-einsum"]
    big = providers.Point("scaling", "n", 1, 4096, 512)
    (row,) = suites.measure_points([(einsum, torch.float32)], "N=4096", big, opts)
    assert row["status"] == "oom" and "mem-cap" in row["note"]


def test_every_backend_is_a_provider():
    # The providers come from the registry: registering a backend adds casa-<name>.
    casa = [name for name in providers.PROVIDERS if name.startswith("casa-")]
    assert casa == [f"casa-{b}" for b in casa_kernels.backend_names()] + ["casa-compile"]


def test_gemm_peak_runs_only_when_named_and_multiplies_its_2048_squares():
    assert "gemm-peak" not in [p.name for p in providers.select(None)]
    (peak,) = providers.select("gemm-peak")
    point = providers.Point("attention", "dataset", 1, 7, 16)
    out = peak.build(point, "cpu", torch.float32)()
    assert out.shape == (2048, 2048) and out.dtype == torch.float32
    assert peak.estimate_bytes(point, torch.float32) == 3 * 2048**2 * 4
    assert peak.unavailable("cpu", torch.float32) is None
    assert report.GEMM_PEAK_SIZE == providers.GEMM_PEAK_SIZE


def test_gemm_peak_in_bfloat16_is_skipped_where_the_cpu_has_no_bfloat16_gemms(monkeypatch):
    from casa_kernels.ops.backends import cpu

    (peak,) = providers.select("gemm-peak")
    monkeypatch.setattr(cpu, "bf16_gemm_tier", lambda: "none")
    assert "no bfloat16 GEMMs" in peak.unavailable("cpu", torch.bfloat16)
    monkeypatch.setattr(cpu, "bf16_gemm_tier", lambda: "amx")
    assert peak.unavailable("cpu", torch.bfloat16) is None


def test_backends_auto_never_picks_on_cpu_are_skipped_there():
    for name in casa_kernels.backend_names():
        reason = providers.PROVIDERS[f"casa-{name}"].unavailable("cpu", torch.float32)
        if name not in registry.auto_order("cpu"):
            assert reason  # never crashes, always says why


def test_unknown_provider_is_rejected():
    with pytest.raises(SystemExit):
        providers.select("casa-reference,nope")


def test_a_provider_stops_growing_after_oom_while_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(
        suites, "measure_peak_memory", lambda fn, device: (0, "not measured (test)")
    )
    built = []

    def build(point, device, dtype):
        built.append((point.sweep, point.n_vars))
        if point.sweep == "n" and point.n_vars >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return lambda: torch.zeros(1)

    fake = providers.Provider("full-fake", "full", build, lambda d, t: None, lambda p, t: 0)
    fine = providers.Provider(
        "casa-fake",
        "casa",
        lambda p, d, t: lambda: torch.zeros(1),
        lambda d, t: None,
        lambda p, t: 0,
    )
    opts = _options(tmp_path)
    rows = suites.run_suite("scaling", [fake, fine], opts, progress=False)
    n_rows = {(r["provider"], r["n_vars"]): r for r in rows if r["sweep"] == "n"}
    assert n_rows[("full-fake", 32)]["status"] == "ok"
    assert n_rows[("full-fake", 64)]["status"] == "oom"
    assert n_rows[("full-fake", 128)]["note"].startswith("not run")
    assert ("n", 128) not in built
    assert all(n_rows[("casa-fake", n)]["status"] == "ok" for n in (64, 128, 4096))
    assert len(results.read_rows(tmp_path / "scaling.csv")) == len(rows)


# --- optional packages ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _run_python(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_bench_runs_without_tqdm_and_matplotlib(tmp_path):
    # Block both, then run a suite with and without a progress bar and draw the plots.
    script = """
import pathlib, sys
sys.modules["tqdm"] = None
sys.modules["matplotlib"] = None
import torch
from bench import plots, providers, suites
suites.measure_peak_memory = lambda fn, device: (0, "not measured (test)")
fine = providers.Provider("casa-fake", "casa", lambda p, d, t: (lambda: torch.zeros(1)),
                          lambda d, t: None, lambda p, t: 0)
out = pathlib.Path(sys.argv[1])
opts = suites.RunOptions(device="cpu", dtypes=(torch.float32,), warmup=1, reps=1, time_cap_s=60,
                         mem_cap_bytes=1 << 40, out_dir=out, quick=True, batches=[1], datasets=("ETTh1",))
for progress in (True, True, False):
    rows = suites.run_suite("attention", [fine], opts, progress=progress)
    assert rows and all(r["status"] == "ok" for r in rows), rows
assert plots.plot_scaling(out) == [] and plots.plot_scaling(out) == []
"""
    result = _run_python(script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("tqdm is not installed: no progress bar") == 1, result.stderr
    assert result.stderr.count("matplotlib is not installed: no plots") == 1, result.stderr
    assert (tmp_path / "attention.csv").is_file()


def _pytest_without_hypothesis(*args: str) -> subprocess.CompletedProcess:
    script = """
import sys
sys.modules["hypothesis"] = None
import pytest
sys.exit(pytest.main(["-p", "no:cacheprovider", "-q", "-rs", *sys.argv[1:]]))
"""
    # No plugin autoload: hypothesis' own pytest plugin would import it.
    return _run_python(
        script, *args, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
    )


def test_without_hypothesis_only_the_fuzz_tests_skip(tmp_path):
    # A module using the stand-ins runs; the op test modules, imported alongside, collect.
    module = tmp_path / "test_stand_ins.py"
    module.write_text("""
import pytest
from tests.conftest import given, settings, st

@pytest.mark.parametrize("scale", [1, 2])
@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 9), k=st.sampled_from([1, 3]).map(lambda k: k + 1))
def test_fuzzed(scale, n, k):
    raise AssertionError("runs only with hypothesis")

def test_plain():
    assert True
""")
    result = _pytest_without_hypothesis(
        str(module), "tests/ops/test_cpu.py", "tests/ops/test_triton.py", "-k", "test_stand_ins"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 2 skipped" in result.stdout and "error" not in result.stdout.lower(), (
        result.stdout
    )
    assert "hypothesis is not installed" in result.stdout


# --- bench/device_check -----------------------------------------------------------------


def _bench_row(provider, config, batch, p50_ms, status="ok", dtype="bfloat16"):
    row = {c: "" for c in results.COLUMNS}
    row.update(
        suite="attention",
        sweep="dataset",
        provider=provider,
        device="cuda:0",
        device_name="GPU",
        dtype=dtype,
        batch=batch,
        n_vars=862,
        d_model=512,
        kernel=3,
        config=config,
        status=status,
        latency_ms_p50=p50_ms if status == "ok" else "",
        peak_mem_bytes=1000 if status == "ok" else "",
        timestamp="2026-01-01T00:00:00",
    )
    return row


def test_key_figures_read_logs_and_results(tmp_path):
    log = tmp_path / "log"
    log.write_text(
        "...\nFAILED tests/ops/test_x.py::test_y - AssertionError\n"
        "1 failed, 20 passed, 2 skipped in 31.20s\n"
    )
    assert device_check.key_figure("tests-cuda", "failed", log, tmp_path) == (
        "1 failed, 20 passed, 2 skipped in 31.20s; FAILED tests/ops/test_x.py::test_y - AssertionError"
    )
    log.write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert (
        device_check.key_figure("racecheck-cuda", "ok", log, tmp_path)
        == "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
    )
    log.write_text("collecting ...\nsome test output\n")
    assert (
        device_check.key_figure(
            "tests-triton", "timeout", log, tmp_path, "killed at its deadline after 90s"
        )
        == "killed at its deadline after 90s"
    )
    assert (
        device_check.key_figure("verify", "skipped", log, tmp_path, "no CUDA device")
        == "no CUDA device"
    )
    log.write_text(
        "Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access\n"
        "========= ERROR SUMMARY: 0 errors\n"
    )
    assert (
        device_check.key_figure("memcheck-cuda", "failed", log, tmp_path)
        == "ERROR SUMMARY: 0 errors; RuntimeError: CUDA error: an illegal memory access"
    )

    results.upsert_rows(
        tmp_path / "attention.csv",
        [
            _bench_row("casa-triton", "Traffic", 16, 0.1234),
            _bench_row("casa-cuda", "Traffic", 16, 0.05),
            _bench_row("casa-triton", "Traffic", 1, 0.02),
            _bench_row("full-einsum", "Wide20k", 16, "", "oom"),
            _bench_row("casa-triton", "Traffic", 16, 9.0, dtype="float32"),
        ],
    )
    assert device_check.key_figure("bench-attention", "ok", log, tmp_path) == (
        "5 rows: 4 ok, 1 oom; Traffic B=16 p50 casa-cuda 50 µs, casa-triton 123 µs"
    )
    (tmp_path / "autotuned").mkdir()
    results.upsert_rows(
        tmp_path / "autotuned" / "attention.csv", [_bench_row("casa-triton", "Traffic", 16, 0.1)]
    )
    assert device_check.key_figure("bench-autotuned", "ok", log, tmp_path) == (
        "casa-triton Traffic B=16 p50: autotuned 100 µs, single config 123 µs"
    )


def test_record_packs_the_work_folder_into_three_files(tmp_path, monkeypatch):
    monkeypatch.setattr(device_check, "LOG_KEEP_BYTES", 1000)
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    (work / "results").mkdir()
    (work / "logs" / "03-tests-cuda.log").write_text("x" * 5000 + "\n3 passed in 1.00s\n")
    (work / "results" / "attention.csv").write_text("a,b\n")
    device_check.record(work, out, "tests-cuda", "ok", 12, 90, "")
    device_check.record(work, out, "verify", "skipped", 0, 35, "no CUDA device")
    assert sorted(p.name for p in out.iterdir()) == [
        device_check.ARCHIVE,
        device_check.SUMMARY_JSON,
        device_check.SUMMARY_MD,
    ]
    summary = json.loads((out / device_check.SUMMARY_JSON).read_text())
    assert [(s["step"], s["status"], s["key_figure"]) for s in summary["steps"]] == [
        ("tests-cuda", "ok", "3 passed in 1.00s"),
        ("verify", "skipped", "no CUDA device"),
    ]
    assert (
        "| tests-cuda | ok | 12 | 90 | 3 passed in 1.00s |"
        in (out / device_check.SUMMARY_MD).read_text()
    )
    with tarfile.open(out / device_check.ARCHIVE) as tar:
        names = set(tar.getnames())
        log = tar.extractfile("logs/03-tests-cuda.log").read().decode()
    assert {"logs/03-tests-cuda.log", "results/attention.csv", device_check.SUMMARY_MD} <= names
    assert "bytes cut by device_check" in log and log.endswith("3 passed in 1.00s\n")


def test_device_check_dry_run_skips_the_gpu_steps_and_packs(tmp_path):
    result = subprocess.run(
        ["bash", "bench/device_check.sh", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "OUT_DIR": str(tmp_path / "out"),
            "PYTHON": sys.executable,
            "TRITON_AOT": str(tmp_path / "not-carried"),
        },
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tmp_path = tmp_path / "out"
    assert len(list(tmp_path.rglob("*"))) == 3  # the device tool returns at most 8 files
    steps = {
        s["step"]: s
        for s in json.loads((tmp_path / device_check.SUMMARY_JSON).read_text())["steps"]
    }
    assert steps["preflight"]["status"] == "ok" and steps["info"]["status"] == "ok"
    assert steps["triton-cache"]["status"] == "ok"
    assert steps["triton-cache"]["key_figure"] == (
        f"none carried ({tmp_path.parent / 'not-carried'} has no manifest): kernels compile here; "
        "compiled here: 0 kernels, 0 launcher modules"
    )
    gpu_steps = set(steps) - {"preflight", "info", "triton-cache"}
    assert {
        "build",
        "tests-cuda",
        "tests-triton",
        "verify",
        "memcheck-cuda",
        "racecheck-triton",
        "bench-autotuned",
    } <= gpu_steps
    assert all(
        steps[s]["status"] == "skipped" and "dry run" in steps[s]["key_figure"] for s in gpu_steps
    )
    assert result.stdout.rstrip().splitlines()[-1].startswith("| total | no step failed |")


@pytest.mark.parametrize("nvcc_release", ["13.0", "12.8"])
def test_preflight_on_a_gpu_machine_checks_nvcc_against_torch(
    tmp_path, monkeypatch, capsys, nvcc_release
):
    # A GPU and an nvcc, both faked: torch built for CUDA 13.0.
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(
        f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1'\n"
    )
    nvcc.chmod(0o755)
    gpu = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        major=9,
        minor=0,
        total_memory=80 * 2**30,
        multi_processor_count=132,
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(
        device_check, "_find_tool", lambda name, cuda_home: str(nvcc) if name == "nvcc" else None
    )
    monkeypatch.delenv("CUDA_HOME", raising=False)
    device_check.preflight(tmp_path, dry_run=False)
    env = dict(line.split("=", 1) for line in (tmp_path / "preflight.env").read_text().splitlines())
    assert env["PF_GPU_SLUG"] == "nvidia-h100-80gb-hbm3" and env["PF_GPU_ARCH"] == "9.0a"
    assert env["PF_NO_GPU"] == "''" and env["PF_SANITIZER"] == "''"
    out = capsys.readouterr().out
    assert "read by the Triton kernels: tests and verify use one config" in out
    if nvcc_release == "13.0":
        assert env["PF_NO_NVCC"] == "''" and env["PF_CUDA_HOME"] == str(tmp_path / "cuda")
    else:
        assert "majors differ" in env["PF_NO_NVCC"] and "PF_CUDA_HOME" not in env
        assert "MISSING  nvcc 12.8" in out
    assert "compute-sanitizer" in out.splitlines()[-1]  # faked away, with ninja
    facts = json.loads((tmp_path / "environment.json").read_text())
    assert facts["gpu"] == gpu.name and facts["gpu_multiprocessors"] == "132"


def test_unpack_upserts_the_archive_rows_beside_the_committed_ones(tmp_path):
    work, out, dest = tmp_path / "work", tmp_path / "out", tmp_path / "dest"
    (work / "logs").mkdir(parents=True)
    (work / "environment.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3"}))
    results.upsert_rows(
        work / "results" / "attention.csv", [_bench_row("casa-triton", "Traffic", 16, 0.1)]
    )
    results.upsert_rows(
        work / "results" / "autotuned" / "attention.csv",
        [_bench_row("casa-triton", "Traffic", 16, 0.08)],
    )
    device_check.record(work, out, "bench-autotuned", "ok", 30, 40, "")
    committed = {**_bench_row("casa-triton", "Traffic", 16, 0.3), "torch_version": "2.10"}
    results.upsert_rows(dest / "attention.csv", [committed])
    figures = tmp_path / "measured_speedups.json"

    assert (
        device_check.main(
            [
                "unpack",
                str(out / device_check.ARCHIVE),
                "--into",
                str(dest),
                "--figures",
                str(figures),
            ]
        )
        == 0
    )
    rows = results.read_rows(dest / "attention.csv")
    assert sorted(r["latency_ms_p50"] for r in rows) == ["0.1", "0.3"]  # another torch: another key
    assert not figures.exists()  # no reference row measured beside them: nothing decides auto
    assert results.read_rows(dest / "autotuned" / "attention.csv")[0]["latency_ms_p50"] == "0.08"
    assert (dest / "summary.json").is_file() and (dest / "autotuned" / "summary.json").is_file()
    assert "0.08" in (dest / "autotuned" / "README.md").read_text()  # results pages rebuilt
    assert "- [autotuned/](autotuned/README.md)" in (dest / "README.md").read_text()
    assert "bench-autotuned" in (dest / device_check.SUMMARY_MD).read_text()


def test_unpack_writes_the_figures_that_decide_auto_on_that_gpu(tmp_path):
    from casa_kernels.ops import measured

    work, out, dest = tmp_path / "work", tmp_path / "out", tmp_path / "dest"
    (work / "logs").mkdir(parents=True)
    (work / "environment.json").write_text(json.dumps({"gpu": "GPU"}))
    rows = [
        _bench_row("casa-reference", "Traffic", 16, 0.30),
        _bench_row("casa-triton", "Traffic", 16, 0.10),
        _bench_row("casa-cuda", "Traffic", 16, 0.60),
    ]
    results.upsert_rows(work / "results" / "attention.csv", rows)
    device_check.record(work, out, "bench", "ok", 30, 40, "")
    figures = tmp_path / "measured_speedups.json"
    archive = str(out / device_check.ARCHIVE)
    assert (
        device_check.main(["unpack", archive, "--into", str(dest), "--figures", str(figures)]) == 0
    )
    entry = json.loads(figures.read_text())["devices"]["GPU"]["bfloat16"]["B>1 N>512"]
    assert entry["speedups"] == {"triton": 3.0, "cuda": 0.5}
    assert entry["source"].endswith("dest/attention.csv")
    assert measured.speedups_from_rows(results.read_rows(dest / "attention.csv"), "x")


def test_cutlass_headers_from_a_carried_wheel(tmp_path, monkeypatch):
    # The GPU machine has no network: the nvidia-cutlass wheel travels as .whl/*.whl and
    # the preflight unpacks it for the build (CUTLASS_PATH).
    import zipfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "cutlass_library", None)  # not installed
    work = tmp_path / "work"
    work.mkdir()
    include, how = device_check.find_cutlass(work)
    assert include is None and ".whl/nvidia_cutlass" in how and "CUTLASS_PATH" in how
    (tmp_path / ".whl").mkdir()
    with zipfile.ZipFile(tmp_path / ".whl" / device_check.CUTLASS_WHEEL, "w") as wheel:
        wheel.writestr("cutlass_library/source/include/cute/tensor.hpp", "// CuTe\n")
    include, how = device_check.find_cutlass(work)
    assert include == str(work / "cutlass_site" / "cutlass_library" / "source" / "include")
    assert (Path(include) / "cute" / "tensor.hpp").is_file() and "unpacked" in how
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path / "nowhere"))
    include, how = device_check.find_cutlass(work)
    assert include is None and "nowhere" in how


# --- the train suite ---------------------------------------------------------------------


def test_train_points_cover_the_dataset_shapes_and_the_n_and_l_sweeps(tmp_path):
    opts = _options(tmp_path, quick=False, batches=[16, 1], datasets=tuple(suites.DATASETS))
    points = [point for _, point in suites.train_points(opts)]
    assert all(p.suite == "train" and p.training for p in points)
    by_sweep = {}
    for p in points:
        by_sweep.setdefault(p.sweep, []).append(p)
    assert set(by_sweep) == {"op-dataset", "step-dataset", "op-n", "step-n", "step-l"}
    # op points are the op alone; step points the forecaster, with the dataset's e_layers
    assert not any(p.model_level for s in ("op-dataset", "op-n") for p in by_sweep[s])
    for n, d, e_layers in suites.DATASETS.values():
        for b in (16, 1):
            assert providers.Point("train", "op-dataset", b, n, d, training=True) in points
            step = providers.Point(
                "train",
                "step-dataset",
                b,
                n,
                d,
                seq_len=96,
                pred_len=96,
                e_layers=e_layers,
                training=True,
            )
            assert step in points
    for sweep in ("op-n", "step-n"):
        ns = [p.n_vars for p in by_sweep[sweep]]
        assert ns[0] == 8 and ns[-1] >= 16384
        assert all(b == 2 * a for a, b in zip(ns, ns[1:]))
        assert {(p.batch, p.d_model) for p in by_sweep[sweep]} == {(1, 512)}
    assert [p.seq_len for p in by_sweep["step-l"]] == [48, 96, 192, 336, 720]
    assert {(p.n_vars, p.d_model, p.e_layers, p.batch) for p in by_sweep["step-l"]} == {
        (*suites.DATASETS["Traffic"], 16)
    }
    quick = suites.train_points(_options(tmp_path, datasets=("ETTh1",)))
    assert len(quick) < len(points) and max(p.n_vars for _, p in quick) <= 1024
    assert {p.batch for _, p in quick} == {1}


def _tiny_subject(requires_grad: bool = False):
    from bench.training import Subject

    weights = casa_kernels.ScoreAttentionWeights.random(5, 8, 3, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    return Subject(
        lambda x_: casa_kernels.casa_attention(x_, weights, backend="reference"), x, tuple(weights)
    )


def test_forward_backward_computes_every_gradient_of_the_reference_and_frees_them():
    from bench import training
    from casa_kernels import reference

    subject = _tiny_subject()
    grad_output = torch.randn(subject.x.shape, dtype=torch.float64)
    call = training.forward_backward(subject, grad_output)
    leaves = (subject.x, *subject.parameters)
    seen = {}
    for i, leaf in enumerate(leaves):
        leaf.register_hook(lambda g, i=i: seen.__setitem__(i, g.clone()))
    call()
    assert all(leaf.grad is None for leaf in leaves)  # freed: the next call starts alike
    expected = torch.autograd.grad(
        reference.score_attention(
            subject.x, casa_kernels.ScoreAttentionWeights(*subject.parameters)
        ),
        leaves,
        grad_output,
    )
    assert sorted(seen) == list(range(15))  # x and all 14 weights
    for i, grad in enumerate(expected):
        torch.testing.assert_close(seen[i], grad)


def test_training_step_trains_the_forecaster_with_adamw():
    from bench import training

    torch.manual_seed(0)
    model = casa_kernels.CASAModel(
        n_vars=5, d_model=8, seq_len=12, pred_len=4, e_layers=1, backend="reference"
    )
    x, target = torch.randn(3, 12, 5), torch.randn(3, 4, 5)
    step = training.training_step(training.Subject(model, x, tuple(model.parameters())), target)

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x), target).item()

    before = loss()
    for _ in range(20):
        step()
        assert all(p.grad is None for p in model.parameters())
    assert loss() < 0.9 * before


def test_train_rows_measure_the_op_and_the_step_of_every_provider(tmp_path):
    chosen = [providers.PROVIDERS[n] for n in ("casa-reference", "casa-cpu", "full-einsum")]
    opts = _options(tmp_path, reps=2, datasets=("ETTh1",), interleave=True)
    op, step = [p for _, p in suites.train_points(opts)][:2]
    units = [(p, torch.float32) for p in chosen]
    rows = suites.measure_points(units, "ETTh1", op, opts)
    rows += suites.measure_points(units, "ETTh1", step, opts)
    for row in rows:
        assert row["status"] == "ok", row["note"]
        assert row["suite"] == "train" and row["timing"] == "interleaved"
        assert float(row["latency_ms_p99"]) >= float(row["latency_ms_p50"]) > 0
        assert int(row["peak_mem_bytes"]) > 0 and "training" not in row
    assert [r["sweep"] for r in rows] == ["op-dataset"] * 3 + ["step-dataset"] * 3
    assert {(r["seq_len"], r["e_layers"]) for r in rows[:3]} == {("", "")}
    assert {(r["seq_len"], r["e_layers"]) for r in rows[3:]} == {(96, 2)}
    results.upsert_rows(tmp_path / "train.csv", rows)
    assert len(results.read_rows(tmp_path / "train.csv")) == 6  # op and step keep their rows


def test_training_estimates_grow_with_the_saved_layers():
    point = providers.Point("train", "step-n", 1, 4096, 512, seq_len=96, pred_len=96, e_layers=4)
    forward = dataclasses.replace(point, training=False)
    for name in ("casa-reference", "full-einsum", "full-sdpa"):
        estimate = providers.PROVIDERS[name].estimate_bytes
        assert estimate(dataclasses.replace(point, training=True), torch.float32) > estimate(
            forward, torch.float32
        )
    # einsum keeps one [B, H, N, N] softmax output per layer for the backward
    einsum = providers.PROVIDERS["full-einsum"].estimate_bytes
    scores = 8 * 4096**2 * 4
    assert einsum(dataclasses.replace(point, training=True), torch.float32) > 7 * scores


def test_train_suite_stops_the_op_and_the_step_lanes_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(
        suites, "measure_peak_memory", lambda fn, device: (0, "not measured (test)")
    )

    def build(point, device, dtype):
        if point.sweep == "op-n":
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return lambda: torch.zeros(1)

    fake = providers.Provider("full-fake", "full", build, lambda d, t: None, lambda p, t: 0)
    rows = suites.run_suite("train", [fake], _options(tmp_path, datasets=("ETTh1",)), False)
    by_point = {(r["sweep"], r["config"]): r for r in rows}
    assert by_point[("op-n", "N=8")]["status"] == "oom"
    assert by_point[("op-n", "N=512")]["note"].startswith("not run: stopped growing")
    assert all(by_point[("step-n", f"N={n}")]["status"] == "ok" for n in (8, 512))
    assert by_point[("op-dataset", "ETTh1")]["status"] == "ok"
    assert len(results.read_rows(tmp_path / "train.csv")) == len(rows)


def _train_row(provider, sweep, n, mem, seq_len="", status="ok"):
    row = {c: "" for c in results.COLUMNS}
    row.update(
        suite="train",
        sweep=sweep,
        provider=provider,
        device="cpu",
        device_name="X",
        dtype="float32",
        batch=1,
        n_vars=n,
        d_model=512,
        kernel=3,
        seq_len=seq_len,
        e_layers=4 if seq_len else "",
        threads=2,
        torch_version="2.13.0",
        config=f"L={seq_len}" if sweep == "step-l" else f"N={n}",
        status=status,
        latency_ms_p20=1,
        latency_ms_p50=2,
        latency_ms_p80=3,
        latency_ms_p99=4,
        peak_mem_bytes=mem if status == "ok" else "",
        timestamp="2026-01-01T00:00:00",
    )
    return row


def test_training_memory_plots_against_n_and_l(tmp_path, monkeypatch):
    rows = [
        _train_row(p, sweep, n, n * k, seq_len=96 if sweep == "step-n" else "")
        for sweep in ("op-n", "step-n")
        for n in (256, 512, 1024)
        for p, k in (("casa-reference", 10), ("casa-cpu", 5), ("casa-compile", 9), ("full-sdpa", 7))
    ]
    rows += [
        _train_row("full-einsum", "op-n", 256, 10**9),
        _train_row("full-einsum", "op-n", 512, "", status="oom"),
    ]
    rows += [
        _train_row(p, "step-l", 862, 1000 + seq_len, seq_len=seq_len)
        for seq_len in (48, 96, 720)
        for p in ("casa-reference", "casa-cpu", "full-einsum")
    ]
    results.upsert_rows(tmp_path / "train.csv", rows)
    drawn = {}
    real = plots._plot_group

    def spy(plt, path, title, by_provider, metric, axis=plots.N_AXIS):
        drawn[path.name] = (sorted(by_provider), axis[0], metric, title)
        real(plt, path, title, by_provider, metric, axis)

    monkeypatch.setattr(plots, "_plot_group", spy)
    # a group where nothing ran (all timed out) draws no empty figure
    timed_out = {**_train_row("casa-cpu", "step-l", 862, "", 96, "timeout"), "batch": 16}
    results.upsert_rows(tmp_path / "train.csv", [timed_out])
    written = plots.plot_training(tmp_path, dtype="float32")
    names = ["train_memory_op-n.png", "train_memory_step-n.png", "train_memory_step-l.png"]
    assert [p.name for p in written] == names
    assert all((tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert drawn["train_memory_op-n.png"][:3] == (
        ["casa-cpu", "casa-reference", "full-einsum", "full-sdpa"],
        "n_vars",
        "memory",
    )
    assert (
        drawn["train_memory_step-l.png"][1] == "seq_len"
        and "N=862" in drawn["train_memory_step-l.png"][3]
    )


def test_train_summary_has_its_dataset_tables_and_n_slopes(tmp_path):
    rows = [
        _train_row(p, "op-n", n, n * k)
        for n in (256, 512, 1024)
        for p, k in (("casa-cpu", 5), ("full-einsum", 0))
    ]
    for r in rows:
        if r["provider"] == "full-einsum":
            r["peak_mem_bytes"] = int(r["n_vars"]) ** 2
    rows.append({**_train_row("casa-cpu", "op-dataset", 862, 100), "config": "Traffic"})
    results.upsert_rows(tmp_path / "train.csv", rows)
    train = json.loads(summary.write_summary(tmp_path).read_text())["train"]
    (group,) = train["op-n"]
    assert group["providers"]["casa-cpu"]["memory_slope"] == pytest.approx(1.0)
    assert group["providers"]["full-einsum"]["memory_slope"] == pytest.approx(2.0)
    assert [e["config"] for e in train["op-dataset"]] == ["Traffic"] and train["step-n"] == []


def test_bench_train_command_defaults(tmp_path, monkeypatch):
    from bench import __main__ as bench_main

    runs = []
    monkeypatch.setattr(
        suites, "run_suite", lambda suite, chosen, opts, progress: runs.append((suite, opts)) or []
    )
    args = ["train", "--out", str(tmp_path), "--no-progress"]
    assert bench_main.main([*args, "--quick"]) == 0
    assert bench_main.main(args) == 0
    assert bench_main.main([*args, "--quick", "--datasets", "Solar", "--batch", "4"]) == 0
    quick, full, chosen = (opts for _, opts in runs)
    assert (quick.batches, quick.datasets, quick.quick) == ([1], ("ETTh1",), True)
    assert (full.batches, full.datasets, full.quick) == ([16, 1], tuple(suites.DATASETS), False)
    assert (chosen.batches, chosen.datasets) == ([4], ("Solar",))


# --- the Triton kernels compiled ahead of time for the device run (bench/triton_aot) -----

# Run with the interpreter off (it compiles nothing): one tiny kernel is built into a
# carried folder, installed under another Triton build's key, and compiled again through
# triton.compile with that build's key in force, which must be a cache hit.
_AOT_ROUND_TRIP = r"""
import json, pathlib, sys
import torch, triton, triton.language as tl
import triton.runtime.cache as triton_cache
from triton.backends.compiler import GPUTarget
from bench.cost_model.triton_compile import Config, Launch, cache_key, prepare
from bench.triton_aot import cache

@triton.jit
def double(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

tmp = pathlib.Path(sys.argv[1])
target = GPUTarget("cuda", 90, 32)
launch = Launch(double, (1,), (torch.empty(64, device="meta"), 64), {"BLOCK": 64})
config = Config({}, 4, 3)
installation, rest = cache_key(launch, config, target)
name = cache.entry_name(installation + rest)
launcher = cache.launcher_digest(launch, config, target)
entries = {name: {"rest": rest, "kernel": "double", "launch": launch, "config": config,
                  "launcher": launcher}}
steps = {"verify": {"calls": 1, "launches": 1, "entries": [name]}}
manifest = cache.build(tmp / "carried", entries, steps, 90, log=lambda line: None)

device_build = "triton-as-built-for-another-python"
installed = cache.install(tmp / "carried", tmp / "device", device_build)
hits = []
triton.knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
triton.knobs.cache.dir = str(tmp / "device")
triton_cache.triton_key = lambda: device_build
source, options = prepare(launch, config, target)
triton.compile(source, target=target, options=options)
print(json.dumps({
    "manifest": manifest, "name": name, "installed": installed, "hits": hits,
    "rekeyed": cache.entry_name(device_build + rest),
    "compiled": cache.device_compiles(tmp / "device"),
}))
"""


def test_triton_aot_cache_is_rekeyed_and_hit_by_another_triton_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "scratch")
    script = tmp_path / "round_trip.py"  # a file: Triton reads a jit function's source
    script.write_text(_AOT_ROUND_TRIP)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    entry = out["manifest"]["entries"][out["name"]]
    assert entry["files"] == ["double.cubin", "double.json"]  # only what a cache hit reads
    assert sorted(p.name for p in (tmp_path / "carried" / "entries" / out["name"]).iterdir()) == [
        "double.cubin",
        "double.json",
    ]
    assert out["installed"] == 1 and out["hits"] == [True]
    device = tmp_path / "device" / out["rekeyed"]
    assert out["rekeyed"] != out["name"] and device.is_dir()
    group = json.loads((device / "__grp__double.json").read_text())["child_paths"]
    assert all(Path(p).is_file() and Path(p).parent == device for p in group.values())
    assert out["compiled"] == [0, 0, []]  # the hit compiled nothing


def test_triton_aot_installs_only_where_triton_arch_and_ptxas_match():
    from bench.triton_aot import cache

    manifest = {"triton": "3.6.0", "arch": 90, "backend": "ptxas 12.8-90"}
    assert cache.install_problem(manifest, "3.6.0", 90, "ptxas 12.8-90") == ""
    assert "3.9.0" in cache.install_problem(manifest, "3.9.0", 90, "ptxas 12.8-90")
    assert "sm_100" in cache.install_problem(manifest, "3.6.0", 100, "ptxas 12.8-100")
    assert "ptxas" in cache.install_problem(manifest, "3.6.0", 90, "ptxas 13.0-90")
    assert cache.install_problem(manifest, "3.6.0", None, None) == "no GPU"
    assert "no manifest" in cache.install_problem({}, "3.6.0", 90, "ptxas 12.8-90")


def test_triton_aot_counts_what_the_device_compiled(tmp_path):
    from bench.triton_aot import cache

    for name, files in {
        "CARRIED": ["_head_kernel.cubin", "_head_kernel.json"],
        "NEW1": ["_tail_kernel.cubin", "_tail_kernel.json"],
        "NEW2": ["_tail_kernel.cubin"],
        "LAUNCHER": ["__triton_launcher.cpython-312-x86_64-linux-gnu.so"],
    }.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("x")
    (tmp_path / cache.INSTALLED).write_text(json.dumps(["CARRIED"]))
    assert cache.device_compiles(tmp_path) == (2, 1, ["_tail_kernel", "_tail_kernel"])
    assert cache.device_compiles(tmp_path / "absent") == (0, 0, [])


def test_triton_aot_install_without_a_usable_cache_says_kernels_compile_there(tmp_path, capsys):
    from bench.triton_aot import __main__ as aot

    assert aot.main(["install", str(tmp_path / "none"), str(tmp_path / "cache")]) == 0
    assert "none carried" in capsys.readouterr().out
    (tmp_path / "carried").mkdir()
    (tmp_path / "carried" / "manifest.json").write_text(
        json.dumps({"triton": "0.0.1", "arch": 90, "backend": "x", "sources": "y", "entries": {}})
    )
    assert (
        aot.main(["install", str(tmp_path / "carried"), str(tmp_path / "cache"), "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("triton cache: not installed (built with Triton 0.0.1")
    assert "kernels compile here" in out and "sources changed" in out
    assert not (tmp_path / "cache").exists()


def test_recorded_calls_replay_to_the_launches_the_call_made():
    pytest.importorskip("triton")
    from bench.cost_model.triton_compile import record_launches
    from bench.triton_aot import calls as aot_calls
    from casa_kernels.ops import triton_kernels as tk
    from casa_kernels.weights import ScoreAttentionWeights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = ScoreAttentionWeights.random(7, 16, 3, dtype=torch.float32, device=device)
    x = torch.randn(2, 7, 16, device=device)
    with aot_calls.record_calls() as seen, record_launches() as launched:
        tk.triton_score_attention(x, w, block_n=16)
    assert [c.function for c in seen] == ["triton_score_attention"]  # the stages are inner
    call = aot_calls.Call.from_json(seen[0].to_json())
    assert call == seen[0] and call.kwargs == {"block_n": 16}
    replayed = aot_calls.replay(call, sm_count=132)
    assert [launch.name for launch in replayed] == [launch.name for launch in launched]
    assert all(
        a.device.type == "meta"
        for launch in replayed
        for a in launch.args
        if isinstance(a, torch.Tensor)
    )
    assert tk.triton_score_attention is not None and not hasattr(
        tk.triton_score_attention, "__wrapped__"
    )


def _script_step(script: str, name: str) -> str:
    """The command of ``step NAME ...`` in device_check.sh, its continuation lines joined."""
    lines = script[script.index(f"step {name} ") :].splitlines()
    end = next(i for i, line in enumerate(lines) if not line.endswith("\\"))
    return " ".join(line.rstrip("\\").strip() for line in lines[: end + 1]) + " "


def test_device_steps_calls_follow_the_modules_and_the_script():
    from bench.triton_aot import steps
    from casa_kernels.verify import DTYPES, QUICK_CASES

    assert len(steps.verify_calls()) == len(QUICK_CASES) * len(DTYPES["cuda"])
    assert len(steps.sanitize_calls()) == len(device_check.SANITIZE_SHAPES) * len(
        device_check.SANITIZE_DTYPES
    )
    script = (ROOT / "bench" / "device_check.sh").read_text()
    for name, step in steps.BENCH_STEPS.items():
        command = _script_step(script, name)
        assert f"-m bench {step.suite} " in command
        assert ("--quick" in command) == step.quick
        if step.datasets:
            assert f"--datasets {','.join(step.datasets)} " in command
        if step.batches:
            assert f"--batch {','.join(map(str, step.batches))} " in command
        assert ("-u CASA_TRITON_SINGLE_CONFIG" in command) == (name in steps.ALL_CONFIG_STEPS)
    shapes = {
        tuple(c.args[0]["tensor"][0])
        for c in steps.bench_calls(steps.BENCH_STEPS["bench-attention"])
    }
    assert shapes == {(b, *suites.SHAPES[d][:2]) for b in (16, 1) for d in ("Traffic", "Wide20k")}


def test_recorded_tests_are_the_ones_the_device_step_runs():
    from bench.triton_aot import steps

    command = _script_step((ROOT / "bench" / "device_check.sh").read_text(), "tests-triton")
    assert f'"${{PYTEST[@]}}" {" ".join(steps.TESTS_TRITON)} ' in command


def test_a_step_recorded_again_keeps_its_place(tmp_path):
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    for step in ("preflight", "triton-cache", "build"):
        device_check.record(work, tmp_path / "out", step, "ok", 1, 10, "")
    (work / "logs" / "01-triton-cache.log").write_text(
        "triton cache: installed 3 kernels\ntriton cache: compiled here: 1 kernels\n"
    )
    device_check.record(work, tmp_path / "out", "triton-cache", "ok", 2, 10, "")
    steps = json.loads((work / "steps.json").read_text())
    assert [(s["step"], s["seconds"]) for s in steps] == [
        ("preflight", 1),
        ("triton-cache", 2),
        ("build", 1),
    ]
    assert steps[1]["key_figure"] == "installed 3 kernels; compiled here: 1 kernels"


_PRECOMPILE = r"""
import pathlib, sys
import torch, triton, triton.language as tl
from bench.cost_model.triton_compile import Config, Launch
from bench.triton_aot import cache, precompile, steps

@triton.jit
def double(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

launches = [Launch(double, (1,), (torch.empty(64, device="meta"), 64), {"BLOCK": b}) for b in (32, 64)]
precompile.gpu_facts = lambda: (90, 132)
steps.step_calls = lambda *args: {}
cache.plan = lambda *args: (
    {str(i): {"kernel": "double", "launch": l, "config": Config({}, 4, 3)} for i, l in enumerate(launches)},
    {},
)
lines = []
print(precompile.precompile(None, 2, log=lines.append))
print(lines[-1])
"""


def test_triton_aot_precompile_fills_the_cache_on_every_core(tmp_path):
    script = tmp_path / "precompile.py"
    script.write_text(_PRECOMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    failed, line = done.stdout.splitlines()[-2:]
    assert failed == "0" and line.startswith("triton cache: precompiled 2 kernels for sm_90a")
    assert "on 2 processes" in line
    assert len(list((tmp_path / "cache").glob("*/double.cubin"))) == 2


def test_triton_aot_probe_finds_verify_kernels_missing_from_an_empty_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = (
        "import pathlib, sys; from bench.triton_aot.__main__ import probe_line; "
        "print(probe_line(pathlib.Path(sys.argv[1]), 90, 132))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = done.stdout.splitlines()[-1]
    assert line.startswith("only 0 of the ") and line.endswith("kernels compile here")


@pytest.mark.parametrize(
    "caps, suffix",
    [
        ({}, ""),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, " (onednn<=avx2)"),
        (
            {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
            " (onednn<=avx2, mkl<=avx2)",
        ),
    ],
)
def test_isa_column_names_the_library_caps(monkeypatch, caps, suffix):
    # The tier a row ran on, with every cap that reached its GEMMs (part of the row's key).
    for variable in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(variable, raising=False)
    base = results.isa("cpu")
    for variable, value in caps.items():
        monkeypatch.setenv(variable, value)
    assert results.isa("cpu") == base + suffix


def test_sweeps_option_runs_only_the_named_sweeps(tmp_path, monkeypatch, capsys):
    from bench import __main__ as bench_main

    timed = []

    def measure(group, config, point, opts):
        timed.append(point.sweep)
        return [suites.measure_point_stub(u, config, point, opts, "skipped", "test") for u in group]

    monkeypatch.setattr(suites, "measure_points", measure)
    args = ["train", "--out", str(tmp_path), "--no-progress", "--quick", "--providers", "casa-cpu"]
    assert bench_main.main([*args, "--sweeps", "op-dataset,step-l"]) == 0
    assert set(timed) == {"op-dataset", "step-l"}
    assert bench_main.main([*args, "--sweeps", "n"]) == 2
    assert "--sweeps: train has none of ['n']" in capsys.readouterr().err


def test_inductor_cache_is_kept_apart_per_vector_tier(monkeypatch):
    from bench import __main__ as bench_main

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    bench_main._inductor_cache_per_tier()
    tier = torch.backends.cpu.get_cpu_capability().lower()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(f"_{tier}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen/by/the/user")
    bench_main._inductor_cache_per_tier()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen/by/the/user"
