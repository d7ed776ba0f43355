"""``auto`` on a GPU: a fused backend only where figures measured on that GPU model show it
faster than the reference (casa_kernels/ops/measured.py, docs/design.md §6)."""

import json
import warnings

import pytest
import torch

from casa_kernels import reference
from casa_kernels.ops import measured, registry

GPU = torch.device("cuda:0")


def _row(provider, batch, n_vars, p50, *, device="cuda:0", status="ok", dtype="bfloat16"):
    return dict(
        suite="attention",
        provider=provider,
        device=device,
        device_name="Fake GPU",
        dtype=dtype,
        batch=str(batch),
        n_vars=str(n_vars),
        d_model="512",
        kernel="3",
        latency_ms_p50=str(p50),
        status=status,
    )


def test_speedups_are_the_smallest_over_the_class_and_leave_out_what_did_not_run():
    rows = [
        _row("casa-reference", 16, 137, 1.0),
        _row("casa-triton", 16, 137, 0.5),  # 2x
        _row("casa-cuda", 16, 137, 2.0),  # 0.5x
        _row("casa-reference", 16, 321, 2.0),
        _row("casa-triton", 16, 321, 1.6),  # 1.25x: the class's figure
        _row("casa-cuda", 16, 321, 0.1, status="timeout"),
        _row("casa-compile", 16, 321, 0.1),  # not a backend
        _row("casa-reference", 16, 862, 1.0, device="cpu"),  # not a GPU
        _row("casa-triton", 16, 862, 0.5, device="cpu"),
        _row("casa-triton", 1, 7, 0.5),  # no reference measured beside it
    ]
    devices = measured.speedups_from_rows(rows, "bench/results/fake-gpu/attention.csv")
    assert devices == {
        "Fake GPU": {
            "bfloat16": {
                "B>1 N<=512": {
                    "speedups": {"triton": 1.25, "cuda": 0.5},
                    "source": "bench/results/fake-gpu/attention.csv",
                }
            }
        }
    }


def test_shape_classes():
    assert measured.shape_class(16, 862) == "B>1 N>512"
    assert measured.shape_class(1, 7) == "B=1 N<=64"
    assert measured.shape_class(3, 64) == "B>1 N<=64"
    assert measured.shape_class(1, 513) == "B=1 N>512"


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Two fused backends on a fake GPU named "Fake GPU", and a figures file of our own."""
    monkeypatch.delenv("CASA_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_warned", set())
    monkeypatch.setattr(registry, "_cuda_device_name", lambda index: "Fake GPU")
    monkeypatch.setattr(measured, "FIGURES", tmp_path / "measured_speedups.json")
    measured._figures.cache_clear()
    measured._decision.cache_clear()
    for name, priority in (("triton", 2), ("cuda", 1)):
        registry.register_backend(
            registry.Backend(
                name=name,
                device_types=frozenset({"cuda"}),
                dtypes=frozenset({torch.bfloat16}),
                forward=reference.score_attention,
                unavailable_reason=lambda: None,
                auto_priority={"cuda": priority},
            )
        )
    yield measured.FIGURES
    measured._figures.cache_clear()
    measured._decision.cache_clear()


TRAFFIC = registry.ProblemShape(16, 862, 512, 3)


def test_without_figures_auto_runs_the_reference_and_says_why(fake_gpu):
    with pytest.warns(
        UserWarning, match=r"no figures measured on Fake GPU for bfloat16 at B>1 N>512"
    ):
        assert registry.resolve_backend("auto", GPU, torch.bfloat16, TRAFFIC).name == "reference"
    assert registry.resolve_backend("triton", GPU, torch.bfloat16, TRAFFIC).name == "triton"


def test_with_figures_auto_runs_the_fastest_backend_measured_faster(fake_gpu, monkeypatch):
    speedups = {"triton": 1.8, "cuda": 2.5}
    entry = {"speedups": speedups, "source": "bench/results/fake-gpu/attention.csv"}
    measured.merge_into(fake_gpu, {"Fake GPU": {"bfloat16": {"B>1 N>512": entry}}})
    assert json.loads(fake_gpu.read_text())["devices"]["Fake GPU"]["bfloat16"]["B>1 N>512"] == entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.resolve_backend("auto", GPU, torch.bfloat16, TRAFFIC).name == "cuda"
    # Another class on the same GPU has no figures: the reference.
    with pytest.warns(UserWarning, match=r"at B=1 N>512"):
        one = registry.ProblemShape(1, 862, 512, 3)
        assert registry.resolve_backend("auto", GPU, torch.bfloat16, one).name == "reference"
    # A backend measured slower is never picked by auto, only by name or CASA_BACKEND.
    speedups["cuda"] = 0.9
    measured.merge_into(fake_gpu, {"Fake GPU": {"bfloat16": {"B>1 N>512": entry}}})
    assert registry.resolve_backend("auto", GPU, torch.bfloat16, TRAFFIC).name == "triton"
    monkeypatch.setenv("CASA_BACKEND", "cuda")
    assert registry.resolve_backend("auto", GPU, torch.bfloat16, TRAFFIC).name == "cuda"


def test_the_fallback_warning_names_the_figures_that_decided(fake_gpu):
    entry = {"speedups": {"triton": 0.7, "cuda": 0.4}, "source": "bench/results/x/attention.csv"}
    measured.merge_into(fake_gpu, {"Fake GPU": {"bfloat16": {"B>1 N>512": entry}}})
    with pytest.warns(UserWarning) as caught:
        assert registry.resolve_backend("auto", GPU, torch.bfloat16, TRAFFIC).name == "reference"
    message = str(caught[0].message)
    assert "triton: not measured faster than the reference here" in message
    assert "cuda 0.40x, triton 0.70x the reference (bench/results/x/attention.csv)" in message
