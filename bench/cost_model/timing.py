"""The time estimate of one kernel launch, from its work (what its loop does, per
program) and its compiled code (resources and instruction mix).

The model, per launch (all of it an ESTIMATE, never a measurement):

* ``resident`` = blocks per SM from registers, shared memory and threads;
  ``waves`` = ⌈grid / (SMs · resident)⌉.
* A program runs phases of dependent steps (a GEMM's K loop, an epilogue pass): each
  step's loads are waited on (and its MMA, waited at once) before the next step — what
  the SASS of the current kernels shows. Per step a thread issues
  ``bytes_per_step / threads / ldg_bytes`` synchronous loads in groups of
  ``loads_in_flight`` (both read from the SASS); each group, and at least one per step,
  costs one load latency L. Steps whose operands come by asynchronous copies (cp.async /
  TMA, seen in the SASS) in a pipeline of ≥ 2 stages cost no latency but the
  pipeline's fill.
* A program's time = latency rounds · L + its MMA cycles (macs / the SM's rate: wgmma,
  mma.sync at a fraction of it, or the CUDA cores' FMA rate when the SASS has no
  tensor-core instruction; a kernel with both wgmma and mma.sync, each for the MACs
  its description gives it).
* An SM holding ``resident`` programs overlaps their latencies but shares its math
  units: a wave takes max(program time, resident · MMA cycles).
* Launch time = max(waves · wave time, HBM bytes / bandwidth) + a launch overhead.

Its error is dominated by L (±50 %), which scales the latency-bound part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import Gpu
from .occupancy import blocks_per_sm, waves
from .sass import InstructionMix


@dataclass(frozen=True)
class KernelWork:
    """What one launch does, from the launcher's plan and the kernel's loop structure.

    grid: programs (blocks); threads: per program; phases: ``(steps, bytes_per_step)``
    per phase of the longest program, the bytes one program loads per step through
    registers (synchronous loads), or ``(steps, bytes_per_step, load_bytes)`` for a phase
    whose loads are all ``load_bytes`` wide (priced at that width and the loads of that
    width the SASS keeps in flight, not the kernel's means); async_steps: further steps whose operands are
    streamed by asynchronous copies where the SASS has them (else they count as
    synchronous, with async_bytes_per_step); stages: the async pipeline depth; macs:
    multiply-adds of the longest program; flops: floating-point operations of the whole
    launch (2 · macs executed, padding included); hbm_bytes: the launch's compulsory
    DRAM traffic; wgmma_macs: of macs, those a kernel with both kinds of tensor-core
    instruction runs on wgmma (the rest on mma.sync; 0: all at the one rate the SASS
    shows).
    """

    name: str
    grid: int
    threads: int
    phases: tuple[tuple, ...]
    macs: float
    flops: float
    hbm_bytes: float
    async_steps: int = 0
    async_bytes_per_step: float = 0.0
    stages: int = 1
    wgmma_macs: float = 0.0


@dataclass(frozen=True)
class Compiled:
    """What the compiled code says: per-thread registers, shared memory per block
    (static + dynamic), local (spill) bytes per thread, and the instruction mix."""

    registers: int
    shared_bytes: int
    local_bytes: int
    mix: InstructionMix


@dataclass(frozen=True)
class Estimate:
    resident: int
    waves: int
    latency_rounds: float  # per program
    mma_cycles: float  # per program
    wave_cycles: float
    compute_us: float
    hbm_us: float
    us: float
    us_low: float  # with L · (1 - error)
    us_high: float  # with L · (1 + error)
    bound: str  # "latency", "compute" or "memory"


def latency_rounds(work: KernelWork, mix: InstructionMix) -> float:
    """Waited-on load rounds of one program (see the module docstring)."""

    def rounds_per_step(bytes_per_step: float, load_bytes: int = 0) -> float:
        width = load_bytes or mix.sync_load_bytes or 4.0
        in_flight = mix.in_flight_of(load_bytes) if load_bytes else mix.loads_in_flight
        return max(1.0, bytes_per_step / work.threads / width / max(in_flight, 1.0))

    rounds = sum(steps * rounds_per_step(*rest) for steps, *rest in work.phases)
    if work.async_steps:
        if mix.async_copies and work.stages >= 2:
            rounds += work.stages - 1  # the pipeline's fill
        else:
            rounds += work.async_steps * rounds_per_step(work.async_bytes_per_step)
    return rounds


def mma_cycles(gpu: Gpu, work: KernelWork, mix: InstructionMix) -> float:
    """Cycles one program's multiply-adds take on one SM's math units."""
    if mix.wgmma and mix.tensor_core > mix.wgmma and work.wgmma_macs:
        # wgmma for the described share, mma.sync for the rest
        wgmma = gpu.tensor_macs_per_cycle_per_sm(wgmma=True)
        mma_sync = gpu.tensor_macs_per_cycle_per_sm(wgmma=False)
        return work.wgmma_macs / wgmma + (work.macs - work.wgmma_macs) / mma_sync
    if mix.tensor_core:
        rate = gpu.tensor_macs_per_cycle_per_sm(wgmma=mix.wgmma > 0)
    else:
        rate = gpu.fp32_macs_per_cycle_per_sm()
    return work.macs / rate


def estimate(gpu: Gpu, work: KernelWork, compiled: Compiled) -> Estimate:
    """The launch's estimated time (µs) and how it is reached."""
    resident = blocks_per_sm(
        gpu,
        threads=work.threads,
        registers=compiled.registers,
        shared_bytes=compiled.shared_bytes,
    )
    if resident == 0:
        raise ValueError(
            f"{work.name}: one block ({work.threads} threads, {compiled.registers} registers, "
            f"{compiled.shared_bytes} B shared) does not fit an SM of {gpu.name}"
        )
    n_waves = waves(gpu, work.grid, resident)
    rounds = latency_rounds(work, compiled.mix)
    mma = mma_cycles(gpu, work, compiled.mix)
    cycles_per_us = gpu.clock_ghz * 1e3
    hbm_us = work.hbm_bytes / (gpu.hbm_tb_s * 1e6)
    # Programs sharing an SM share its math units; fewer programs than slots in the
    # last (or only) wave do not.
    sharing = min(resident, math.ceil(work.grid / gpu.sms)) if work.grid else 0

    def total(latency: float) -> tuple[float, float]:
        wave = max(rounds * latency + mma, sharing * mma)
        return wave, max(n_waves * wave / cycles_per_us, hbm_us) + gpu.launch_us

    wave, us = total(gpu.load_latency_cycles)
    _, low = total(gpu.load_latency_cycles * (1 - gpu.latency_error))
    _, high = total(gpu.load_latency_cycles * (1 + gpu.latency_error))
    compute_us = n_waves * sharing * mma / cycles_per_us
    if hbm_us >= n_waves * wave / cycles_per_us:
        bound = "memory"
    elif sharing * mma >= rounds * gpu.load_latency_cycles + mma:
        bound = "compute"
    else:
        bound = "latency"
    return Estimate(
        resident=resident,
        waves=n_waves,
        latency_rounds=rounds,
        mma_cycles=mma,
        wave_cycles=wave,
        compute_us=compute_us,
        hbm_us=hbm_us,
        us=us,
        us_low=low,
        us_high=high,
        bound=bound,
    )
