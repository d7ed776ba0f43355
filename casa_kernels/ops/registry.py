"""Backends of ``casa::score_attention`` and how one is chosen (DESIGN §6).

Each backend declares the devices and dtypes it serves, a forward function on
already-validated inputs, and a reason when it is unavailable. ``resolve_backend``
turns the user's ``backend=`` argument (or ``CASA_BACKEND``) into one backend:

* ``"auto"`` takes the first backend in ``AUTO_ORDER`` for the tensor's device that
  serves it; when that ends on ``"reference"`` while a faster backend exists for the
  device, it warns once, naming each skipped backend's reason.
* an explicit name that cannot serve the tensor raises, listing every backend's reason.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..weights import ScoreAttentionWeights

ForwardFn = Callable[[torch.Tensor, ScoreAttentionWeights], torch.Tensor]


class Stages(NamedTuple):
    """A backend's implementation of the four stages of the op (contract and reference:
    :mod:`casa_kernels.reference.stages`), used where the variates are split over processes."""

    head_partial: Callable[..., torch.Tensor]
    bottleneck: Callable[..., torch.Tensor]
    tail_stats: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    tail_output: Callable[..., torch.Tensor]

ENV_VAR = "CASA_BACKEND"

# Preference of "auto" per device type, fastest first; "reference" serves anything.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    forward: ForwardFn
    unavailable_reason: Callable[[], str | None]
    """Returns None when the backend can run here, else why not (checked lazily)."""
    stages: Stages | None = None
    """The op split into stages, for variate parallelism; None where the backend has none."""

    def reason_not_serving(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this backend can run on ``device``/``dtype``, else the reason."""
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if device.type not in self.device_types:
            return f"runs on {sorted(self.device_types)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"supports dtypes {names}, not {str(dtype).removeprefix('torch.')}"
        return None


_BACKENDS: dict[str, Backend] = {}
_warned: set[str] = set()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"backend: expected one of {['auto', *_BACKENDS]}, received {name!r}"
        ) from None


def availability() -> dict[str, str | None]:
    """Each backend's name mapped to None (available) or the reason it is not."""
    return {name: b.unavailable_reason() for name, b in _BACKENDS.items()}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs ``casa_attention`` for a tensor on ``device`` with ``dtype``."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, received {type(name).__name__}")
    if name == "auto":
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    if name != "auto":
        backend = get_backend(name)
        if backend.reason_not_serving(device, dtype) is None:
            return backend
        reasons = "\n".join(
            f"  {b.name}: {b.reason_not_serving(device, dtype) or 'available'}"
            for b in _BACKENDS.values()
        )
        raise RuntimeError(
            f"backend: {name!r} cannot run a {str(dtype).removeprefix('torch.')} tensor on "
            f"{device}. Backends:\n{reasons}"
        )
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        backend = _BACKENDS.get(candidate)
        if backend is None:  # not registered in this build
            continue
        reason = backend.reason_not_serving(device, dtype)
        if reason is None:
            if candidate == "reference" and skipped:
                _warn_once(device, dtype, skipped)
            return backend
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError("the reference backend serves every device and dtype")


def _warn_once(device: torch.device, dtype: torch.dtype, skipped: list[str]) -> None:
    message = (
        f"casa_kernels: backend='auto' falls back to the PyTorch reference for "
        f"{str(dtype).removeprefix('torch.')} on {device.type} ({'; '.join(skipped)})"
    )
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
