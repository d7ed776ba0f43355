"""``python -m casa_kernels.verify`` run in-process: passes on working backends, fails on a broken one."""

import dataclasses

import pytest
import torch

from casa_kernels import reference, verify
from casa_kernels.ops import registry


def test_verify_passes_on_available_backends(capsys):
    names = [
        n
        for n, reason in registry.availability().items()
        if n in ("reference", "cpu") and reason is None
    ]
    assert verify.main(["--device", "cpu", "--backends", ",".join(names), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out.split("backend    dtype")[1]


def _broken_forward(x, weights):
    return reference.score_attention(x, weights) + 1e-2


@pytest.fixture
def broken_backend(monkeypatch):
    """A registered backend 'broken' whose forward is the reference plus 1e-2."""
    base = registry.get_backend("reference")
    broken = dataclasses.replace(
        base, name="broken", device_types=frozenset({"cpu"}), forward=_broken_forward
    )
    monkeypatch.setitem(registry._BACKENDS, "broken", broken)
    return "broken"


def test_verify_fails_on_a_broken_backend(broken_backend, capsys):
    assert verify.main(["--device", "cpu", "--backends", broken_backend, "--quick"]) == 1
    rows = [
        line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("broken ")
    ]
    full_precision = [r for r in rows if r[1] in ("float32", "float64")]
    assert len(full_precision) == 2 * len(verify.QUICK_CASES)
    # 1e-2 is far outside the fp32/fp64 tolerance, and outside the low-precision one too: its
    # eps scales with y and y's attention term (an absolute eps of 3e-2 used to absorb it).
    assert len(rows) > len(full_precision) and all("FAIL" in r for r in rows)


def test_verify_fails_when_an_existing_backend_breaks(monkeypatch, capsys):
    if registry.availability().get("cpu") is not None:
        pytest.skip(f"cpu backend unavailable: {registry.availability().get('cpu')}")
    cpu = registry.get_backend("cpu")
    monkeypatch.setitem(
        registry._BACKENDS,
        "cpu",
        dataclasses.replace(cpu, forward=lambda x, w: cpu.forward(x, w) + 1e-2),
    )
    assert verify.main(["--device", "cpu", "--backends", "cpu", "--quick"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_reports_a_crashing_backend_as_failure(monkeypatch, capsys):
    def crash(x, w):
        raise RuntimeError("kernel exploded")

    broken = dataclasses.replace(registry.get_backend("reference"), name="crash", forward=crash)
    monkeypatch.setitem(registry._BACKENDS, "crash", broken)
    assert verify.main(["--device", "cpu", "--backends", "crash", "--quick"]) == 1
    assert "kernel exploded" in capsys.readouterr().out


def test_verify_rejects_unknown_backend():
    assert verify.main(["--device", "cpu", "--backends", "nonexistent"]) == 2


def test_verify_cases_cover_the_required_shapes():
    cases = verify.CASES
    assert {c.n_vars for c in cases} >= {1, 7, 37, 130}
    assert {c.d_model for c in cases} >= {8, 24, 64, 128}
    assert {c.kernel for c in cases} >= {1, 3, 5, 7}
    assert {c.batch for c in cases} >= {1, 3}
    assert any(not c.contiguous for c in cases)
    x, _ = verify.make_inputs(next(c for c in cases if not c.contiguous), torch.float32, "cpu")
    assert not x.is_contiguous()
