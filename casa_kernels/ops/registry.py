"""Backends of ``casa::score_attention`` and how one is chosen (docs/design.md §6).

The registry is the one list of backends: everything else (the auto order, the bench
providers, the tests) derives from it. Each backend declares the devices and dtypes it
serves, its ``auto`` priority per device type, a forward function on already-validated
inputs, a reason when it is unavailable, and optionally the problem shapes it cannot
serve. ``resolve_backend`` turns the user's ``backend=`` argument (or ``CASA_BACKEND``)
into one backend:

* ``"auto"`` tries the backends with a priority for the tensor's device type, highest
  first, and takes the first that serves the input; when that is the ``reference``
  (``FALLBACK``, always tried last) after a faster backend was skipped, it warns once,
  naming each skipped backend's reason.
* an explicit name that cannot serve the input raises, listing every backend's reason.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

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


class FusedBackward(NamedTuple):
    """A backend's own backward of the op (docs/design.md §12), used by the op's autograd
    instead of differentiating the reference for the inputs this backend served.

    ``forward(x, weights)`` runs the op and returns ``(y, saved)``: y as the backend's
    forward gives it and the tensors its backward needs (beyond x and the weights, which
    autograd keeps anyway); or None where this call is left to the reference's backward
    (e.g. weights the backend's forward hands to the reference).
    ``backward(grad_y, x, weights, saved, needs)`` returns the gradients of x and the 14
    weights, in schema order, None where ``needs`` (15 flags, the op's
    ``ctx.needs_input_grad``) is False.
    """

    forward: Callable[
        [torch.Tensor, ScoreAttentionWeights], tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None
    ]
    backward: Callable[..., tuple[torch.Tensor | None, ...]]


class ProblemShape(NamedTuple):
    """The sizes of one call: ``x`` is ``[batch, n_vars, d_model]``, the convs' width ``kernel``."""

    batch: int
    n_vars: int
    d_model: int
    kernel: int

    @classmethod
    def of(cls, x: torch.Tensor, weights: ScoreAttentionWeights) -> ProblemShape | None:
        """The shape of a call on ``x``/``weights``; None when their ranks are wrong (the
        validation of the inputs reports that)."""
        if x.dim() != 3 or weights.enc0_weight.dim() != 3:
            return None
        return cls(*x.shape, weights.kernel)


ENV_VAR = "CASA_BACKEND"
FALLBACK = "reference"
"""The backend that serves every device, dtype and shape: ``auto``'s last resort."""


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
    auto_priority: Mapping[str, int] = field(default_factory=dict)
    """Device type -> rank among ``auto``'s candidates there, higher first (ties: registration
    order). A device type missing here is never chosen by ``auto``, only by name."""
    shape_limits: Callable[[ProblemShape], str | None] | None = None
    """None when the backend serves a problem of this shape, else why not; None: any shape."""
    fused_backward: FusedBackward | None = None
    """The backend's own backward; None: the op's autograd differentiates the reference."""

    def reason_not_serving(
        self, device: torch.device, dtype: torch.dtype, shape: ProblemShape | None = None
    ) -> str | None:
        """None when this backend can run on ``device``/``dtype`` (and ``shape``, when
        given), else the reason."""
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if device.type not in self.device_types:
            return f"runs on {sorted(self.device_types)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"supports dtypes {names}, not {str(dtype).removeprefix('torch.')}"
        if shape is not None and self.shape_limits is not None:
            return self.shape_limits(shape)
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


def auto_order(device_type: str) -> list[str]:
    """The backends ``auto`` tries for tensors of ``device_type``, in order; the
    fallback always comes last."""
    ranked = sorted(
        (b for b in _BACKENDS.values() if device_type in b.auto_priority and b.name != FALLBACK),
        key=lambda b: -b.auto_priority[device_type],
    )
    return [b.name for b in ranked] + [FALLBACK]


def availability() -> dict[str, str | None]:
    """Each backend's name mapped to None (available) or the reason it is not."""
    return {name: b.unavailable_reason() for name, b in _BACKENDS.items()}


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype, shape: ProblemShape | None = None
) -> Backend:
    """The backend that runs ``casa_attention`` for a tensor on ``device`` with ``dtype``
    (and of ``shape``, when given: backends declaring shape limits are then checked too)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, received {type(name).__name__}")
    if name == "auto":
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    if name != "auto":
        backend = get_backend(name)
        if backend.reason_not_serving(device, dtype, shape) is None:
            return backend
        reasons = "\n".join(
            f"  {b.name}: {b.reason_not_serving(device, dtype, shape) or 'available'}"
            for b in _BACKENDS.values()
        )
        of_shape = "" if shape is None else f" of shape {_describe(shape)}"
        raise RuntimeError(
            f"backend: {name!r} cannot run a {str(dtype).removeprefix('torch.')} tensor"
            f"{of_shape} on {device}. Backends:\n{reasons}"
        )
    skipped = []
    for candidate in auto_order(device.type):
        backend = _BACKENDS[candidate]
        reason = backend.reason_not_serving(device, dtype, shape)
        if reason is None:
            if candidate == FALLBACK and skipped:
                _warn_once(device, dtype, skipped)
            return backend
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError(f"the {FALLBACK} backend serves every device, dtype and shape")


def _describe(shape: ProblemShape) -> str:
    return f"[{shape.batch}, {shape.n_vars}, {shape.d_model}] (kernel {shape.kernel})"


def _warn_once(device: torch.device, dtype: torch.dtype, skipped: list[str]) -> None:
    message = (
        f"casa_kernels: backend='auto' falls back to the PyTorch reference for "
        f"{str(dtype).removeprefix('torch.')} on {device.type} ({'; '.join(skipped)})"
    )
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
