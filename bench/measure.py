"""Latency percentiles and peak extra memory of one zero-argument callable.

* Latency: after warm-up, each call is timed alone. On a GPU with CUDA events around
  the call (the device's own clock; the stream is synchronised after every call); on a
  CPU with ``time.perf_counter``. Reported as p20/p50/p80/p99 in milliseconds.
* Peak extra memory of one call (inputs, weights and anything allocated before the call
  excluded; the output included):

  - GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
    minus ``memory_allocated()`` before the call (bytes handed out by the caching
    allocator, not bytes reserved from the driver);
  - CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
    of the c10 CPU allocator during the call; the peak of their running sum, in time
    order, is the peak above the starting point. Memory that does not come from the c10
    allocator (BLAS/oneDNN-internal workspaces, ``std::vector`` inside extensions,
    Python objects) is not seen.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

CPU_MEM_METHOD = (
    "torch.profiler c10-CPU-allocator events: peak of running sum (no BLAS-internal buffers)"
)
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated delta after reset_peak_memory_stats"


class MeasurementTimeout(Exception):
    """One call takes longer than the time cap."""


@dataclass(frozen=True)
class Latency:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    p99_ms: float
    reps: int


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 1] of an ascending list."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """A function running ``fn`` once and returning its time in milliseconds."""
    if device.startswith("cuda"):

        def run_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return run_cuda

    def run_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run_cpu


def _warm_up(fn: Callable[[], object], run, warmup: int, cap_ms: float, time_cap_s: float) -> float:
    """Calls ``fn`` ``warmup`` times (at least once) and until one call fits the cap; the
    fastest call in milliseconds. Raises :class:`MeasurementTimeout` when the first two
    calls (the first may compile) both exceed the cap: one slow call (noise on a shared
    machine) earns one retry."""
    fastest = math.inf
    calls = 0
    while calls < max(1, warmup) or fastest > cap_ms:
        elapsed = run(fn)
        calls += 1
        if elapsed > cap_ms and fastest > cap_ms and calls >= 2:
            raise MeasurementTimeout(
                f"two calls took > time cap {time_cap_s:g} s (last {elapsed / 1e3:.3g} s)"
            )
        fastest = min(fastest, elapsed)
    return fastest


def measure_latencies(
    fns: dict[str, Callable[[], object]],
    device: str,
    *,
    warmup: int,
    reps: int,
    time_cap_s: float,
) -> dict[str, Latency | Exception]:
    """Times several callables *interleaved*: after each one's warm-up, in rounds that call
    every one once, the order rotated by one each round, so that all of them see the same
    machine state (a shared machine's load moves between rounds, not between providers,
    and the ratios of their percentiles are fair). With one callable this is plain
    repeated timing.

    ``reps`` rounds, fewer if they would exceed ``time_cap_s`` per callable on average
    (at least one round). A callable whose warm-up times out maps to its
    :class:`MeasurementTimeout`, one that raises to its exception; the others go on.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    run = _timer(device)
    cap_ms = time_cap_s * 1e3
    results: dict[str, Latency | Exception] = {}
    fastest: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            fastest[name] = _warm_up(fn, run, warmup, cap_ms, time_cap_s)
        except Exception as error:  # noqa: BLE001 - recorded per callable
            results[name] = error
    live = list(fastest)
    if live:
        budget_ms = cap_ms * len(live)
        rounds = max(1, min(reps, int(budget_ms // max(sum(fastest.values()), 1e-6))))
        times: dict[str, list[float]] = {name: [] for name in live}
        for r in range(rounds):
            shift = r % len(live)
            for name in live[shift:] + live[:shift]:
                if name in results:
                    continue
                try:
                    times[name].append(run(fns[name]))
                except Exception as error:  # noqa: BLE001 - recorded per callable
                    results[name] = error
        for name in live:
            if name not in results:
                samples = sorted(times[name])
                results[name] = Latency(
                    *(percentile(samples, q) for q in (0.2, 0.5, 0.8, 0.99)), len(samples)
                )
    return {name: results[name] for name in fns}


def measure_latency(
    fn: Callable[[], object], device: str, *, warmup: int, reps: int, time_cap_s: float
) -> Latency:
    """Times ``fn`` ``reps`` times after ``warmup`` calls; fewer reps if they would exceed
    the cap (see :func:`measure_latencies`). Raises :class:`MeasurementTimeout` when the
    first two calls both take longer than ``time_cap_s``."""
    result = measure_latencies({"fn": fn}, device, warmup=warmup, reps=reps, time_cap_s=time_cap_s)[
        "fn"
    ]
    if isinstance(result, Exception):
        raise result
    return result


def measure_peak_memory(fn: Callable[[], object], device: str) -> tuple[int, str]:
    """Peak extra bytes allocated during one call of ``fn`` and how they were measured."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak), CUDA_MEM_METHOD
    return cpu_peak_allocated(fn), CPU_MEM_METHOD


def cpu_peak_allocated(fn: Callable[[], object]) -> int:
    """Peak of the running sum of c10 CPU allocator events (bytes) during one ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        running += event.nbytes()
        peak = max(peak, running)
    return int(peak)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 to /dev/null: kineto prints a line at every profiler start/stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
