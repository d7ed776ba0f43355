"""The stages a variate-parallel forward runs: fused ones take their gradients from the reference."""

import dataclasses
import warnings

import torch

from casa_kernels.distributed.stages import resolve_stages, with_reference_gradient
from casa_kernels.ops import registry
from casa_kernels.reference import stages as ref


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_wrapped_stages_give_the_reference_values_and_gradients(problem):
    x, w = problem(2, 5, 16, 3, dtype=torch.float64)
    wrapped = with_reference_gradient(registry.get_backend("reference").stages)
    results = []
    for stages in (registry.get_backend("reference").stages, wrapped):
        xl, *wl = _leaves(x, *w)
        wl = type(w)(*wl)
        h5 = stages.bottleneck(stages.head_partial(xl, wl.enc0_weight), wl)
        m, s = stages.tail_stats(xl, h5, wl.dec2_weight, wl.dec2_bias)
        y = stages.tail_output(
            xl, h5, wl.dec2_weight, wl.dec2_bias, wl.value_weight, wl.value_bias, m, s
        )
        (y.square().sum() + s.sum() + m.sum()).backward()
        results.append((y, [xl.grad, *(t.grad for t in wl)]))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_a_backend_without_stages_falls_back_to_the_reference_with_a_warning(monkeypatch):
    no_stages = dataclasses.replace(
        registry.get_backend("reference"), name="no-stages", stages=None
    )
    monkeypatch.setitem(registry._BACKENDS, "no-stages", no_stages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name, stages = resolve_stages("no-stages", torch.device("cpu"), torch.float32)
    assert name == "reference" and stages is registry.get_backend("reference").stages
    assert any("'no-stages' has no stages" in str(w.message) for w in caught)


def test_a_fused_backends_stages_are_wrapped(monkeypatch):
    fused = dataclasses.replace(registry.get_backend("reference"), name="fused-standin")
    monkeypatch.setitem(registry._BACKENDS, "fused-standin", fused)
    name, stages = resolve_stages("fused-standin", torch.device("cpu"), torch.float32)
    assert name == "fused-standin" and stages.head_partial is not ref.head_partial
