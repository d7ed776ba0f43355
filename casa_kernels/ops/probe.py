"""A one-time timed probe: whether a fused backend beats the reference on this CPU.

On a CPU, ``auto`` runs a fused backend only where a probe found it at least as fast as
the reference (PyTorch's own ops) for the call's dtype, shape class
(``measured.shape_class``: B = 1 or more; N up to 64, up to 512, or more), width D,
kernel size, thread count and mode (docs/design.md §6): a call that will be differentiated
(gradients enabled and an input requiring one) is probed on the op's forward and backward
(x and the 14 weights requiring gradients, as in training), any other call on its
forward. The kernels are tuned where AVX-512 exists; on other CPUs (AVX2 only) or
settings (``ONEDNN_MAX_CPU_ISA``, thread counts) a stage can lose to the BLAS, and the
probe keeps ``auto`` from running the slower one.

The probe runs once per process and key, at the first call, on random inputs of a size
that stands for the class: ``[B', min(N, 1024), D]`` with B' = 1 for B = 1, else
``min(B, max(2, threads))`` (one batch element per thread, as the kernels split larger
batches). Each side runs once to warm up (the fused backend prepares its weights), then
they alternate, timed, until each has run ``ROUNDS`` times or ``BUDGET_S`` has passed
(at least once each); the medians decide, a tie going to the fused backend. In a
training probe each fused run prepares its weights again, as a training step does after
the optimizer's. It costs tens of milliseconds at the Traffic shape (D = 512, N = 862; a
training probe a few tenths of a second) and runs outside any autocast, dispatch mode
(FakeTensorMode, FlopCounterMode) or the caller's autograd graph.

``CASA_CPU_PROBE=0`` switches the probe off: ``auto`` then runs the fused backend wherever
it serves the call (deterministic choice; the test suite sets it, and tests the probe
itself with the variable unset).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .. import reference
from ..weights import ScoreAttentionWeights
from . import weight_cache
from .measured import shape_class

if TYPE_CHECKING:
    from .registry import Backend, ProblemShape

ENV_VAR = "CASA_CPU_PROBE"
ROUNDS = 3
BUDGET_S = 0.1
MAX_PROBE_N = 1024


@dataclass(frozen=True)
class Probe:
    """One probe's outcome: the medians of both sides, in milliseconds, on ``size``."""

    backend: str
    key: str
    training: bool
    size: tuple[int, int, int]
    fused_ms: float
    reference_ms: float

    @property
    def fused_wins(self) -> bool:
        return self.fused_ms <= self.reference_ms

    def describe(self) -> str:
        b, n, d = self.size
        what = "forward+backward" if self.training else "forward"
        return (
            f"{self.backend} {self.fused_ms:.3g} ms vs reference {self.reference_ms:.3g} ms "
            f"({what}) on [{b}, {n}, {d}] ({self.key})"
        )


_lock = threading.Lock()
_probes: dict[tuple, Probe] = {}


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip() != "0"


def probe_size(shape: ProblemShape, threads: int) -> tuple[int, int, int]:
    """The ``[B', N', D]`` a probe for ``shape`` runs on (see the module docstring)."""
    batch = 1 if shape.batch == 1 else min(shape.batch, max(2, threads))
    return batch, min(shape.n_vars, MAX_PROBE_N), shape.d_model


def _median_times(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median wall time (ms) of each callable, warmed up once, run alternately."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    deadline = time.perf_counter() + BUDGET_S
    for round_ in range(ROUNDS):
        if round_ > 0 and time.perf_counter() > deadline:
            break
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _forward_runs(backend: Backend, x: torch.Tensor, weights: ScoreAttentionWeights):
    return {
        "fused": lambda: backend.forward(x, weights),
        "reference": lambda: reference.score_attention(x, weights),
    }


def _training_runs(backend: Backend, x: torch.Tensor, weights: ScoreAttentionWeights):
    """The op's forward and backward on ``backend`` (its fused backward where it has one)
    and the reference's autograd, every input requiring a gradient. Each fused run
    prepares its weights again, as every training step does after the optimizer's
    (``weight_cache.invalidate``, which the optimizer step hook calls)."""
    leaves = [t.detach().requires_grad_() for t in (x, *weights)]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)

    def fused():
        weight_cache.invalidate()
        torch.autograd.backward(torch.ops.casa.score_attention(*leaves, backend.name), grad)

    def reference_run():
        out = reference.score_attention(leaves[0], ScoreAttentionWeights(*leaves[1:]))
        torch.autograd.backward(out, grad)

    return {"fused": fused, "reference": reference_run}


def _run_probe(
    backend: Backend, dtype: torch.dtype, size: tuple[int, int, int], kernel: int, training: bool
):
    batch, n_vars, d_model = size
    generator = torch.Generator().manual_seed(0)
    weights = ScoreAttentionWeights.random(
        n_vars, d_model, kernel, dtype=dtype, generator=generator
    )
    x = torch.randn(batch, n_vars, d_model, generator=generator).to(dtype)
    runs = _training_runs if training else _forward_runs
    with (
        _disable_current_modes(),
        torch.set_grad_enabled(training),
        torch.autocast("cpu", enabled=False),
    ):
        return _median_times(runs(backend, x, weights))


def probe(
    backend: Backend, dtype: torch.dtype, shape: ProblemShape, training: bool = False
) -> Probe:
    """The probe of ``backend`` against the reference for ``dtype``, ``shape``'s key and
    the mode (``training``: forward and backward), run now if this process has not run it
    yet."""
    threads = torch.get_num_threads()
    shape_key = shape_class(shape.batch, shape.n_vars)
    lookup = (backend.name, dtype, shape_key, shape.d_model, shape.kernel, threads, training)
    with _lock:
        found = _probes.get(lookup)
        if found is None:
            key = (
                f"{str(dtype).removeprefix('torch.')}, {shape_key}, D={shape.d_model}, "
                f"k={shape.kernel}, {threads} threads"
            )
            size = probe_size(shape, threads)
            medians = _run_probe(backend, dtype, size, shape.kernel, training)
            found = Probe(backend.name, key, training, size, medians["fused"], medians["reference"])
            _probes[lookup] = found
        return found


def probes() -> list[Probe]:
    """The probes this process has run, in order."""
    with _lock:
        return list(_probes.values())
