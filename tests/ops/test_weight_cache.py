"""Weights prepared once per weight version (casa_kernels/ops/weight_cache.py)."""

import copy
import functools
import gc
import threading

import pytest
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


def test_not_cached_while_disabled_or_where_it_would_keep_its_source():
    weight_cache.clear()
    w = torch.randn(4)
    calls, prepare = _counting(w)
    with weight_cache.disabled():
        weight_cache.cached("t", (w,), prepare)
        weight_cache.cached("t", (w,), prepare)
    assert len(calls) == 2
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


# Every pattern that updates weights, through the cpu backend (the backend whose
# prepared weights the cache holds), compared with the reference on the same weights.


def _attention(seed=0):
    torch.manual_seed(seed)
    return ck.CASAAttention(n_vars=9, d_model=16, kernel=3, backend="cpu")


def _assert_serves_current_weights(module, x):
    with torch.no_grad():
        fused = module(x)
        expected = ck.casa_attention(x, module.weights(), backend="reference")
    torch.testing.assert_close(fused, expected, rtol=2e-5, atol=2e-5)


_OPTIMIZERS = {
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, fused=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=1e-1, foreach=True),
}


@pytest.mark.parametrize("optimizer", sorted(_OPTIMIZERS))
def test_twenty_training_steps_with_each_optimizer_match_the_reference(optimizer):
    # Fused optimizers leave the version counters alone; torch.optim's step hook is what
    # tells the cache. The training forward and the model after training must both be
    # the reference's on the weights of that moment.
    weight_cache.clear()
    module = _attention()
    twin = copy.deepcopy(module)
    twin.backend = "reference"
    opt, twin_opt = (
        _OPTIMIZERS[optimizer](module.parameters()),
        _OPTIMIZERS[optimizer](twin.parameters()),
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(3, 9, 16, generator=g)
        for m, o in ((module, opt), (twin, twin_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        _assert_serves_current_weights(module, x)
    x = torch.randn(3, 9, 16, generator=g)
    torch.testing.assert_close(module(x), twin(x), rtol=1e-4, atol=1e-5)


def test_an_optimizer_subclass_that_writes_through_data_is_seen():
    weight_cache.clear()

    class SignSGD(torch.optim.Optimizer):  # hand-written: bypasses the version counters
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.sub_(0.05 * p.grad.sign())

    module = _attention()
    opt = SignSGD(module.parameters())
    x = torch.randn(2, 9, 16)
    for _ in range(3):
        _assert_serves_current_weights(module, x)
        opt.zero_grad()
        module(x).sum().backward()
        opt.step()
    _assert_serves_current_weights(module, x)


def test_data_reassigned_to_freed_and_reused_memory_is_seen():
    # The memory-offload pattern: the storage is freed and new weights land in memory at
    # the address the old storage had; the version counter stays. The new storages are
    # made over one buffer, so the address is reused every time (an allocator may or may
    # not hand the same block back).
    weight_cache.clear()
    module = _attention()
    x = torch.randn(2, 9, 16)
    weight = module.score.decoder[4].weight
    shape, dtype = weight.shape, weight.dtype
    buffer = bytearray(weight.numel() * weight.element_size())

    def at_the_same_address(values):
        t = torch.frombuffer(buffer, dtype=dtype).view(shape)  # a new storage each time
        return t.copy_(values)

    weight.data = at_the_same_address(weight.detach().clone())
    addresses = set()
    for trial in range(10):
        _assert_serves_current_weights(module, x)
        fresh = torch.randn(shape, generator=torch.Generator().manual_seed(trial))
        weight.data = torch.empty(0)
        weight.data = at_the_same_address(fresh)
        addresses.add(weight.data_ptr())
    _assert_serves_current_weights(module, x)
    assert len(addresses) == 1


def test_load_state_dict_with_assign_is_seen():
    weight_cache.clear()
    module, other = _attention(0), _attention(1)
    x = torch.randn(2, 9, 16)
    _assert_serves_current_weights(module, x)
    module.load_state_dict(other.state_dict(), assign=True)
    _assert_serves_current_weights(module, x)
    with torch.no_grad():
        expected = other(x)
    torch.testing.assert_close(module(x).detach(), expected)


def test_in_place_updates_under_no_grad_and_init_are_seen():
    weight_cache.clear()
    module = _attention()
    x = torch.randn(2, 9, 16)
    _assert_serves_current_weights(module, x)
    with torch.no_grad():
        module.value.weight.mul_(2)
        module.score.encoder[0].bias.add_(0.5)
    _assert_serves_current_weights(module, x)
    torch.nn.init.normal_(module.score.decoder[4].weight)
    _assert_serves_current_weights(module, x)
    module.score.decoder[4].bias.detach().copy_(torch.linspace(-1, 1, 9))  # detach() shares
    _assert_serves_current_weights(module, x)


def test_vector_to_parameters_and_writes_to_its_vector_are_seen():
    # The parameters become views into one vector, written through the vector.
    weight_cache.clear()
    module = _attention()
    x = torch.randn(2, 9, 16)
    vector = torch.nn.utils.parameters_to_vector(module.parameters())
    _assert_serves_current_weights(module, x)
    torch.nn.utils.vector_to_parameters(vector * 0.5, module.parameters())
    _assert_serves_current_weights(module, x)
    flat = module.value.weight.untyped_storage()
    with torch.no_grad():
        torch.Tensor().set_(flat).view(torch.float32).mul_(-1)  # the vector, in place
    _assert_serves_current_weights(module, x)


def test_flat_parameter_views_updated_through_the_flat_buffer_are_seen():
    # FSDP-style: every parameter is a view of one flat buffer that the optimizer updates.
    weight_cache.clear()
    module = _attention()
    x = torch.randn(2, 9, 16)
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    _assert_serves_current_weights(module, x)
    flat.add_(torch.randn(flat.shape) * 0.1)
    _assert_serves_current_weights(module, x)


def test_weights_changed_from_another_thread_between_calls_are_seen():
    weight_cache.clear()
    module = _attention()
    x = torch.randn(2, 9, 16)

    def update():
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.9)

    for _ in range(3):
        _assert_serves_current_weights(module, x)
        worker = threading.Thread(target=update)
        worker.start()
        worker.join()
    _assert_serves_current_weights(module, x)


def test_writes_through_data_need_clear():
    # The documented limit: ``.data`` is an alias with its own version counter.
    weight_cache.clear()
    module = _attention()
    x = torch.randn(2, 9, 16)
    _assert_serves_current_weights(module, x)
    module.value.weight.data.mul_(2)
    weight_cache.clear()
    _assert_serves_current_weights(module, x)


def test_inference_tensor_weights_are_cached_and_a_load_into_them_is_seen():
    # Weights made under inference_mode have no version counter: cached by storage and
    # epoch (no per-call checks of the weights), and the modules' load_state_dict bumps it.
    weight_cache.clear()
    with torch.inference_mode():
        module, other = _attention(0), _attention(1)
        x = torch.randn(2, 9, 16)
        first = module(x)
        held = weight_cache.cache_bytes()["cpu"]
        calls = []
        original = weight_cache.cached

        def counting(tag, sources, prepare):
            return original(tag, sources, lambda: calls.append(tag) or prepare())

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ck.ops.backends.cpu, "cached", counting)
            torch.testing.assert_close(module(x), first)
            assert calls == [] and weight_cache.cache_bytes()["cpu"] == held
            module.load_state_dict(other.state_dict())  # copies into the inference tensors
            loaded = module(x)
            assert len(calls) == 1
        torch.testing.assert_close(loaded, other(x), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(
            loaded,
            ck.casa_attention(x, module.weights(), backend="reference"),
            rtol=2e-5,
            atol=2e-5,
        )
