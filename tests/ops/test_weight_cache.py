"""Weights prepared once per weight version (casa_kernels/ops/weight_cache.py)."""

import functools
import gc

import torch

import casa_kernels as ck
from casa_kernels.info import report
from casa_kernels.ops import weight_cache

from ..conftest import make_problem


def _counting(source):
    calls = []

    def prepare():
        calls.append(1)
        return source.detach() * 2

    return calls, prepare


def test_prepared_once_per_version_and_again_after_each_kind_of_update():
    weight_cache.clear()
    w = torch.nn.Parameter(torch.randn(4, 4))
    calls, prepare = _counting(w)
    first = weight_cache.cached("t", (w,), prepare)
    assert weight_cache.cached("t", (w,), prepare) is first and len(calls) == 1
    with torch.no_grad():
        w.mul_(3)  # optimizer.step()-style in-place update
    assert torch.equal(weight_cache.cached("t", (w,), prepare), w.detach() * 2) and len(calls) == 2
    module = torch.nn.Linear(4, 4)
    module.weight = w
    module.load_state_dict({"weight": torch.ones(4, 4), "bias": torch.zeros(4)})
    assert torch.equal(weight_cache.cached("t", (w,), prepare), torch.full((4, 4), 2.0))
    w.data = torch.zeros(4, 4)  # new storage
    assert (
        torch.equal(weight_cache.cached("t", (w,), prepare), torch.zeros(4, 4)) and len(calls) == 4
    )


def test_entries_die_with_their_weights_and_are_counted():
    weight_cache.clear()
    w = torch.randn(256, 256)
    weight_cache.cached("t", (w,), functools.partial(torch.mul, w, 2))
    assert weight_cache.cache_bytes() == {"cpu": 256 * 256 * 4}
    del w
    gc.collect()
    assert weight_cache.cache_bytes() == {}


def test_not_cached_where_versions_cannot_be_tracked():
    weight_cache.clear()
    w = torch.randn(4)
    calls, prepare = _counting(w)
    with weight_cache.disabled():
        weight_cache.cached("t", (w,), prepare)
        weight_cache.cached("t", (w,), prepare)
    assert len(calls) == 2
    with torch.inference_mode():
        frozen = torch.randn(4)  # an inference tensor has no version counter
        weight_cache.cached("t", (frozen,), prepare)
        weight_cache.cached("t", (frozen,), prepare)
    assert len(calls) == 4
    # A result holding the source itself would keep it alive: prepared, not kept.
    weight_cache.cached("t", (w,), lambda: w)
    assert weight_cache.cache_bytes() == {}


def test_the_cpu_backend_prepares_once_and_sees_updates():
    weight_cache.clear()
    x, w = make_problem(2, 9, 16, 3)
    before = ck.casa_attention(x, w, backend="cpu")
    held = weight_cache.cache_bytes()["cpu"]
    assert held > 0 and any("MiB" in value for key, value in report() if key.startswith("prepared"))
    ck.casa_attention(x, w, backend="cpu")
    assert weight_cache.cache_bytes()["cpu"] == held  # nothing prepared again
    with torch.no_grad():
        w.dec2_weight.mul_(-1)
        w.value_weight.mul_(0.5)
    after = ck.casa_attention(x, w, backend="cpu")
    torch.testing.assert_close(
        after, ck.casa_attention(x, w, backend="reference"), rtol=2e-5, atol=2e-5
    )
    assert not torch.allclose(after, before)
