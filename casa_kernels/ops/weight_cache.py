"""Weights prepared once per weight version (packed, re-laid out or cast), per backend.

A backend that needs its weights in another layout or dtype asks
:func:`cached` for them instead of preparing them on every call::

    packed = cached("cpu.tail", (w.dec2_weight, w.value_weight), lambda: pack(w))

An entry is keyed on the tag and the identity of the source tensors and stamped with
what can change under them (docs/design.md §9 lists what is and is not detected):

* each source's storage (the storage object itself, held weakly: ``param.data = …`` to
  new memory, even memory at the address the old storage had, is a new storage), the
  address of its first element, and its autograd version counter (any in-place update of
  the tensor or of a view or ``detach()`` of it: ``load_state_dict``, ``torch.no_grad()``
  updates, ``nn.init``);
* the *optimizer epoch*: every ``torch.optim.Optimizer.step()`` (fused, foreach and
  subclasses alike: torch.optim's global step hook) drops every entry's validity, since
  fused optimizers update parameters without touching their version counters.

Inference tensors (made under ``torch.inference_mode``) have no version counter: they are
stamped by storage, address and epoch, and the modules' ``load_state_dict`` bumps the
epoch (:func:`invalidate`). Sources that cannot be stamped are prepared on every call:
views into a larger storage (``vector_to_parameters``, flat-parameter wrappers such as
FSDP's: their storage is written through aliases whose version counters are their own),
and everything while tracing or inside :func:`disabled`. An entry is dropped as soon as
one of its source tensors is freed, so the cache never outlives the weights.

Not detected: writes through ``param.data`` (``param.data.copy_(…)``: ``.data`` is an
alias with a version counter of its own), other in-place writes to inference tensors,
and writes from outside PyTorch (NumPy views, DLPack). Call :func:`clear` after them, or
run such code inside :func:`disabled`.

:func:`cache_bytes` is the memory the prepared tensors hold (``python -m
casa_kernels.info`` reports it).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

Prepared = TypeVar("Prepared")

_Key = tuple  # (tag, id(source) for each source)
_Stamp = tuple  # (optimizer epoch, (data_ptr, version) per source)
# key -> (stamp, weak references to the sources' storages, prepared value)
_entries: dict[_Key, tuple[_Stamp, tuple[weakref.ref, ...], object]] = {}
_lock = threading.Lock()
_disabled_depth = 0
_optimizer_steps = itertools.count()
_epoch = next(_optimizer_steps)


def invalidate() -> None:
    """Makes every entry stale (each is prepared again at its next use): called after every
    optimizer step and by the modules' ``load_state_dict``, for writes that version counters
    do not see."""
    global _epoch
    _epoch = next(_optimizer_steps)


register_optimizer_step_post_hook(lambda optimizer, args, kwargs: invalidate())


def _owns_storage(t: torch.Tensor, storage: torch.UntypedStorage) -> bool:
    """Whether ``t`` is the whole of its storage (not a view into a flat buffer)."""
    return t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()


def _stamp(sources: Sequence[torch.Tensor]) -> tuple[_Stamp, list] | None:
    """The sources' stamp and storages; None where they are not to be cached: while
    tracing and inside :func:`disabled`. An inference tensor has no version counter: its
    stamp is its storage and address, and the epoch (:func:`invalidate`)."""
    if _disabled_depth or torch.compiler.is_compiling():
        return None
    epoch = _epoch  # read before the sources: a step racing this call invalidates the entry
    storages = [t.untyped_storage() for t in sources]
    try:  # one pass: this runs on every call of a backend, over up to 14 weights
        stamp = tuple([(t.data_ptr(), t._version) for t in sources])
    except RuntimeError:  # "Inference tensors do not track version counter"
        if not any(t.is_inference() for t in sources):
            raise
        stamp = tuple([(t.data_ptr(), None if t.is_inference() else t._version) for t in sources])
    return (epoch, stamp), storages


@contextlib.contextmanager
def disabled():
    """Prepares on every call while active: for code that writes weights through aliases
    the version counter does not see (``torch.autograd.gradcheck`` perturbs ``.data``)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def _valid(entry, stamp: _Stamp, storages: list) -> bool:
    held_stamp, held_storages, _ = entry
    return held_stamp == stamp and all(
        ref() is storage for ref, storage in zip(held_storages, storages)
    )


def cached(tag: str, sources: Sequence[torch.Tensor], prepare: Callable[[], Prepared]) -> Prepared:
    """``prepare()``, computed once per version of ``sources`` and tag.

    ``prepare`` must depend only on ``sources`` (and on constants named by ``tag``).
    Its result is computed without autograd history: use it for inference-time
    packing, not where gradients must flow back to the sources. A result may hold views
    of the sources, but a result holding a source tensor itself (``w.contiguous()`` of a
    contiguous ``w``) is not cached: the entry would keep its own source alive.
    """
    stamped = _stamp(sources)
    if stamped is None:
        with torch.no_grad():
            return prepare()
    stamp, storages = stamped
    key = (tag, *map(id, sources))
    with _lock:
        entry = _entries.get(key)
    if entry is not None and _valid(entry, stamp, storages):
        return entry[2]  # type: ignore[return-value]
    with torch.no_grad():
        value = prepare()
    if any(t is source for t in _tensors(value) for source in sources):
        return value  # holding a source itself would keep it alive: nothing to cache
    if not all(map(_owns_storage, sources, storages)):
        return value  # a view into a flat buffer, written through aliases: not cached
    refs = tuple(map(weakref.ref, storages))
    with _lock:
        if key not in _entries:
            # Drop the entry with the first of its sources to be freed.
            for t in sources:
                weakref.finalize(t, _entries.pop, key, None)
        _entries[key] = (stamp, refs, value)
    return value


def _tensors(value: object):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def cache_bytes() -> dict[str, int]:
    """Bytes held by prepared weights, per device type (``{"cpu": …, "cuda": …}``)."""
    totals: dict[str, int] = {}
    seen: set[int] = set()
    with _lock:
        values = [value for _, _, value in _entries.values()]
    for value in values:
        for t in _tensors(value):
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            totals[t.device.type] = totals.get(t.device.type, 0) + storage.nbytes()
    return totals


def clear() -> None:
    """Drops every entry (after writes the cache cannot see; freeing memory by hand)."""
    with _lock:
        _entries.clear()
