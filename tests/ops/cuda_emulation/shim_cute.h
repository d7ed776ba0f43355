// Additions to shim.h for the CuTe-based kernels (csrc/cuda/score_attention_kernels.cu):
// dynamic shared memory and launches that request it. Included after shim.h by the
// test's source transform.
//
// CASA_CUDA_EMULATION selects, in the kernels, CuTe's host-capable stand-ins for the
// device-only atoms: a scalar fp32 multiply-add MMA atom instead of mma.sync and
// UniversalCopy instead of cp.async (whose fence/wait calls are no-ops off the device).
//
// Dynamic shared memory is per block, like the static kind (shim.h's emu_shared_bytes):
// each block's buffer, of the size its launch asked for, starts filled with 0xff bytes
// (NaN for every float type), so a read before the block's own write shows up as a NaN
// in the output.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "shim.h"

#define CASA_CUDA_EMULATION 1

// The dynamic shared memory size of the launch running (emu_launch_smem).
inline std::size_t emu_dynamic_smem_bytes = 0;
inline const char emu_dynamic_smem_key = 0;

#define CASA_DYNAMIC_SMEM(name)                            \
  unsigned char* const name = static_cast<unsigned char*>( \
      emu_shared_bytes(&emu_dynamic_smem_key, emu_dynamic_smem_bytes, 128))

// kernel<<<grid, block, smem, stream>>>(args...) with smem != 0 becomes
// emu_launch_smem(kernel, grid, block, smem, args...).
template <typename Kernel, typename... Args>
void emu_launch_smem(Kernel kernel, int grid, int block, size_t smem, Args... args) {
  emu_dynamic_smem_bytes = (smem + 127) / 128 * 128;
  emu_launch(kernel, grid, block, args...);
  emu_dynamic_smem_bytes = 0;
}
