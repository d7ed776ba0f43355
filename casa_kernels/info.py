"""``python -m casa_kernels.info``: versions, what was built, each backend's availability.

Prints, one ``key: value`` per line, the versions of casa_kernels, torch, triton,
CUDA and the compiler torch was built with, whether the C++ extension loaded and for
which devices it registered kernels, the CPU's bfloat16 GEMM tier, the memory held by
weights prepared once per weight version (``ops.weight_cache``), the GPU models whose
measured figures decide ``auto`` (``ops.measured``) and what ``auto`` does on this GPU, then
every backend with ``available`` or the reason it is not.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from .ops import availability, measured, probe, weight_cache
from .ops.backends.cpu import bf16_gemm_tier, vector_isa
from .ops.extension import extension_error, has_kernel_for
from .ops.registry import device_name


def _triton_version() -> str:
    try:
        import triton
    except ImportError as exc:
        return f"not installed ({exc})"
    return triton.__version__


def _compiler() -> str:
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith("- GCC") or line.startswith("- clang") or line.startswith("- MSVC"):
            return line.removeprefix("- ")
    return "unknown"


def report() -> list[tuple[str, str]]:
    """The (key, value) rows that ``main`` prints."""
    rows = [
        ("casa_kernels", __version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torch compiler", _compiler()),
        ("torch CUDA", str(torch.version.cuda)),
        ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("triton", _triton_version()),
        ("threads", str(torch.get_num_threads())),
    ]
    error = extension_error()
    if error is None:
        devices = [key for key in ("CPU", "CUDA") if has_kernel_for(key)]
        rows.append(
            ("extension casa_kernels._C", f"loaded, kernels for {', '.join(devices) or 'none'}")
        )
    else:
        rows.append(("extension casa_kernels._C", error))
    rows.append(("cpu bfloat16 GEMMs", bf16_gemm_tier()))
    rows.append(("cpu vector loops", vector_isa()))
    cached = weight_cache.cache_bytes()
    rows.append(
        (
            "prepared weights (this process)",
            ", ".join(f"{d}: {n / 2**20:.2f} MiB" for d, n in cached.items()) or "none",
        )
    )
    probes = probe.probes()
    rows.append(
        (
            "auto on this CPU",
            "; ".join(
                f"{p.backend if p.fused_wins else 'reference'} runs: {p.describe()}" for p in probes
            )
            if probes
            else "a fused backend unless a timed probe, once per process, dtype and shape "
            "class, finds it slower than the reference (none run yet in this process; "
            f"{probe.ENV_VAR}=0 switches it off)"
            if probe.enabled()
            else f"a fused backend wherever one serves the call ({probe.ENV_VAR}=0: no probe)",
        )
    )
    gpus = measured.measured_devices()
    rows.append(("GPU models with measured figures", ", ".join(gpus) or "none"))
    if torch.cuda.is_available():
        name = device_name(torch.device("cuda"))
        rows.append(
            (
                "auto on this GPU",
                "a fused backend where the figures of this model show it faster than the "
                "reference, per dtype and shape class"
                if name in gpus
                else f"the reference: no figures measured on {name} "
                "(bash bench/device_check.sh, then python -m bench.device_check unpack)",
            )
        )
    for name, reason in availability().items():
        rows.append(
            (f"backend {name}", "available" if reason is None else f"unavailable: {reason}")
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m casa_kernels.info",
        description="Versions, what was built, and each backend's availability and reason.",
    ).parse_args(argv)
    rows = report()
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
