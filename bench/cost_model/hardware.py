"""The GPU the cost model estimates for, and the model's assumptions, as numbers.

H100/H200 SXM (sm_90a): 132 SMs at ~1.9 GHz, ~790 TFLOP/s dense bf16/fp16 tensor-core
throughput through wgmma (about half that through mma.sync, which on sm_90 does not
reach the wgmma rate), ~67 TFLOP/s fp32 on the CUDA cores, ~3.35 TB/s HBM. Per SM:
64 K 32-bit registers, 228 KiB shared memory (227 KiB per block plus 1 KiB the system
reserves per block), 2048 threads, 32 blocks.

The latency assumption: a round of synchronous global loads that the code waits on
before it can go on (no software pipelining) costs ~300 cycles, ±50 %: the L2/HBM
latency of a load that misses L1, seen by a warp with nothing else to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Gpu:
    name: str = "H100/H200 SXM (sm_90a)"
    sms: int = 132
    clock_ghz: float = 1.9
    tensor_tflops: float = 790.0  # dense bf16/fp16 through wgmma (HGMMA)
    mma_sync_fraction: float = 0.5  # mma.sync (HMMA) on sm_90, as a fraction of the above
    fp32_tflops: float = 67.0  # FFMA on the CUDA cores
    hbm_tb_s: float = 3.35
    registers_per_sm: int = 65536
    register_granule: int = 256  # registers are allocated per warp in 256-register units
    shared_per_sm: int = 233472  # 228 KiB
    shared_per_block_max: int = 233472  # 227 KiB usable + the 1 KiB system reserve
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    load_latency_cycles: float = 300.0  # one round of waited-on global loads
    latency_error: float = 0.5  # ± fraction on the latency assumption
    launch_us: float = 1.0  # per kernel launch, back to back on one stream / in a graph

    def tensor_macs_per_cycle_per_sm(self, wgmma: bool) -> float:
        """Dense 16-bit multiply-adds per cycle per SM through the tensor cores."""
        rate = self.tensor_tflops * 1e12 / 2 / self.sms / (self.clock_ghz * 1e9)
        return rate if wgmma else rate * self.mma_sync_fraction

    def fp32_macs_per_cycle_per_sm(self) -> float:
        return self.fp32_tflops * 1e12 / 2 / self.sms / (self.clock_ghz * 1e9)

    def as_dict(self) -> dict:
        return asdict(self)


H100_SXM = Gpu()
