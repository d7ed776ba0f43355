"""backend="auto" on the CPU with its one-time timed probe (casa_kernels/ops/probe.py): a
fused backend timed slower than the reference is passed over, with a warning naming the
times; the probe runs once per dtype, shape class, D, kernel, thread count and mode (a call
autograd records is timed forward and backward), on a size standing for the class,
invisible to dispatch modes. The suite runs with the probe off
(tests/conftest.py); these tests switch it on."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import casa_kernels as ck
from casa_kernels.ops import finite_weights, probe, registry
from casa_kernels.ops.registry import ProblemShape
from casa_kernels.ops.score_attention import attention_on_backend
from casa_kernels.tolerance import assert_close_to_reference, compare_gradient
from tests.ops import gradients

pytestmark = pytest.mark.skipif(
    registry.get_backend("cpu").reason_not_serving(torch.device("cpu"), torch.float32) is not None,
    reason="the cpu backend's kernels are not built",
)


@pytest.fixture
def probing(monkeypatch):
    """The probe switched on, with no probe run yet and no warning given yet."""
    monkeypatch.delenv(probe.ENV_VAR, raising=False)
    monkeypatch.setattr(probe, "_probes", {})
    monkeypatch.setattr(registry, "_warned", set())


@pytest.fixture
def timed(monkeypatch, probing):
    """Replaces the probe's timing by given medians; returns the list of timed sizes."""
    timings = {"fused": 1.0, "reference": 2.0}
    sizes = []

    def medians(runs):
        sizes.append(True)
        assert set(runs) == {"fused", "reference"}
        return dict(timings)

    monkeypatch.setattr(probe, "_median_times", medians)
    return timings, sizes


def test_a_fused_backend_timed_slower_is_passed_over_with_the_times_named(problem, timed):
    timings, _ = timed
    timings.update(fused=3.0, reference=1.5)
    x, w = problem(2, 50, 64, 3)
    with pytest.warns(UserWarning, match=r"cpu: slower than the reference here \(cpu 3 ms vs"):
        chosen = registry.resolve_backend("auto", x.device, x.dtype, ProblemShape.of(x, w))
    assert chosen.name == "reference"
    assert_close_to_reference(ck.casa_attention(x, w), x, w)


def test_a_fused_backend_timed_as_fast_is_kept(problem, timed):
    timings, _ = timed
    timings.update(fused=1.5, reference=1.5)  # a tie goes to the fused backend
    x, w = problem(2, 50, 64, 3)
    assert registry.resolve_backend("auto", x.device, x.dtype, ProblemShape.of(x, w)).name == "cpu"


def test_the_probe_runs_once_per_dtype_shape_class_and_thread_count(problem, timed):
    _, sizes = timed
    shape = ProblemShape(batch=4, n_vars=100, d_model=64, kernel=3)
    cpu = torch.device("cpu")
    registry.resolve_backend("auto", cpu, torch.float32, shape)
    registry.resolve_backend("auto", cpu, torch.float32, shape._replace(batch=16, n_vars=200))
    assert len(sizes) == 1  # same class: B > 1, 64 < N <= 512
    registry.resolve_backend("auto", cpu, torch.float32, shape._replace(batch=1))
    registry.resolve_backend("auto", cpu, torch.float32, shape._replace(n_vars=600))
    registry.resolve_backend("auto", cpu, torch.bfloat16, shape)
    registry.resolve_backend("auto", cpu, torch.float32, shape._replace(d_model=128))
    assert len(sizes) == 5
    caller_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        registry.resolve_backend("auto", cpu, torch.float32, shape)
    finally:
        torch.set_num_threads(caller_threads)
    assert len(sizes) == 6
    assert [p.key.split(", ")[-1] for p in probe.probes()][-1] == "1 threads"


def test_switched_off_by_the_environment(problem, timed, monkeypatch):
    timings, sizes = timed
    timings.update(fused=3.0, reference=1.0)
    monkeypatch.setenv(probe.ENV_VAR, "0")
    x, w = problem(2, 50, 64, 3)
    assert registry.resolve_backend("auto", x.device, x.dtype, ProblemShape.of(x, w)).name == "cpu"
    assert sizes == []


def test_an_explicit_backend_is_never_probed(problem, timed):
    timings, sizes = timed
    timings.update(fused=3.0, reference=1.0)
    x, w = problem(2, 50, 64, 3)
    assert registry.resolve_backend("cpu", x.device, x.dtype, ProblemShape.of(x, w)).name == "cpu"
    assert sizes == []


@pytest.mark.parametrize(
    "batch, n_vars, threads, size",
    [
        (1, 862, 2, (1, 862, 512)),
        (16, 862, 2, (2, 862, 512)),
        (16, 5000, 4, (4, 1024, 512)),
        (3, 7, 8, (3, 7, 512)),
    ],
)
def test_probe_size_stands_for_the_class(batch, n_vars, threads, size):
    shape = ProblemShape(batch=batch, n_vars=n_vars, d_model=512, kernel=3)
    assert probe.probe_size(shape, threads) == size


def test_a_real_probe_times_both_sides_and_is_invisible_to_dispatch_modes(problem, probing):
    x, w = problem(2, 40, 32, 3)
    with FlopCounterMode(display=False) as first:
        y = ck.casa_attention(x, w)
    with FlopCounterMode(display=False) as second:
        ck.casa_attention(x, w)
    assert first.get_total_flops() == second.get_total_flops()
    (found,) = probe.probes()
    assert found.backend == "cpu" and found.size == (2, 40, 32)
    assert found.fused_ms > 0 and found.reference_ms > 0
    assert_close_to_reference(y, x, w)


def test_info_names_each_probe_and_what_auto_runs(problem, timed):
    from casa_kernels import info

    timings, _ = timed
    timings.update(fused=3.0, reference=1.5)
    x, w = problem(1, 50, 64, 3)
    with pytest.warns(UserWarning):
        ck.casa_attention(x, w)
    (row,) = [value for key, value in info.report() if key == "auto on this CPU"]
    assert (
        row
        == "reference runs: cpu 3 ms vs reference 1.5 ms (forward) on [1, 50, 64] (float32, B=1 "
        "N<=64, D=64, k=3, " + f"{torch.get_num_threads()} threads)"
    )


def test_a_differentiated_call_is_probed_on_its_forward_and_backward(problem, probing, monkeypatch):
    # The fused backend wins the forward here and loses forward+backward: a call recorded by
    # autograd runs the reference (and its gradients), an inference call the fused backend.
    def run_probe(backend, dtype, size, kernel, training):
        return {"fused": 3.0 if training else 1.0, "reference": 2.0}

    monkeypatch.setattr(probe, "_run_probe", run_probe)
    x, w = problem(2, 50, 64, 3)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *w)]
    with pytest.warns(UserWarning, match=r"cpu 3 ms vs reference 2 ms \(forward\+backward\)"):
        _, chosen = attention_on_backend(leaves[0], ck.ScoreAttentionWeights(*leaves[1:]), "auto")
    assert chosen.name == "reference"
    with torch.no_grad():
        _, chosen = attention_on_backend(x, w, "auto")
    assert chosen.name == "cpu"
    assert [(p.training, p.fused_wins) for p in probe.probes()] == [(True, False), (False, True)]


def test_a_real_training_probe_inside_the_ops_autograd(problem, probing):
    # The op called directly with "auto" and gradients due: the probe's own forward and
    # backward run inside the op's autograd forward, and the gradients are the reference's.
    x, w = problem(2, 40, 32, 3)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *w)]
    grad = gradients.grad_out(x)
    ours = torch.autograd.grad(torch.ops.casa.score_attention(*leaves, "auto"), leaves, grad)
    (found,) = probe.probes()
    assert found.training and found.size == (2, 40, 32)
    assert found.fused_ms > 0 and found.reference_ms > 0
    want = gradients.reference_grads((x, *w), grad, torch.float64)
    for name, got, ref in zip(gradients.FIELDS, ours, want):
        result = compare_gradient(got, ref)
        assert result.passed, f"{name}: max abs {result.max_abs_error:.3g} ({result.rule})"


def test_each_fused_training_run_prepares_its_weights_again(problem, monkeypatch):
    # Training changes the weights at every step, so each of the training probe's fused runs
    # pays the preparation (here counted by the finiteness check, which runs in it), as a
    # step after the optimizer's does; the reference's runs prepare nothing.
    checks = []
    check = finite_weights._all_finite
    monkeypatch.setattr(finite_weights, "_all_finite", lambda ws: checks.append(1) or check(ws))
    x, w = problem(2, 40, 32, 3)
    runs = probe._training_runs(registry.get_backend("cpu"), x, w)
    for _ in range(3):
        runs["fused"]()
    assert len(checks) == 3
    runs["reference"]()
    assert len(checks) == 3
