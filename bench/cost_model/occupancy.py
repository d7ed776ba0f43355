"""Blocks resident per SM and waves of a grid, from a kernel's registers, shared
memory and threads (the CUDA occupancy rules for sm_90)."""

from __future__ import annotations

from .hardware import Gpu


def _round_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


def blocks_per_sm(gpu: Gpu, *, threads: int, registers: int, shared_bytes: int) -> int:
    """Blocks of ``threads`` threads using ``registers`` per thread and ``shared_bytes`` of
    shared memory each that fit on one SM at once; 0 when one block does not fit. The
    shared bytes are dynamic + static as ``cuobjdump -res-usage`` reports the static part
    (on sm_90 its SHARED figure includes the 1 KiB the system reserves per block that
    uses shared memory). Raises ValueError on non-positive threads."""
    if threads <= 0:
        raise ValueError(f"threads: expected a positive count, received {threads}")
    warps = -(-threads // 32)
    per_warp = _round_up(max(registers, 1) * 32, gpu.register_granule)
    by_registers = gpu.registers_per_sm // (per_warp * warps)
    if shared_bytes > gpu.shared_per_block_max:
        return 0
    by_shared = gpu.shared_per_sm // shared_bytes if shared_bytes else gpu.blocks_per_sm
    by_threads = gpu.threads_per_sm // (warps * 32)
    return max(0, min(by_registers, by_shared, by_threads, gpu.blocks_per_sm))


def waves(gpu: Gpu, grid: int, resident: int) -> int:
    """Rounds of ``resident`` blocks per SM over all SMs that a grid of ``grid`` blocks
    takes (at least 1 for a non-empty grid). Raises ValueError when nothing is resident."""
    if resident <= 0:
        raise ValueError(f"resident: expected at least one block per SM, received {resident}")
    return -(-grid // (gpu.sms * resident)) if grid > 0 else 0
