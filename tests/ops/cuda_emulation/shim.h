// Host emulation of the CUDA execution model used by csrc/cuda/score_attention_kernels.cu,
// for tests on machines without a GPU (tests/ops/test_cuda_emulation.py).
//
// A launch runs its blocks one after another; each block runs one std::thread per CUDA
// thread, so __syncthreads is a real barrier and shared memory (turned into function
// statics by the test's source transform) is shared by the block's threads only.
// Device memory is host memory. Built with -fsanitize=thread it reports intra-block
// data races, i.e. missing __syncthreads.
//
// Not emulated: tensor cores (wmma). Without __CUDA_ARCH__ the kernels take their
// SIMT path for every dtype, so fp16/bf16 operands are staged in their own type but
// multiplied in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __trap() { std::abort(); }
using std::max;
using std::min;

// kernel<<<grid, block, 0, stream>>>(args...) becomes emu_launch(kernel, grid, block, args...).
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, int grid, int block, Args... args) {
  blockDim = {static_cast<unsigned>(block), 1, 1};
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  std::barrier<> barrier(block);
  emu_block_barrier = &barrier;
  for (int b = 0; b < grid; ++b) {
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([=] {
        blockIdx = {static_cast<unsigned>(b), 0, 0};
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        kernel(args...);
      });
    }
    for (std::thread& thread : threads) thread.join();
  }
  emu_block_barrier = nullptr;
}

// Launch errors cannot happen on the host.
#define cudaGetLastError() cudaSuccess
