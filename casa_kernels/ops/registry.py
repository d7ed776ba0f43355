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
  naming each skipped backend's reason. On a GPU (``MEASURED_DEVICE_TYPES``) it tries only
  the backends that figures measured on that GPU model show faster than the reference for
  the call's dtype and shape class, fastest first (``measured``). On a CPU
  (``PROBED_DEVICE_TYPES``) it passes over a fused backend that a one-time timed probe
  found slower than the reference for the call's dtype and shape class (``probe``).
* an explicit name that cannot serve the input raises, listing every backend's reason.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..weights import ScoreAttentionWeights
from . import measured, probe

ForwardFn = Callable[[torch.Tensor, ScoreAttentionWeights], torch.Tensor]


class RankReductions(NamedTuple):
    """The two reductions over the ranks of a variate-parallel layer, without autograd.

    ``sum_(tensor, what)`` sums the contiguous ``tensor`` over the ranks in place and returns
    it (``what`` names it in failure messages); ``merge_stats(col_max, col_sum)`` gives the
    global column statistics ``(M, S)`` from this rank's (the log-sum-exp merge).
    """

    sum_: Callable[[torch.Tensor, str], torch.Tensor]
    merge_stats: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StagesBackward(NamedTuple):
    """A backend's own backward of its stages as one variate-parallel layer runs them
    (docs/design.md §12.4), used instead of differentiating the reference stages.

    ``serves(weights)`` says whether it takes the call (else the stages run with the
    reference's gradients); the caller makes the decision agree over the ranks' needs.
    ``forward(x_local, weights, reductions)`` runs the four stages with the reductions
    between them and returns ``(y_local, saved)``; ``backward(grad_y, x_local, weights,
    saved, needs, reductions)`` returns the gradients of x_local and the 14 weights (None
    where ``needs``, 15 flags, is False): the per-variate weights' whole, the replicated
    weights' this rank's share. Each all-reduces what the reference stages' autograd would
    (the same tensors' sizes, in the same order, with the same meaning), so ranks on either
    path stay in step.
    """

    serves: Callable[[ScoreAttentionWeights], bool]
    forward: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
    backward: Callable[..., tuple[torch.Tensor | None, ...]]


class Stages(NamedTuple):
    """A backend's implementation of the four stages of the op (contract and reference:
    :mod:`casa_kernels.reference.stages`), used where the variates are split over processes,
    and optionally its own backward of them (else autograd differentiates the reference's)."""

    head_partial: Callable[..., torch.Tensor]
    bottleneck: Callable[..., torch.Tensor]
    tail_stats: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    tail_output: Callable[..., torch.Tensor]
    backward: StagesBackward | None = None


STAGE_NAMES = ("head_partial", "bottleneck", "tail_stats", "tail_output")
"""The four stages' fields of ``Stages``, in order (``backward`` is not a stage)."""


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


class BlockEpilogue(NamedTuple):
    """A backend's fused form of the official block's work after its attention, for
    inference (no autograd): ``run(y, norm_weight, norm_bias, eps, mlp0_weight, mlp0_bias,
    mlp2_weight, mlp2_bias, relu_out) -> LN(relu(z W1ᵀ + b1) W2ᵀ + b2 + z)`` with
    ``z = LN(y)``, then ReLU if ``relu_out``; ``y: [..., D]`` of one of ``dtypes``, the
    parameters in y's dtype."""

    dtypes: frozenset[torch.dtype]
    run: Callable[..., torch.Tensor]


ENV_VAR = "CASA_BACKEND"
FALLBACK = "reference"
"""The backend that serves every device, dtype and shape: ``auto``'s last resort."""
MEASURED_DEVICE_TYPES = frozenset({"cuda"})
"""Device types where ``auto`` picks a fused backend only where figures measured on the
device model show it faster than the reference (``measured``)."""
PROBED_DEVICE_TYPES = frozenset({"cpu"})
"""Device types where ``auto`` passes over a fused backend that a timed probe, run once per
process, dtype and shape class, found slower than the reference (``probe``)."""


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
    block_epilogue: BlockEpilogue | None = None
    """The fused work after the attention in a block, where the backend has it."""
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


def get_backend(name: str, *, argument: str = "backend") -> Backend:
    """The backend registered as ``name``; ``argument`` names where the name came from
    in the error for an unknown one."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"{argument}: expected one of {['auto', *_BACKENDS]}, received {name!r}"
        ) from None


def check_backend_name(name: object) -> None:
    """Checks ``name`` is ``"auto"`` or a registered backend's name (constructors call it,
    so that a typo fails where it is written, not at the first call)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, received {type(name).__name__}")
    if name != "auto":
        get_backend(name)


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
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    shape: ProblemShape | None = None,
    *,
    training: bool = False,
) -> Backend:
    """The backend that runs ``casa_attention`` for a tensor on ``device`` with ``dtype``
    (and of ``shape``, when given: backends declaring shape limits are then checked too).
    ``training``: the call will be differentiated, so that ``auto``'s CPU probe times the
    forward and backward rather than the forward alone."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, received {type(name).__name__}")
    argument = "backend"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
        argument = f"{ENV_VAR} (environment variable, overriding backend='auto')"
    if name != "auto":
        backend = get_backend(name, argument=argument)
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
    candidates, skipped = auto_order(device.type), []
    if device.type in MEASURED_DEVICE_TYPES:
        candidates, skipped = _measured_candidates(candidates, device, dtype, shape)
    for candidate in candidates:
        backend = _BACKENDS[candidate]
        reason = backend.reason_not_serving(device, dtype, shape)
        if reason is None and candidate != FALLBACK and device.type in PROBED_DEVICE_TYPES:
            reason = _probe_reason(backend, dtype, shape, training)
        if reason is None:
            if candidate == FALLBACK and skipped:
                _warn_once(device, dtype, skipped)
            return backend
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError(f"the {FALLBACK} backend serves every device, dtype and shape")


def device_name(device: torch.device) -> str:
    """The model name of a CUDA device (what measured figures are keyed by)."""
    return _cuda_device_name(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _measured_candidates(
    candidates: list[str], device: torch.device, dtype: torch.dtype, shape: ProblemShape | None
) -> tuple[list[str], list[str]]:
    """``candidates`` cut to the backends measured faster than the reference on this device
    model (fastest first, then the reference), and why each other one was passed over."""
    faster, why = measured.faster_than_reference(device_name(device), dtype, shape)
    kept = [name for name in faster if name in candidates and name != FALLBACK]
    passed_over = [
        f"{name}: not measured faster than the reference here ({why})"
        for name in candidates
        if name not in kept and name != FALLBACK
    ]
    return [*kept, FALLBACK], passed_over


def _probe_reason(
    backend: Backend, dtype: torch.dtype, shape: ProblemShape | None, training: bool
) -> str | None:
    """Why ``auto`` passes over ``backend`` here: a probe timed it slower than the reference
    (None where it did not, or where no probe runs: switched off, no static shape, no work)."""
    if not probe.enabled() or shape is None or shape.batch == 0:
        return None
    found = probe.probe(backend, dtype, shape, training)
    return None if found.fused_wins else f"slower than the reference here ({found.describe()})"


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
