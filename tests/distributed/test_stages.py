"""The stages a variate-parallel forward runs: a fused backend's take their gradients from the reference."""

import dataclasses
import warnings

import pytest
import torch

from casa_kernels import reference
from casa_kernels.distributed.stages import resolve_stages, with_reference_gradient
from casa_kernels.ops import registry
from casa_kernels.ops.registry import Stages

from .scenarios import upper_bound_tail_stats

REFERENCE_STAGES = registry.get_backend("reference").stages


def attention_by_stages(stages: Stages, x, w):
    """The attention composed as on one rank of a variate-parallel forward (the merge of one rank's
    statistics: the global maximum is its own, detached)."""
    h5 = stages.bottleneck(stages.head_partial(x, w.enc0_weight), w)
    col_max, col_sum = stages.tail_stats(x, h5, w.dec2_weight, w.dec2_bias)
    global_max = col_max.detach()
    global_sum = col_sum * torch.exp(col_max - global_max)
    return stages.tail_output(
        x, h5, w.dec2_weight, w.dec2_bias, w.value_weight, w.value_bias, global_max, global_sum
    )


@pytest.mark.parametrize(
    "stages",
    [
        REFERENCE_STAGES,
        with_reference_gradient(REFERENCE_STAGES),
        with_reference_gradient(REFERENCE_STAGES._replace(tail_stats=upper_bound_tail_stats)),
    ],
    ids=["reference", "wrapped", "wrapped-upper-bound-shift"],
)
def test_stages_give_the_reference_values_and_gradients(problem, stages):
    x, w = problem(2, 5, 16, 3, dtype=torch.float64)
    weights = torch.randn(2, 5, 16, dtype=torch.float64)
    results = []
    for attention in (reference.score_attention, lambda x, w: attention_by_stages(stages, x, w)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *w)]
        y = attention(leaves[0], type(w)(*leaves[1:]))
        (y * weights).sum().backward()
        results.append((y, [t.grad for t in leaves]))
    (expected, expected_grads), (got, grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", *w._fields), expected_grads, grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_a_backend_without_stages_falls_back_to_the_reference_with_a_warning(monkeypatch):
    no_stages = dataclasses.replace(
        registry.get_backend("reference"), name="no-stages", stages=None
    )
    monkeypatch.setitem(registry._BACKENDS, "no-stages", no_stages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name, stages = resolve_stages("no-stages", torch.device("cpu"), torch.float32)
    assert name == "reference" and stages is REFERENCE_STAGES
    assert any("'no-stages' has no stages" in str(w.message) for w in caught)


def test_a_fused_backends_stages_are_wrapped(monkeypatch):
    fused = dataclasses.replace(registry.get_backend("reference"), name="fused-standin")
    monkeypatch.setitem(registry._BACKENDS, "fused-standin", fused)
    name, stages = resolve_stages("fused-standin", torch.device("cpu"), torch.float32)
    assert name == "fused-standin" and stages.head_partial is not REFERENCE_STAGES.head_partial
