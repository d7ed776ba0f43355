"""``python -m casa_kernels.verify`` run in-process: passes on working backends, fails on a broken one."""

import dataclasses
import re
from pathlib import Path

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


def _cpu_constant(name: str) -> int:
    """The value of ``constexpr int64_t <name> = <value>;`` in csrc/cpu."""
    sources = Path(__file__).resolve().parents[1].glob("csrc/cpu/*.cpp")
    pattern = re.compile(rf"constexpr int64_t {name} = (\d+);")
    values = [int(m.group(1)) for p in sources for m in pattern.finditer(p.read_text())]
    assert len(values) == 1, f"{name}: expected one definition in csrc/cpu, found {values}"
    return values[0]


def test_verify_cases_split_the_head_over_n():
    # The CPU's head reduces N in chunks of at most kHeadChunk rows, shared by up to
    # ⌈threads / B⌉ worker groups whose partial sums are then added; Triton's in split-K
    # programs (head_splits). verify must reach each: chunks in several groups (B = 1,
    # N past one chunk) and several chunks per group (more chunks than groups, up to 24
    # threads), not only the single-chunk head.
    attention = [c for c in verify.CASES if not c.block]
    chunk = _cpu_constant("kHeadChunk")
    assert any(c.n_vars > chunk and c.batch == 1 for c in attention)
    assert any(c.n_vars > 3 * chunk and c.batch >= 8 for c in attention)
    if registry.availability().get("triton") is None:
        from casa_kernels.ops.triton_kernels import head_splits

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        assert any(head_splits(c.batch, c.n_vars, c.d_model, device) > 1 for c in attention)


def test_verify_passes_the_head_split_cases():
    # verify's cases past one head chunk, on the reference and the cpu backend (where
    # available): a kernel that drops or double-counts a chunk or a group's sum fails here.
    chunk = _cpu_constant("kHeadChunk")
    cases = [c for c in verify.CASES if c.n_vars > chunk and not c.block]
    names = [n for n in ("reference", "cpu") if registry.availability().get(n) is None]
    outcomes = verify.verify(names, "cpu", cases)
    assert len(outcomes) == len(names) * len(verify.DTYPES["cpu"]) * len(cases)
    assert all(o.verdict == "PASS" for o in outcomes), [o for o in outcomes if o.verdict != "PASS"]


@pytest.fixture
def block_case():
    return next(c for c in verify.CASES if c.block)


def _wrap_cpu_epilogue(monkeypatch, wrap):
    """Replaces the cpu backend's block epilogue ``run`` by ``wrap(run)``."""
    if registry.availability().get("cpu") is not None:
        pytest.skip(f"cpu backend unavailable: {registry.availability().get('cpu')}")
    cpu = registry.get_backend("cpu")
    epilogue = cpu.block_epilogue._replace(run=wrap(cpu.block_epilogue.run))
    monkeypatch.setitem(
        registry._BACKENDS, "cpu", dataclasses.replace(cpu, block_epilogue=epilogue)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_block_case_runs_the_fused_epilogue(monkeypatch, block_case, dtype):
    calls = []
    _wrap_cpu_epilogue(monkeypatch, lambda run: lambda *a: calls.append(1) or run(*a))
    outcome = verify.run_case("cpu", dtype, block_case, "cpu")
    assert calls and outcome.verdict == "PASS", outcome
    assert block_case.batch * block_case.n_vars > 64  # past one 64-row block of the epilogue


def test_verify_block_case_fails_on_a_broken_epilogue(monkeypatch, block_case):
    _wrap_cpu_epilogue(monkeypatch, lambda run: lambda *a: run(*a) + 1e-2)
    outcome = verify.run_case("cpu", torch.float32, block_case, "cpu")
    assert outcome.verdict == "FAIL" and "block" in outcome.case, outcome
