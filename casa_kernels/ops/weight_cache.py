"""Weights prepared once per weight version (packed, re-laid out or cast), per backend.

A backend that needs its weights in another layout or dtype asks
:func:`cached` for them instead of preparing them on every call::

    packed = cached("cpu.tail", (w.dec2_weight, w.value_weight), lambda: pack(w))

An entry is keyed on the tag and the identity of the source tensors, and remembers
each source's *version*: its storage address and its autograd version counter. Any
in-place update (``optimizer.step()``, ``load_state_dict``, ``param.data = …``)
changes one of them, so the next call prepares the weights again and replaces the
entry; an entry is dropped as soon as one of its source tensors is freed, so the
cache never outlives the weights. Inference tensors (created under
``torch.inference_mode``) carry no version counter and are prepared on every call.

:func:`cache_bytes` is the memory the prepared tensors hold (``python -m
casa_kernels.info`` reports it).

Writes through an alias that has its own version counter (``p.data[...] = …``,
``p.detach().copy_(…)``) are invisible to the version check: call :func:`clear` after
them, or run such code inside :func:`disabled`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Prepared = TypeVar("Prepared")

_Key = tuple  # (tag, id(source) for each source)
_entries: dict[_Key, tuple[tuple, object]] = {}
_lock = threading.Lock()
_disabled_depth = 0


def _versions(sources: Sequence[torch.Tensor]) -> tuple | None:
    """Each source's version (the address of its first element, storage + offset, and its
    version counter); None where it is not to be cached: while tracing, inside
    :func:`disabled`, or for inference tensors (they have no version counter)."""
    if _disabled_depth or torch.compiler.is_compiling():
        return None
    try:  # one pass: this runs on every call of a backend, over up to 14 weights
        return tuple([(t.data_ptr(), t._version) for t in sources])
    except RuntimeError:  # "Inference tensors do not track version counter"
        if any(t.is_inference() for t in sources):
            return None
        raise


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


def cached(tag: str, sources: Sequence[torch.Tensor], prepare: Callable[[], Prepared]) -> Prepared:
    """``prepare()``, computed once per version of ``sources`` and tag.

    ``prepare`` must depend only on ``sources`` (and on constants named by ``tag``).
    Its result is computed without autograd history: use it for inference-time
    packing, not where gradients must flow back to the sources. A result may hold views
    of the sources, but a result holding a source tensor itself (``w.contiguous()`` of a
    contiguous ``w``) is not cached: the entry would keep its own source alive.
    """
    versions = _versions(sources)
    if versions is None:
        with torch.no_grad():
            return prepare()
    key = (tag, *map(id, sources))
    with _lock:
        entry = _entries.get(key)
    if entry is not None and entry[0] == versions:
        return entry[1]  # type: ignore[return-value]
    with torch.no_grad():
        value = prepare()
    if any(t is source for t in _tensors(value) for source in sources):
        return value  # holding a source itself would keep it alive: nothing to cache
    with _lock:
        if key not in _entries:
            # Drop the entry with the first of its sources to be freed.
            for t in sources:
                weakref.finalize(t, _entries.pop, key, None)
        _entries[key] = (versions, value)
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
        values = [value for _, value in _entries.values()]
    for value in values:
        for t in _tensors(value):
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            totals[t.device.type] = totals.get(t.device.type, 0) + storage.nbytes()
    return totals


def clear() -> None:
    """Drops every entry (tests; freeing memory by hand)."""
    with _lock:
        _entries.clear()
