// Host emulation of the CUDA execution model used by csrc/cuda/score_attention_kernels.cu,
// for tests on machines without a GPU (tests/ops/test_cuda_emulation.py).
//
// Each block runs one std::thread per CUDA thread, so __syncthreads is a real barrier
// (one per block). Shared memory (declarations rewritten by the test's source transform
// into emu_shared calls) is allocated per block, filled with 0xFF bytes (NaN for every
// float type) as uninitialised shared memory may hold anything, and freed when the
// block ends. Device memory is host memory.
//
// Block order. A launch runs its blocks in an order set by the environment variable
// CASA_EMU_BLOCK_ORDER: "forward" (0, 1, ...), "reverse", or a decimal seed for a
// pseudo-random permutation (one per launch, drawn from one generator seeded once per
// process, so the same seed gives the same orders); unset means seed 1. A kernel whose
// result depends on the order (one block reading another block's output within one
// launch) then gives different results for different orders. CASA_EMU_CONCURRENT_BLOCKS
// (default 1) runs that many blocks at a time, which gives ThreadSanitizer races
// between blocks to see. emu_describe_order() says which order ran (the driver prints it).
//
// Built with -fsanitize=thread it reports data races (missing __syncthreads, and with
// concurrent blocks races between blocks); with -fsanitize=address,undefined it reports
// out-of-bounds accesses of device memory (host vectors) and of shared memory.
//
// Not emulated: tensor cores. Without __CUDA_ARCH__ the kernels take CuTe's host
// stand-ins (shim_cute.h), so fp16/bf16 operands are staged in their own type but
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
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};

// One running block: its barrier and its shared memory (key: the address of a static
// that the transform declares next to each __shared__ declaration).
struct EmuBlock {
  explicit EmuBlock(int threads) : barrier(threads) {}
  EmuBlock(const EmuBlock&) = delete;
  EmuBlock& operator=(const EmuBlock&) = delete;
  ~EmuBlock() {
    for (auto& [key, slot] : shared) ::operator delete(slot.first, slot.second);
  }
  std::barrier<> barrier;
  std::mutex mutex;
  std::vector<std::pair<const void*, std::pair<void*, std::align_val_t>>> shared;
};

inline thread_local EmuDim3 threadIdx, blockIdx;
inline thread_local EmuBlock* emu_block = nullptr;
inline EmuDim3 blockDim, gridDim;

inline void __syncthreads() { emu_block->barrier.arrive_and_wait(); }
// Device-wide atomics: acquire-release, which orders the memory around them as the
// kernels' __threadfence on each side of an atomicAdd does on the device, so the fences
// themselves have nothing left to do here (and ThreadSanitizer sees the ordering).
inline int atomicAdd(int* address, int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}
inline void __threadfence() {}
// Loads that bypass L1 on the device: plain loads here.
template <typename T>
T __ldcg(const T* address) {
  return *address;
}
inline void __trap() { std::abort(); }
using std::max;
using std::min;

// The calling thread's block's instance of the shared buffer `key` (`bytes` long),
// allocated on first use and filled with 0xFF bytes.
inline void* emu_shared_bytes(const void* key, std::size_t bytes, std::size_t alignment) {
  std::lock_guard<std::mutex> lock(emu_block->mutex);
  for (auto& [k, slot] : emu_block->shared)
    if (k == key) return slot.first;
  const auto align = std::align_val_t{alignment};
  void* p = ::operator new(bytes, align);
  std::memset(p, 0xFF, bytes);
  emu_block->shared.push_back({key, {p, align}});
  return p;
}

// The calling thread's block's instance of the shared variable `key` (of type T, which
// may be an array type).
template <typename T, std::size_t Align>
T& emu_shared(const void* key) {
  return *static_cast<T*>(emu_shared_bytes(key, sizeof(T), std::max(Align, alignof(T))));
}

struct EmuOrder {
  enum Kind { kForward, kReverse, kRandom } kind = kRandom;
  std::uint64_t seed = 1;
  int concurrent = 1;
  std::mt19937_64 rng{1};
};

inline EmuOrder& emu_order() {
  static EmuOrder order = [] {
    EmuOrder o;
    const char* env = std::getenv("CASA_EMU_BLOCK_ORDER");
    const std::string s = env != nullptr ? env : "1";
    if (s == "forward") {
      o.kind = EmuOrder::kForward;
    } else if (s == "reverse") {
      o.kind = EmuOrder::kReverse;
    } else {
      o.kind = EmuOrder::kRandom;
      o.seed = std::strtoull(s.c_str(), nullptr, 10);
      o.rng.seed(o.seed);
    }
    const char* c = std::getenv("CASA_EMU_CONCURRENT_BLOCKS");
    o.concurrent = std::max(1, c != nullptr ? std::atoi(c) : 1);
    return o;
  }();
  return order;
}

// "block order: seed=S, concurrent blocks: C" (or forward/reverse), for logs.
inline std::string emu_describe_order() {
  const EmuOrder& o = emu_order();
  std::string s = "block order: ";
  s += o.kind == EmuOrder::kForward   ? "forward"
       : o.kind == EmuOrder::kReverse ? "reverse"
                                      : "seed=" + std::to_string(o.seed);
  return s + ", concurrent blocks: " + std::to_string(o.concurrent);
}

// The order of the blocks of the next launch.
inline std::vector<int> emu_block_order(int grid) {
  EmuOrder& o = emu_order();
  std::vector<int> order(grid);
  std::iota(order.begin(), order.end(), 0);
  if (o.kind == EmuOrder::kReverse) std::reverse(order.begin(), order.end());
  if (o.kind == EmuOrder::kRandom) {
    for (int i = grid - 1; i > 0; --i) {  // Fisher-Yates, the same on every library
      std::swap(order[i], order[static_cast<int>(o.rng() % static_cast<std::uint64_t>(i + 1))]);
    }
  }
  return order;
}

// kernel<<<grid, block, 0, stream>>>(args...) becomes emu_launch(kernel, grid, block, args...).
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, int grid, int block, Args... args) {
  blockDim = {static_cast<unsigned>(block), 1, 1};
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  const std::vector<int> order = emu_block_order(grid);
  const int concurrent = emu_order().concurrent;
  for (int first = 0; first < grid; first += concurrent) {
    const int count = std::min(concurrent, grid - first);
    std::vector<std::unique_ptr<EmuBlock>> blocks;
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(count) * block);
    for (int i = 0; i < count; ++i) {
      blocks.push_back(std::make_unique<EmuBlock>(block));
      EmuBlock* state = blocks.back().get();
      const int b = order[first + i];
      for (int t = 0; t < block; ++t) {
        threads.emplace_back([=] {
          emu_block = state;
          blockIdx = {static_cast<unsigned>(b), 0, 0};
          threadIdx = {static_cast<unsigned>(t), 0, 0};
          kernel(args...);
        });
      }
    }
    for (std::thread& thread : threads) thread.join();
  }
}

// Launch errors cannot happen on the host.
#define cudaGetLastError() cudaSuccess
