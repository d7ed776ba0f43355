// Additions to shim.h for the CuTe-based kernels (csrc/cuda/score_attention_kernels.cu):
// dynamic shared memory and launches that request it. Included after shim.h by the
// test's source transform.
//
// CASA_CUDA_EMULATION selects, in the kernels, CuTe's host-capable stand-ins for the
// device-only atoms: a scalar fp32 multiply-add MMA atom instead of mma.sync and
// UniversalCopy instead of cp.async (whose fence/wait calls are no-ops off the device).
//
// Dynamic shared memory is one buffer per launch, shared by the block that runs (blocks
// run one at a time, as for the function statics that stand in for static __shared__
// arrays). It is filled with 0xff bytes (NaN for every float type) at each launch so
// that a read before the block's own write shows up as a NaN in the output.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "shim.h"

#define CASA_CUDA_EMULATION 1

inline unsigned char* emu_dynamic_smem = nullptr;

#define CASA_DYNAMIC_SMEM(name) unsigned char* const name = emu_dynamic_smem

// kernel<<<grid, block, smem, stream>>>(args...) with smem != 0 becomes
// emu_launch_smem(kernel, grid, block, smem, args...).
template <typename Kernel, typename... Args>
void emu_launch_smem(Kernel kernel, int grid, int block, size_t smem, Args... args) {
  const size_t bytes = (smem + 127) / 128 * 128;
  std::free(emu_dynamic_smem);
  emu_dynamic_smem = static_cast<unsigned char*>(std::aligned_alloc(128, bytes));
  std::memset(emu_dynamic_smem, 0xff, bytes);
  emu_launch(kernel, grid, block, args...);
  std::free(emu_dynamic_smem);
  emu_dynamic_smem = nullptr;
}
