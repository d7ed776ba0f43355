"""Figures measured on a device model: whether ``auto`` may pick a fused backend there.

On a GPU, ``auto`` runs a fused backend only where the op's benchmark on that GPU model
showed it faster than the reference (PyTorch's cuBLAS/cuDNN) for the call's dtype and
shape class; elsewhere it runs the reference (docs/design.md §6). The figures live in
``measured_speedups.json`` beside this file, written by ``python -m bench.device_check
unpack`` from the attention suite's rows (:func:`speedups_from_rows`) and committed::

    {"devices": {"NVIDIA H200": {"bfloat16": {"B>1 N>512": {
        "speedups": {"triton": 2.4, "cuda": 0.8},
        "source": "bench/results/nvidia-h200/attention.csv"}}}}}

A speed-up is the reference's p50 over the backend's, the smallest over the measured
shapes of the class (a backend must win at every one of them to be picked).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .registry import ProblemShape

FIGURES = Path(__file__).with_name("measured_speedups.json")
REFERENCE_PROVIDER = "casa-reference"


def shape_class(batch: int, n_vars: int) -> str:
    """The class of shapes one set of figures stands for: B = 1 or more, N up to 64, up
    to 512 or more (the datasets ETTh1/Weather, Solar/ECL, Traffic)."""
    n = "N<=64" if n_vars <= 64 else "N<=512" if n_vars <= 512 else "N>512"
    return f"{'B=1' if batch == 1 else 'B>1'} {n}"


@functools.cache
def _figures() -> Mapping:
    if not FIGURES.is_file():
        return {}
    return json.loads(FIGURES.read_text()).get("devices", {})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def faster_than_reference(
    device_name: str, dtype: torch.dtype, shape: ProblemShape | None
) -> tuple[list[str], str]:
    """The backends measured faster than the reference on ``device_name`` for ``dtype``
    and ``shape``'s class, fastest first, and a sentence naming the figures that decided."""
    if shape is None:
        return [], "the call's shape is not static, and measured figures are per shape class"
    return _decision(device_name, _dtype_name(dtype), shape_class(shape.batch, shape.n_vars))


@functools.cache
def _decision(device_name: str, dtype: str, key: str) -> tuple[list[str], str]:
    entry = _figures().get(device_name, {}).get(dtype, {}).get(key)
    if entry is None:
        return [], (
            f"no figures measured on {device_name} for {dtype} at {key} in "
            f"casa_kernels/ops/{FIGURES.name} (python -m bench.device_check unpack writes them)"
        )
    speedups = entry["speedups"]
    faster = sorted((name for name, s in speedups.items() if s > 1), key=lambda n: -speedups[n])
    measured = ", ".join(f"{name} {s:.2f}x" for name, s in sorted(speedups.items()))
    return faster, (
        f"figures measured on {device_name} for {dtype} at {key}: {measured} the "
        f"reference ({entry['source']})"
    )


def measured_devices() -> list[str]:
    """The device models with figures."""
    return sorted(_figures())


def speedups_from_rows(rows: Iterable[Mapping[str, str]], source: str) -> dict:
    """The ``devices`` figures of the attention suite's CSV rows measured on CUDA devices:
    per device name, dtype and shape class, each fused backend's smallest speed-up over
    the reference across the class's shapes (rows that did not run are left out)."""
    p50: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.get("suite") != "attention" or not row.get("device", "").startswith("cuda"):
            continue
        if row.get("status") != "ok" or not row.get("latency_ms_p50"):
            continue
        point = (row["device_name"], row["dtype"], int(row["batch"]), int(row["n_vars"]))
        point += (row["d_model"], row["kernel"])
        p50.setdefault(point, {})[row["provider"]] = float(row["latency_ms_p50"])
    devices: dict = {}
    for (device_name, dtype, batch, n_vars, *_), providers in sorted(p50.items()):
        reference = providers.get(REFERENCE_PROVIDER)
        if reference is None:
            continue
        entry = devices.setdefault(device_name, {}).setdefault(dtype, {})
        entry = entry.setdefault(shape_class(batch, n_vars), {"speedups": {}, "source": source})
        for provider, latency in providers.items():
            backend = provider.removeprefix("casa-")
            if provider == backend or provider in (REFERENCE_PROVIDER, "casa-compile"):
                continue
            speedup = round(reference / latency, 3)
            entry["speedups"][backend] = min(speedup, entry["speedups"].get(backend, speedup))
    return devices


def merge_into(path: Path, devices: Mapping) -> None:
    """Writes ``devices``' figures into the JSON at ``path``, replacing those of the same
    device name and keeping the others'."""
    known = json.loads(path.read_text()).get("devices", {}) if path.is_file() else {}
    known.update(devices)
    path.write_text(json.dumps({"devices": known}, indent=2, sort_keys=True) + "\n")
    _figures.cache_clear()
    _decision.cache_clear()
