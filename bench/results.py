"""Result rows, the upserted CSV per suite, and the name of the device measured.

A row is keyed by :data:`KEY_COLUMNS`; writing a row whose key is already in the CSV
replaces it, other rows are kept (re-running one point refreshes only that point).
"""

from __future__ import annotations

import csv
import functools
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

# Columns identifying a measurement; an upsert replaces the row with the same key.
KEY_COLUMNS = (
    "suite",
    "sweep",
    "provider",
    "device",
    "device_name",
    "dtype",
    "batch",
    "n_vars",
    "d_model",
    "kernel",
    "seq_len",
    "e_layers",
    "torch_version",
    "triton_version",
    "casa_kernels_version",
    "threads",
    "isa",
)
# Every column, in CSV order.
COLUMNS = KEY_COLUMNS + (
    "config",
    "latency_ms_p20",
    "latency_ms_p50",
    "latency_ms_p80",
    "latency_ms_p99",
    "reps",
    "samples_per_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "mem_method",
    "timing",
    "status",
    "note",
    "git_commit",
    "timestamp",
)
STATUSES = ("ok", "oom", "timeout", "skipped", "error")


def slug(text: str) -> str:
    """A filesystem-safe lower-case slug: ``'Intel(R) Xeon(R)'`` -> ``'intel-r-xeon-r'``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux; :func:`cpu_model_from_cpuinfo`), else
    ``platform.processor()``."""
    try:
        name = cpu_model_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine() or "cpu"


def cpu_model_from_cpuinfo(text: str) -> str:
    """The first processor's ``model name`` in /proc/cpuinfo's ``text`` (``''`` if none).
    A name without a model number is one a hypervisor masked ("AMD EPYC" covers Zen 1 to
    Zen 4): its ``cpu family`` and ``model`` are added, ``"AMD EPYC (family 25 model 1)"``,
    so that rows of different CPUs do not share a name, a results folder or a table."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the blank line after the first processor's block
                break
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name", "")
    if name and not re.search(r"\d", name) and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def device_name(device: str) -> str:
    """Human name of the device measured: the GPU's name or the CPU model."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model_name()


def default_out_dir(device: str) -> Path:
    """``bench/results/<device-name slug>/`` next to this file."""
    return Path(__file__).resolve().parent / "results" / slug(device_name(device))


def triton_version() -> str:
    """Triton's version if it is installed (without importing it), else ``''``."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("triton")
    except PackageNotFoundError:
        return ""
    except Exception:  # pragma: no cover - odd metadata
        return ""


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """:func:`checkout_state` of this checkout, asked once per process."""
    return checkout_state(Path(__file__).resolve().parent.parent)


def checkout_state(root: Path) -> str:
    """Short hash of the HEAD of the checkout at ``root`` (``+dirty`` with local changes to
    tracked files other than the results themselves: a run of several suites writes its
    earlier CSVs into bench/results/ before the later ones ask), ``''`` outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--"]
            + [".", ":(exclude)bench/results"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def isa(device: str) -> str:
    """The instruction-set tier the kernels run on: on a GPU its ``sm_XY``; on a CPU the
    bfloat16 GEMM unit (``amx``, ``avx512_bf16``) or else ATen's vector tier, with the
    caps ``ONEDNN_MAX_CPU_ISA`` puts on oneDNN and ``MKL_ENABLE_INSTRUCTIONS`` on MKL
    (PyTorch's fp32 GEMMs) where set: ``"avx2 (onednn<=avx2, mkl<=avx2)"``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return f"sm_{major}{minor}"
    from casa_kernels.ops.backends.cpu import bf16_gemm_tier

    tier = bf16_gemm_tier()
    if tier == "none":
        tier = torch.backends.cpu.get_cpu_capability().lower()
    caps = [
        f"{library}<={cap}"
        for library, variable in (
            ("onednn", "ONEDNN_MAX_CPU_ISA"),
            ("mkl", "MKL_ENABLE_INSTRUCTIONS"),
        )
        if (cap := os.environ.get(variable, "").strip().lower())
    ]
    return f"{tier} ({', '.join(caps)})" if caps else tier


def environment_columns(device: str) -> dict[str, object]:
    """Columns describing where a row was measured (part of the key)."""
    import casa_kernels

    return {
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "threads": torch.get_num_threads(),
        "isa": isa(device),
        "casa_kernels_version": casa_kernels.__version__,
        "git_commit": git_commit(),
    }


def _key(row: dict) -> tuple[str, ...]:
    return tuple(str(row.get(c, "")) for c in KEY_COLUMNS)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`upsert_rows` (empty if the file is absent)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def upsert_rows(path: Path, rows: list[dict]) -> None:
    """Writes ``rows`` into the CSV at ``path``, replacing rows with the same key.

    Extra columns (already in the file or in the new rows) are kept; the write is atomic
    (temp file + rename).
    """
    existing = read_rows(path)
    columns = list(COLUMNS)
    for row in [*existing, *rows]:
        columns += [c for c in row if c not in columns]
    merged = {_key(r): r for r in existing}
    for row in rows:
        merged[_key(row)] = {c: ("" if row.get(c) is None else row.get(c)) for c in columns}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
    tmp.replace(path)
