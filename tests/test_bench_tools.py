"""The benchmark machinery's logic (no timings asserted): CSV upsert, slopes, crossover,
allocator-based memory measurement, time cap, stop-growing after oom."""

import math
import time

import pytest
import torch

import casa_kernels
from bench import measure, providers, results, suites, summary
from casa_kernels.ops import registry


def _row(**kw):
    base = {c: "" for c in results.KEY_COLUMNS}
    base.update(suite="scaling", sweep="n", provider="casa-cpu", device="cpu", device_name="X",
                dtype="float32", batch=1, d_model=512, status="ok")
    base.update(kw)
    return base


def test_upsert_replaces_rows_with_the_same_key_and_keeps_others(tmp_path):
    path = tmp_path / "scaling.csv"
    results.upsert_rows(path, [_row(n_vars=8, latency_ms_p50=1.0), _row(n_vars=16, latency_ms_p50=2.0)])
    results.upsert_rows(path, [_row(n_vars=8, latency_ms_p50=5.0), _row(n_vars=32, latency_ms_p50=3.0)])
    rows = results.read_rows(path)
    assert sorted((int(r["n_vars"]), float(r["latency_ms_p50"])) for r in rows) == [(8, 5.0), (16, 2.0), (32, 3.0)]
    # a different version is a different key: kept side by side
    results.upsert_rows(path, [_row(n_vars=8, torch_version="9.9", latency_ms_p50=7.0)])
    assert len(results.read_rows(path)) == 4


def test_slug_is_filesystem_safe():
    assert results.slug("Intel(R) Xeon(R) Processor @ 2.0GHz") == "intel-r-xeon-r-processor-2-0ghz"
    assert results.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_fit_slope_recovers_power_laws():
    ns = [256, 512, 1024, 2048]
    assert summary.fit_slope(ns, [3 * n for n in ns]) == pytest.approx(1.0)
    assert summary.fit_slope(ns, [0.5 * n**2 for n in ns]) == pytest.approx(2.0)
    assert summary.fit_slope([256], [1.0]) is None


def test_overtake_is_the_smallest_n_from_which_casa_stays_faster():
    casa = [_row(n_vars=n, latency_ms_p50=t) for n, t in ((256, 10), (512, 5), (1024, 30), (2048, 40), (4096, 50))]
    full = [_row(provider="full-einsum", n_vars=n, latency_ms_p50=t) for n, t in ((256, 1), (512, 6), (1024, 20), (2048, 80))]
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


def test_percentile_interpolates():
    assert measure.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert measure.percentile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert math.isnan(measure.percentile([], 0.5))


def test_provider_over_mem_cap_is_oom_and_stops_growing(tmp_path):
    opts = suites.RunOptions(device="cpu", dtype=torch.float32, warmup=1, reps=1, time_cap_s=60,
                             mem_cap_bytes=1 << 20, out_dir=tmp_path, quick=True, batches=[1])
    einsum = providers.PROVIDERS["full-einsum"]
    big = providers.Point("scaling", "n", 1, 4096, 512)
    row = suites.measure_point(einsum, "N=4096", big, opts)
    assert row["status"] == "oom" and "mem-cap" in row["note"]


def test_every_backend_is_a_provider():
    # The providers come from the registry: registering a backend adds casa-<name>.
    casa = [name for name in providers.PROVIDERS if name.startswith("casa-")]
    assert casa == [f"casa-{b}" for b in casa_kernels.backend_names()] + ["casa-compile"]


def test_backends_auto_never_picks_on_cpu_are_skipped_there():
    for name in casa_kernels.backend_names():
        reason = providers.PROVIDERS[f"casa-{name}"].unavailable("cpu", torch.float32)
        if name not in registry.auto_order("cpu"):
            assert reason  # never crashes, always says why


def test_unknown_provider_is_rejected():
    with pytest.raises(SystemExit):
        providers.select("casa-reference,nope")


def test_a_provider_stops_growing_after_oom_while_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "measure_peak_memory", lambda fn, device: (0, "not measured (test)"))
    built = []

    def build(point, device, dtype):
        built.append((point.sweep, point.n_vars))
        if point.sweep == "n" and point.n_vars >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return lambda: torch.zeros(1)

    fake = providers.Provider("full-fake", "full", build, lambda d, t: None, lambda p, t: 0)
    fine = providers.Provider("casa-fake", "casa", lambda p, d, t: (lambda: torch.zeros(1)),
                              lambda d, t: None, lambda p, t: 0)
    opts = suites.RunOptions(device="cpu", dtype=torch.float32, warmup=1, reps=1, time_cap_s=60,
                             mem_cap_bytes=1 << 40, out_dir=tmp_path, quick=True, batches=[1])
    rows = suites.run_suite("scaling", [fake, fine], opts, progress=False)
    n_rows = {(r["provider"], r["n_vars"]): r for r in rows if r["sweep"] == "n"}
    assert n_rows[("full-fake", 32)]["status"] == "ok"
    assert n_rows[("full-fake", 64)]["status"] == "oom"
    assert n_rows[("full-fake", 128)]["note"].startswith("not run")
    assert ("n", 128) not in built
    assert all(n_rows[("casa-fake", n)]["status"] == "ok" for n in (64, 128, 4096))
    assert len(results.read_rows(tmp_path / "scaling.csv")) == len(rows)
