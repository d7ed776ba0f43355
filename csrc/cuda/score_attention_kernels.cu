// CUDA kernels of casa::fused_score_attention (v2: the split-N design of docs/design.md
// §5 on CuTe building blocks); see score_attention_kernels.h for the stage list and the
// launcher contract. No torch headers here.
//
// Every GEMM is a CTA tile computed by a CuTe TiledMMA with fp32 accumulators:
// * fp16/bf16 operands on sm_80+ (the sm_80 and sm_90a builds): mma.sync tensor-core
//   atoms (SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x16_F32BF16BF16F32_TN), warps tiled
//   over the CTA tile;
// * fp32 operands: a scalar fp32 multiply-add atom (ScalarFma) on the CUDA cores, so fp32
//   results keep fp32 accuracy (no TF32);
// * under the host emulation (tests/ops/test_cuda_emulation.py, no __CUDA_ARCH__): the
//   scalar atom for every dtype, products and sums in fp32 like the tensor cores.
// The operand tiles reach shared memory in one of two ways:
// * gathered (gather_gemm): implicit-GEMM operands of the convolutions, read with bounds
//   masks straight from the tensors (no im2col buffer) by SIMT loads into two shared
//   stages, the next K step loaded while the tensor cores work on the current one;
// * streamed (stream_gemm): plain K-major matrices (the value projection's x rows and
//   value-weight rows), 16-byte cp.async copies (SM80_CP_ASYNC_CACHEALWAYS) in a
//   three-stage pipeline, out-of-range vectors zero-filled; UniversalCopy (a plain
//   16-byte copy) under the emulation.
// Epilogues address the accumulators through the TiledMMA's partition of an identity
// tensor (for_each_acc), so the same code serves every atom.
//
// Implicit GEMMs (p = k/2):
// * stride-2 conv, out[co, t] = Σ_{ci, j} W[co, ci, j] · in[ci, 2t + j - p];
// * stride-2 transposed conv with output_padding 1 (odd k), by output parity r:
//   out[co, 2u + r] = Σ_ci Σ_{j ≡ r+p (mod 2)} W[ci, co, j] · in[ci, u + (r + p - j)/2],
//   so K = Cin · taps(r) with no structural zeros.
//
// The host emulation relies on: launches `kernel<targs>` or `kernel` with the
// configuration (grid, block, smem, stream) on one statement, dynamic shared memory
// declared with CASA_DYNAMIC_SMEM, one-dimensional grids and blocks, and device code that
// uses only __syncthreads, threadIdx/blockIdx/blockDim/gridDim .x and CuTe.

#include "score_attention_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

// CuTe: the tensor algebra first (the atom headers expect it), then the atoms.
#include <cute/tensor.hpp>

#include <cutlass/numeric_types.h>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm80.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#ifndef CASA_CUDA_EMULATION
// The kernel's dynamic shared memory (the emulation defines its own).
#define CASA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// Tensor cores where compiled for sm_80+; the scalar atom elsewhere (host passes, emulation).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define CASA_SM80_ATOMS 1
#else
#define CASA_SM80_ATOMS 0
#endif

namespace casa {
namespace gpu {
namespace detail {

// A 1x1x1 MMA atom: d = float(a) · float(b) + c. The fp32 path on the device and every
// dtype under the emulation (cute::UniversalFMA would multiply 16-bit operands in their
// own type).
template <typename T>
struct ScalarFma {
  using DRegisters = float[1];
  using ARegisters = T[1];
  using BRegisters = T[1];
  using CRegisters = float[1];
  __host__ __device__ static void fma(float& d, T const& a, T const& b, float const& c) {
    d = static_cast<float>(a) * static_cast<float>(b) + c;
  }
};

}  // namespace detail
}  // namespace gpu
}  // namespace casa

namespace cute {
template <typename T>
struct MMA_Traits<casa::gpu::detail::ScalarFma<T>> {
  using ValTypeD = float;
  using ValTypeA = T;
  using ValTypeB = T;
  using ValTypeC = float;
  using Shape_MNK = Shape<_1, _1, _1>;
  using ThrID = Layout<_1>;
  using ALayout = Layout<Shape<_1, _1>>;
  using BLayout = Layout<Shape<_1, _1>>;
  using CLayout = Layout<Shape<_1, _1>>;
};
}  // namespace cute

namespace casa {
namespace gpu {
namespace {

using namespace cute;

// ---------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------

// Tile sizes and shared-memory sizes: launch_plan.h. The operand tiles of T:
template <typename T>
struct Tiling {
  static constexpr int kVec = operand_vec(static_cast<int>(sizeof(T)));  // elements per 16 B
  static constexpr int kBK = operand_bk(static_cast<int>(sizeof(T)));    // 32 (16-bit), 16 (fp32)
  static constexpr int kLd = operand_ld(static_cast<int>(sizeof(T)));
};

// (rows, BK, stages) K-major shared layout.
template <typename T, int kRows, int kStages>
__host__ __device__ constexpr auto operand_layout() {
  constexpr int kBK = Tiling<T>::kBK, kLd = Tiling<T>::kLd;
  return make_layout(make_shape(Int<kRows>{}, Int<kBK>{}, Int<kStages>{}),
                     make_stride(Int<kLd>{}, _1{}, Int<kRows * kLd>{}));
}

template <typename T>
struct Sm80Atom;
template <>
struct Sm80Atom<half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct Sm80Atom<bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};

// The CTA's TiledMMA: kWarpsM x kWarpsN warps of mma.sync atoms (fp16/bf16 on sm_80+),
// else a 16 x (threads/16) grid of scalar atoms.
template <typename T, int kWarpsM, int kWarpsN>
__host__ __device__ auto make_block_mma() {
#if CASA_SM80_ATOMS
  if constexpr (!std::is_same_v<T, float>) {
    return make_tiled_mma(MMA_Atom<typename Sm80Atom<T>::type>{},
                          Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>{});
  } else
#endif
  {
    constexpr int kThreads = 32 * kWarpsM * kWarpsN;
    return make_tiled_mma(MMA_Atom<detail::ScalarFma<T>>{},
                          Layout<Shape<_16, Int<kThreads / 16>, _1>>{});
  }
}

#if CASA_SM80_ATOMS
using StreamCopyOp = SM80_CP_ASYNC_CACHEALWAYS<uint128_t>;
#else
using StreamCopyOp = UniversalCopy<uint128_t>;
#endif

// ---------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------

// max(v, 0) keeping NaN, as torch.relu does (fmaxf(v, 0) returns 0 for NaN).
__host__ __device__ inline float relu(float v) { return v < 0.f ? 0.f : v; }
// max(a, b) propagating NaN, as torch's max and softmax do (fmaxf drops a NaN operand).
__host__ __device__ inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

template <typename T>
__host__ __device__ inline float to_float(T v) {
  return static_cast<float>(v);
}

__host__ __device__ constexpr int ceil_div_int(int a, int b) { return (a + b - 1) / b; }

// Transposed conv, output parity r: tap t (t < taps(r)) is j = first + 2t, and it reads
// input column u + (r + p - j) / 2 for output column 2u + r (r + p - j is even).
struct ParityTaps {
  int first, count, r, p;
  __host__ __device__ ParityTaps(int k, int r_, int p_)
      : first((r_ + p_) & 1), count(0), r(r_), p(p_) {
    count = (k - first + 1) / 2;
  }
  __host__ __device__ int tap(int t) const { return first + 2 * t; }
  __host__ __device__ int shift(int t) const { return (r + p - tap(t)) / 2; }
};

// ---------------------------------------------------------------------------------
// CTA GEMM cores
// ---------------------------------------------------------------------------------

// f(m, n, value) for every accumulator element this thread holds, (m, n) its coordinate
// in the kBM x kBN tile.
template <int kBM, int kBN, class TiledMma, class Acc, class F>
__device__ inline void for_each_acc(TiledMma const& mma, Acc const& acc, F&& f) {
  Tensor coords = mma.get_slice(threadIdx.x)
                      .partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) f(get<0>(coords(i)), get<1>(coords(i)), acc(i));
}

// acc += Σ_{g < K} A(m, g) · B(n, g) over the kBM x kBN tile, A(m, g) = load_a(m, g) and
// B(n, g) = load_b(n, g) (T, zero outside the problem). The loaders are called with the
// K index fastest across threads when a_k_fast/b_k_fast (operands contiguous in K), else
// the row index. `smem`: operand_bytes(sizeof(T), kBM, kBN, 2) bytes. Synchronises the block
// after its last use of `smem` (so the caller may reuse it); reads nothing else shared.
template <typename T, int kBM, int kBN, class TiledMma, class Acc, class LoadA, class LoadB>
__device__ void gather_gemm(TiledMma const& mma, Acc& acc, int K, const LoadA& load_a,
                            bool a_k_fast, const LoadB& load_b, bool b_k_fast, T* smem) {
  constexpr int kBK = Tiling<T>::kBK;
  constexpr int kThreads = decltype(size(mma))::value;
  Tensor sA = make_tensor(make_smem_ptr(smem), operand_layout<T, kBM, 2>());
  Tensor sB = make_tensor(make_smem_ptr(smem + cosize(operand_layout<T, kBM, 2>())),
                          operand_layout<T, kBN, 2>());
  auto fill = [&](int k0, int stage) {
    for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
      const int m = a_k_fast ? e / kBK : e % kBM, kk = a_k_fast ? e % kBK : e / kBM;
      sA(m, kk, stage) = k0 + kk < K ? load_a(m, k0 + kk) : T(0.f);
    }
    for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
      const int n = b_k_fast ? e / kBK : e % kBN, kk = b_k_fast ? e % kBK : e / kBN;
      sB(n, kk, stage) = k0 + kk < K ? load_b(n, k0 + kk) : T(0.f);
    }
  };
  auto thr = mma.get_slice(threadIdx.x);
  Tensor tCsA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K, stage)
  Tensor tCsB = thr.partition_B(sB);
  Tensor tCrA = thr.partition_fragment_A(sA(_, _, 0));
  Tensor tCrB = thr.partition_fragment_B(sB(_, _, 0));
  const int steps = ceil_div_int(K, kBK);
  if (steps > 0) fill(0, 0);
  __syncthreads();
  for (int step = 0; step < steps; ++step) {
    // Stage (step + 1) & 1 was last read in step - 1, which ended with a barrier.
    if (step + 1 < steps) fill((step + 1) * kBK, (step + 1) & 1);
    copy(tCsA(_, _, _, step & 1), tCrA);
    copy(tCsB(_, _, _, step & 1), tCrB);
    gemm(mma, tCrA, tCrB, acc);
    __syncthreads();
  }
}

// acc += A · Bᵀ over the kBM x kBN tile: A = rows [0, a_rows) of a, B = rows [0, b_rows)
// of b, both row-major with K columns (K a multiple of Tiling<T>::kVec, rows 16-byte
// aligned); rows beyond a_rows / b_rows read as zero. 16-byte cp.async copies in a
// kStages-deep pipeline; `smem`: operand_bytes(sizeof(T), kBM, kBN, kStages) bytes. Synchronises
// the block after its last use of `smem`.
template <typename T, int kBM, int kBN, int kStages, class TiledMma, class Acc>
__device__ void stream_gemm(TiledMma const& mma, Acc& acc, const T* a, int a_rows, const T* b,
                            int b_rows, int K, T* smem) {
  constexpr int kBK = Tiling<T>::kBK, kVec = Tiling<T>::kVec;
  constexpr int kThreads = decltype(size(mma))::value;
  static_assert(kBK == 4 * kVec && kThreads % 4 == 0, "one thread per 16-byte vector of a row");
  Tensor sA = make_tensor(make_smem_ptr(smem), operand_layout<T, kBM, kStages>());
  Tensor sB = make_tensor(make_smem_ptr(smem + cosize(operand_layout<T, kBM, kStages>())),
                          operand_layout<T, kBN, kStages>());
  // Threads as (kThreads/4) rows x 4 vectors: a warp copies 8 rows of 64 contiguous bytes.
  auto copier = make_tiled_copy(Copy_Atom<StreamCopyOp, T>{},
                                Layout<Shape<Int<kThreads / 4>, _4>, Stride<_4, _1>>{},
                                Layout<Shape<_1, Int<kVec>>>{});
  auto thr_copy = copier.get_slice(threadIdx.x);
  auto load = [&](const T* src, int rows, auto& s_tile, int k0, int stage, auto rows_tag) {
    constexpr int kRows = decltype(rows_tag)::value;
    Tensor g = make_tensor(make_gmem_ptr(src + k0),
                           make_layout(make_shape(Int<kRows>{}, Int<kBK>{}), make_stride(K, _1{})));
    Tensor c = make_identity_tensor(make_shape(Int<kRows>{}, Int<kBK>{}));
    Tensor tg = thr_copy.partition_S(g);  // (CPY, CPY_M, CPY_K)
    Tensor tc = thr_copy.partition_S(c);
    Tensor ts = thr_copy.partition_D(s_tile(_, _, stage));
    CUTE_UNROLL
    for (int i = 0; i < size<1>(tg); ++i) {
      CUTE_UNROLL
      for (int j = 0; j < size<2>(tg); ++j) {
        if (get<0>(tc(0, i, j)) < rows && k0 + get<1>(tc(0, i, j)) < K) {
          copy(copier, tg(_, i, j), ts(_, i, j));
        } else {
          clear(ts(_, i, j));
        }
      }
    }
  };
  auto load_step = [&](int step, int stage) {
    load(a, a_rows, sA, step * kBK, stage, Int<kBM>{});
    load(b, b_rows, sB, step * kBK, stage, Int<kBN>{});
  };
  auto thr = mma.get_slice(threadIdx.x);
  Tensor tCsA = thr.partition_A(sA);
  Tensor tCsB = thr.partition_B(sB);
  Tensor tCrA = thr.partition_fragment_A(sA(_, _, 0));
  Tensor tCrB = thr.partition_fragment_B(sB(_, _, 0));
  const int steps = ceil_div_int(K, kBK);
  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_step(s, s);
    cp_async_fence();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `step` have landed
    __syncthreads();               // everyone's have; everyone is done with step - 1
    const int next = step + kStages - 1;
    if (next < steps) load_step(next, next % kStages);  // the stage step - 1 read
    cp_async_fence();
    const int stage = step % kStages;
    copy(tCsA(_, _, _, stage), tCrA);
    copy(tCsB(_, _, _, stage), tCrB);
    gemm(mma, tCrA, tCrB, acc);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// ---------------------------------------------------------------------------------
// Stage 1: encoder head
// ---------------------------------------------------------------------------------

// partial[s, b, c, t] = Σ_{n in split s} Σ_j w0[c, n, j] · x[b, n, 2t + j - p],
// c < C1 = D/4, t < D/2. Blocks: (t tile, c tile, split, batch), flattened.
template <typename T>
__global__ void __launch_bounds__(kHeadThreads)
    head_kernel(const T* __restrict__ x, const T* __restrict__ w0, float* __restrict__ partial,
                int B, int N, int D, int k, int splits, int n_chunk) {
  CASA_DYNAMIC_SMEM(smem);
  const int C1 = D / 4, L1 = D / 2, p = k / 2;
  const int tiles_t = ceil_div_int(L1, kHeadCols), tiles_c = ceil_div_int(C1, kHeadRows);
  int idx = blockIdx.x;
  const int tt = idx % tiles_t;
  idx /= tiles_t;
  const int tc = idx % tiles_c;
  idx /= tiles_c;
  const int s = idx % splits;
  const int b = idx / splits;
  const int t0 = tt * kHeadCols, c0 = tc * kHeadRows;
  const int n_begin = min(N, s * n_chunk), n_end = min(N, n_begin + n_chunk);
  const int K = (n_end - n_begin) * k, g0 = n_begin * k;
  const T* x_b = x + static_cast<int64_t>(b) * N * D;

  auto load_a = [&](int m, int g) -> T {
    const int c = c0 + m;
    return c < C1 ? w0[static_cast<int64_t>(c) * N * k + g0 + g] : T(0.f);
  };
  auto load_b = [&](int col, int g) -> T {
    const int t = t0 + col, n = (g0 + g) / k, j = (g0 + g) % k, pos = 2 * t + j - p;
    return (t < L1 && pos >= 0 && pos < D) ? x_b[static_cast<int64_t>(n) * D + pos] : T(0.f);
  };
  auto mma = make_block_mma<T, 4, 2>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kHeadRows>{}, Int<kHeadCols>{}));
  clear(acc);
  gather_gemm<T, kHeadRows, kHeadCols>(mma, acc, K, load_a, true, load_b, false,
                                       reinterpret_cast<T*>(smem));

  float* out = partial + (static_cast<int64_t>(s) * B + b) * C1 * L1;
  for_each_acc<kHeadRows, kHeadCols>(mma, acc, [&](int m, int col, float v) {
    const int c = c0 + m, t = t0 + col;
    if (c < C1 && t < L1) out[static_cast<int64_t>(c) * L1 + t] = v;
  });
}

// h1[b, c, t] = relu(bias[c] + Σ_s partial[s, b, c, t]) in T; one thread per element.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    head_reduce_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                       T* __restrict__ h1, int B, int C1, int L1, int splits) {
  const int64_t total = static_cast<int64_t>(B) * C1 * L1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>((i / L1) % C1);
    float v = to_float(bias[c]);
    for (int s = 0; s < splits; ++s) v += partial[s * total + i];
    h1[i] = T(relu(v));
  }
}

// ---------------------------------------------------------------------------------
// Stage 2: bottleneck (activations in T, tensor cores for fp16/bf16, fp32 accumulation)
// ---------------------------------------------------------------------------------

// out[b, co, t] = relu(bias[co] + Σ_{ci, j} w[co, ci, j] · in[b, ci, 2t + j - p]);
// in: [B, Cin, Lin], out: [B, Cout, Lin/2]. Blocks: (t tile, co tile, batch).
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    conv_s2_relu_kernel(const T* __restrict__ in, const T* __restrict__ w,
                        const T* __restrict__ bias, T* __restrict__ out, int Cin, int Lin, int Cout,
                        int k) {
  CASA_DYNAMIC_SMEM(smem);
  const int Lout = Lin / 2, p = k / 2;
  const int tiles_t = ceil_div_int(Lout, kConvCols), tiles_c = ceil_div_int(Cout, kConvRows);
  int idx = blockIdx.x;
  const int tt = idx % tiles_t;
  idx /= tiles_t;
  const int tc = idx % tiles_c;
  const int b = idx / tiles_c;
  const int t0 = tt * kConvCols, c0 = tc * kConvRows;
  const T* in_b = in + static_cast<int64_t>(b) * Cin * Lin;

  auto load_a = [&](int m, int g) -> T {
    const int co = c0 + m;
    return co < Cout ? w[static_cast<int64_t>(co) * Cin * k + g] : T(0.f);
  };
  auto load_b = [&](int col, int g) -> T {
    const int t = t0 + col, ci = g / k, pos = 2 * t + g % k - p;
    return (t < Lout && pos >= 0 && pos < Lin) ? in_b[static_cast<int64_t>(ci) * Lin + pos]
                                               : T(0.f);
  };
  auto mma = make_block_mma<T, 2, 2>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kConvRows>{}, Int<kConvCols>{}));
  clear(acc);
  gather_gemm<T, kConvRows, kConvCols>(mma, acc, Cin * k, load_a, true, load_b, false,
                                       reinterpret_cast<T*>(smem));

  T* out_b = out + static_cast<int64_t>(b) * Cout * Lout;
  for_each_acc<kConvRows, kConvCols>(mma, acc, [&](int m, int col, float v) {
    const int co = c0 + m, t = t0 + col;
    if (co < Cout && t < Lout)
      out_b[static_cast<int64_t>(co) * Lout + t] = T(relu(v + to_float(bias[co])));
  });
}

// out[b, co, 2u + r] = relu(bias[co] + Σ_ci Σ_{j ≡ r+p} w[ci, co, j] · in[b, ci, u + (r+p-j)/2]);
// the transposed conv (stride 2, padding p, output_padding 1). in: [B, Cin, Lin],
// w: [Cin, Cout, k], out: [B, Cout, 2·Lin]. Blocks: (u tile, co tile, parity r, batch).
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    conv_transpose_s2_relu_kernel(const T* __restrict__ in, const T* __restrict__ w,
                                  const T* __restrict__ bias, T* __restrict__ out, int Cin, int Lin,
                                  int Cout, int k) {
  CASA_DYNAMIC_SMEM(smem);
  const int Lout = 2 * Lin;
  const int tiles_u = ceil_div_int(Lin, kConvCols), tiles_c = ceil_div_int(Cout, kConvRows);
  int idx = blockIdx.x;
  const int tu = idx % tiles_u;
  idx /= tiles_u;
  const int tc = idx % tiles_c;
  idx /= tiles_c;
  const int r = idx % 2;
  const int b = idx / 2;
  const int u0 = tu * kConvCols, c0 = tc * kConvRows;
  const ParityTaps taps(k, r, k / 2);
  const T* in_b = in + static_cast<int64_t>(b) * Cin * Lin;

  auto load_a = [&](int m, int g) -> T {
    const int co = c0 + m, ci = g / taps.count, j = taps.tap(g % taps.count);
    return co < Cout ? w[(static_cast<int64_t>(ci) * Cout + co) * k + j] : T(0.f);
  };
  auto load_b = [&](int col, int g) -> T {
    const int u = u0 + col, ci = g / taps.count, pos = u + taps.shift(g % taps.count);
    return (u < Lin && pos >= 0 && pos < Lin) ? in_b[static_cast<int64_t>(ci) * Lin + pos] : T(0.f);
  };
  auto mma = make_block_mma<T, 2, 2>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kConvRows>{}, Int<kConvCols>{}));
  clear(acc);
  gather_gemm<T, kConvRows, kConvCols>(mma, acc, Cin * taps.count, load_a, false, load_b, false,
                                       reinterpret_cast<T*>(smem));

  T* out_b = out + static_cast<int64_t>(b) * Cout * Lout;
  for_each_acc<kConvRows, kConvCols>(mma, acc, [&](int m, int col, float v) {
    const int co = c0 + m, u = u0 + col;
    if (co < Cout && u < Lin)
      out_b[static_cast<int64_t>(co) * Lout + 2 * u + r] = T(relu(v + to_float(bias[co])));
  });
}

// ---------------------------------------------------------------------------------
// Stage 3: tail, split over N (stats, merge, output)
// ---------------------------------------------------------------------------------

// Arguments of the tail kernels. h5: [B, D/4, D/2] (relu(dec1) output, T); w2: the dec2
// weight, element (c, n, j) at c · w2_sc + n · w2_sn + j · w2_sj ([C1, N, k] contiguous, or
// packed as [N, k, C1], then w2_packed); b2: [N]; wv: [D, D]; bv: [D]; stats:
// [B, n_tiles, D] (max, Σexp) per row tile; merged: [B, D] (max, 1/Σexp) over all rows.
template <typename T>
struct TailArgs {
  const T* x;
  const T* h5;
  const T* w2;
  const T* b2;
  const T* wv;
  const T* bv;
  T* y;
  float2* stats;
  float2* merged;
  int N, D, k, n_tiles;
  int64_t w2_sc, w2_sn, w2_sj;
  bool w2_packed;
};

// The tail CTA of blockIdx.x: batch b, rows [n0, n0 + rows), columns [o0, o0 + cols).
struct TailTile {
  int b, n_tile, n0, rows, o0, cols;
};

__device__ inline TailTile tail_tile(int N, int D, int n_tiles) {
  const int col_tiles = ceil_div_int(D, kTailCols);
  int idx = blockIdx.x;
  TailTile t;
  const int ct = idx % col_tiles;
  idx /= col_tiles;
  t.n_tile = idx % n_tiles;
  t.b = idx / n_tiles;
  t.n0 = t.n_tile * kTailRows;
  t.rows = min(kTailRows, N - t.n0);
  t.o0 = ct * kTailCols;
  t.cols = min(kTailCols, D - t.o0);
  return t;
}

// P[m][o] <- finish(m, o, S[n0 + m, o0 + o]) for m < rows, o < cols, where
//   S[n, o] = sigmoid(b2[n] + Σ_c Σ_{j ≡ o+p (mod 2)} w2[c, n, j] · h5[b, c, o/2 + (o%2 + p -
//   j)/2])
//             + x[b, n, o],
// the last transposed conv as one gathered GEMM per output parity (kTailRows x
// kTailCols/2, K = taps(r) · C1, channels fastest) whose raw sums land in P's even or odd
// columns (the packed w2 is then read coalesced, K fastest across threads), then one
// row-major pass (coalesced x reads) adding bias, sigmoid and skip. Ends with a barrier.
template <typename T, class Finish>
__device__ void tail_scores(const TailArgs<T>& a, const TailTile& t, float* P, T* ops,
                            const Finish& finish) {
  const int N = a.N, D = a.D, k = a.k, C1 = D / 4, U = D / 2, u0 = t.o0 / 2;
  const T* h5_b = a.h5 + static_cast<int64_t>(t.b) * C1 * U;
  const T* x_b = a.x + static_cast<int64_t>(t.b) * N * D;
  auto mma = make_block_mma<T, 4, 2>();
  for (int r = 0; r < 2; ++r) {
    const ParityTaps taps(k, r, k / 2);
    auto load_a = [&](int m, int g) -> T {
      const int n = t.n0 + m, c = g % C1, j = taps.tap(g / C1);
      return m < t.rows ? a.w2[c * a.w2_sc + n * a.w2_sn + j * a.w2_sj] : T(0.f);
    };
    auto load_b = [&](int uu, int g) -> T {
      const int u = u0 + uu, c = g % C1, pos = u + taps.shift(g / C1);
      return (u < U && pos >= 0 && pos < U) ? h5_b[static_cast<int64_t>(c) * U + pos] : T(0.f);
    };
    Tensor acc = partition_fragment_C(mma, make_shape(Int<kTailRows>{}, Int<kTailCols / 2>{}));
    clear(acc);
    gather_gemm<T, kTailRows, kTailCols / 2>(mma, acc, C1 * taps.count, load_a, a.w2_packed, load_b,
                                             false, ops);
    for_each_acc<kTailRows, kTailCols / 2>(
        mma, acc, [&](int m, int uu, float v) { P[m * kTailLd + 2 * uu + r] = v; });
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTailRows * kTailCols; e += kTailThreads) {
    const int m = e / kTailCols, o = e % kTailCols, n = t.n0 + m;
    if (m < t.rows && o < t.cols) {
      const float z = P[m * kTailLd + o] + to_float(a.b2[n]);
      const float s =
          1.f / (1.f + expf(-z)) + to_float(x_b[static_cast<int64_t>(n) * D + t.o0 + o]);
      P[m * kTailLd + o] = finish(m, o, s);
    }
  }
  __syncthreads();
}

// stats[b, n_tile, o] = (max, Σ exp(S - max)) of the scores of the CTA's rows, for its
// columns. Blocks: (column tile, row tile, batch).
template <typename T>
__global__ void __launch_bounds__(kTailThreads) tail_stats_kernel(TailArgs<T> a) {
  CASA_DYNAMIC_SMEM(smem);
  float* P = reinterpret_cast<float*>(smem);
  T* ops = reinterpret_cast<T*>(smem + kTailPBytes);
  const TailTile t = tail_tile(a.N, a.D, a.n_tiles);
  tail_scores(a, t, P, ops, [](int, int, float s) { return s; });
  for (int o = threadIdx.x; o < t.cols; o += kTailThreads) {
    float mx = -INFINITY;
    for (int m = 0; m < t.rows; ++m) mx = max_nan(mx, P[m * kTailLd + o]);
    // Rows of -inf scores add nothing (a column of only -inf has sum 0: exp(-inf - (-inf))
    // would be NaN); NaN and +inf propagate as in the reference.
    float sum = 0.f;
    if (mx != -INFINITY) {
      for (int m = 0; m < t.rows; ++m) sum += expf(P[m * kTailLd + o] - mx);
    }
    a.stats[(static_cast<int64_t>(t.b) * a.n_tiles + t.n_tile) * a.D + t.o0 + o] =
        make_float2(mx, sum);
  }
}

// merged[b, o] = (max over the row tiles, 1 / Σ_tiles sum · exp(max_tile - max)). A tile
// with no finite score has (-inf, 0) and contributes nothing; NaN propagates. For a
// column of -inf scores 1/0 = inf, and the output's exp(NaN) then gives NaN, as the
// reference's softmax does. One thread per (b, o).
__global__ void __launch_bounds__(kReduceThreads)
    tail_merge_kernel(const float2* __restrict__ stats, float2* __restrict__ merged, int B, int D,
                      int tiles) {
  const int64_t total = static_cast<int64_t>(B) * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / D, o = i % D;
    const float2* st = stats + b * tiles * D + o;
    float m_all = -INFINITY;
    for (int t = 0; t < tiles; ++t) m_all = max_nan(m_all, st[static_cast<int64_t>(t) * D].x);
    float sum = 0.f;
    for (int t = 0; t < tiles; ++t) {
      const float2 s = st[static_cast<int64_t>(t) * D];
      if (s.x != -INFINITY) sum += s.y * expf(s.x - m_all);
    }
    merged[i] = make_float2(m_all, 1.f / sum);
  }
}

// y[b, n, o] = exp(S[n, o] - max[o]) / Σ[o] · (bv[o] + Σ_d x[b, n, d] · wv[o, d]) + x[b, n, o]
// for the CTA's rows and columns: the probabilities into P (scores recomputed), the value
// tile as one streamed 128 x 128 GEMM (K = D), P ⊙ (V + bv) in place, then a row-major
// pass adding x and writing y (coalesced). Blocks: (column tile, row tile, batch).
template <typename T>
__global__ void __launch_bounds__(kTailThreads) tail_output_kernel(TailArgs<T> a) {
  CASA_DYNAMIC_SMEM(smem);
  float* P = reinterpret_cast<float*>(smem);
  float2* col = reinterpret_cast<float2*>(smem + kTailRows * kTailLd * 4);
  T* ops = reinterpret_cast<T*>(smem + kTailPBytes);
  const int N = a.N, D = a.D;
  const TailTile t = tail_tile(N, D, a.n_tiles);
  for (int o = threadIdx.x; o < t.cols; o += kTailThreads)
    col[o] = a.merged[static_cast<int64_t>(t.b) * D + t.o0 + o];
  __syncthreads();
  tail_scores(a, t, P, ops, [&](int, int o, float s) { return expf(s - col[o].x) * col[o].y; });

  const T* x_b = a.x + static_cast<int64_t>(t.b) * N * D;
  T* y_b = a.y + static_cast<int64_t>(t.b) * N * D;
  auto mma = make_block_mma<T, 4, 2>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kTailRows>{}, Int<kTailCols>{}));
  clear(acc);
  stream_gemm<T, kTailRows, kTailCols, kValueStages>(mma, acc, x_b + static_cast<int64_t>(t.n0) * D,
                                                     t.rows, a.wv + static_cast<int64_t>(t.o0) * D,
                                                     t.cols, D, ops);
  for_each_acc<kTailRows, kTailCols>(mma, acc, [&](int m, int o, float v) {
    if (m < t.rows && o < t.cols) P[m * kTailLd + o] *= v + to_float(a.bv[t.o0 + o]);
  });
  __syncthreads();
  for (int e = threadIdx.x; e < kTailRows * kTailCols; e += kTailThreads) {
    const int m = e / kTailCols, o = e % kTailCols;
    if (m < t.rows && o < t.cols) {
      const int64_t at = static_cast<int64_t>(t.n0 + m) * D + t.o0 + o;
      y_b[at] = T(P[m * kTailLd + o] + to_float(x_b[at]));
    }
  }
}

// ---------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------

// Raises the kernel's dynamic shared memory limit to `bytes` (needed above 48 KiB).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
#ifdef CASA_CUDA_EMULATION
  (void)kernel, (void)bytes;
  return cudaSuccess;
#else
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
#endif
}

// Workspace regions, in floats, each a multiple of 32 floats (128 bytes).
int64_t round_floats(int64_t n) { return (n + 31) / 32 * 32; }

template <typename T>
cudaError_t launch_typed(const Params& prm, cudaStream_t stream) {
  const int B = static_cast<int>(prm.problem.batch), N = static_cast<int>(prm.problem.n_vars);
  const int D = static_cast<int>(prm.problem.d_model), k = static_cast<int>(prm.problem.kernel);
  const int C1 = D / 4, C2 = D / 2;
  const int head_splits = prm.plan.head_splits, n_tiles = prm.plan.tail_splits;
  auto w = [&](WeightIndex i) { return static_cast<const T*>(prm.weights[i]); };
  const T* x = static_cast<const T*>(prm.x);
  T* y = static_cast<T*>(prm.y);

  const int64_t act = static_cast<int64_t>(B) * D * D / 8;  // every activation is [B, D²/8]
  const int64_t act_floats = round_floats(act * static_cast<int64_t>(sizeof(T)) / 4 + 1);
  float* partial = prm.workspace;  // [head_splits, B, C1, D/2] fp32
  float* next = partial + round_floats(head_splits * act);
  T* h[5];  // h1 [B, C1, D/2], h2 [B, C2, D/4], h3 [B, D, D/8], h4 [B, C2, D/4], h5 [B, C1, D/2]
  for (T*& hi : h) {
    hi = reinterpret_cast<T*>(next);
    next += act_floats;
  }
  float2* stats = reinterpret_cast<float2*>(next);  // [B, n_tiles, D]
  float2* merged = reinterpret_cast<float2*>(next + round_floats(2LL * B * n_tiles * D));

  // Grids and shared memory: the plan (launch_plan.h); its grids fit int (problem_supported).
  const LaunchPlan lp = plan_launches(prm.problem, prm.plan, prm.dtype);
  auto blocks = [](const Launch& launch) { return static_cast<int>(launch.blocks); };
  cudaError_t err = cudaSuccess;
  // 1. head
  {
    const int smem = lp.head.smem_bytes;
    if ((err = allow_smem(head_kernel<T>, smem)) != cudaSuccess) return err;
    head_kernel<T><<<blocks(lp.head), kHeadThreads, smem, stream>>>(
        x, w(kEnc0Weight), partial, B, N, D, k, head_splits, chunk_rows(N, head_splits, 1));
    head_reduce_kernel<T><<<blocks(lp.head_reduce), kReduceThreads, 0, stream>>>(
        partial, w(kEnc0Bias), h[0], B, C1, D / 2, head_splits);
  }
  // 2. bottleneck: enc1 (C1 -> C2, D/2 -> D/4), enc2 (C2 -> D, D/4 -> D/8),
  //    dec0 (D -> C2, D/8 -> D/4), dec1 (C2 -> C1, D/4 -> D/2)
  {
    const int smem = lp.enc1.smem_bytes;  // the same for the four convs
    if ((err = allow_smem(conv_s2_relu_kernel<T>, smem)) != cudaSuccess) return err;
    if ((err = allow_smem(conv_transpose_s2_relu_kernel<T>, smem)) != cudaSuccess) return err;
    conv_s2_relu_kernel<T><<<blocks(lp.enc1), kConvThreads, smem, stream>>>(
        h[0], w(kEnc1Weight), w(kEnc1Bias), h[1], C1, D / 2, C2, k);
    conv_s2_relu_kernel<T><<<blocks(lp.enc2), kConvThreads, smem, stream>>>(
        h[1], w(kEnc2Weight), w(kEnc2Bias), h[2], C2, D / 4, D, k);
    conv_transpose_s2_relu_kernel<T><<<blocks(lp.dec0), kConvThreads, smem, stream>>>(
        h[2], w(kDec0Weight), w(kDec0Bias), h[3], D, D / 8, C2, k);
    conv_transpose_s2_relu_kernel<T><<<blocks(lp.dec1), kConvThreads, smem, stream>>>(
        h[3], w(kDec1Weight), w(kDec1Bias), h[4], C2, D / 4, C1, k);
  }
  // 3. tail: row-tile stats, their merge, output
  {
    // dec2 strides (c, n, j): packed [N, k, C1] or contiguous [C1, N, k].
    const bool packed = prm.dec2_packed;
    const int64_t w2_sc = packed ? 1 : static_cast<int64_t>(N) * k;
    const int64_t w2_sn = packed ? static_cast<int64_t>(k) * C1 : k;
    const int64_t w2_sj = packed ? C1 : 1;
    const TailArgs<T> args{x,
                           h[4],
                           w(kDec2Weight),
                           w(kDec2Bias),
                           w(kValueWeight),
                           w(kValueBias),
                           y,
                           stats,
                           merged,
                           N,
                           D,
                           k,
                           n_tiles,
                           w2_sc,
                           w2_sn,
                           w2_sj,
                           packed};
    const int stats_smem = lp.tail_stats.smem_bytes;
    const int output_smem = lp.tail_output.smem_bytes;
    if ((err = allow_smem(tail_stats_kernel<T>, stats_smem)) != cudaSuccess) return err;
    if ((err = allow_smem(tail_output_kernel<T>, output_smem)) != cudaSuccess) return err;
    tail_stats_kernel<T><<<blocks(lp.tail_stats), kTailThreads, stats_smem, stream>>>(args);
    tail_merge_kernel<<<blocks(lp.tail_merge), kReduceThreads, 0, stream>>>(stats, merged, B, D,
                                                                            n_tiles);
    tail_output_kernel<T><<<blocks(lp.tail_output), kTailThreads, output_smem, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace

size_t workspace_floats(const Problem& p, const Plan& plan) {
  const int64_t B = p.batch, D = p.d_model;
  const int64_t act = B * D * D / 8;
  // 2 bytes per element of fp16/bf16 would do; sized for fp32, the widest.
  const int64_t act_floats = round_floats(act + 1);
  return static_cast<size_t>(round_floats(plan.head_splits * act) + 5 * act_floats +
                             round_floats(2 * B * plan.tail_splits * D) + 2 * B * D);
}

size_t shared_memory_bytes(DType dtype) {
  return static_cast<size_t>(tail_smem_bytes(dtype_bytes(dtype), true));
}

bool problem_supported(const Problem& p, const char** why) {
  const int64_t int_max = 0x7fffffff;
  const char* reason = nullptr;
  if (p.batch < 1 || p.n_vars < 1 || p.d_model < 8 || p.d_model % 8 != 0 || p.kernel < 1 ||
      p.kernel % 2 == 0) {
    reason = "expected batch >= 1, n_vars >= 1, d_model a positive multiple of 8, odd kernel";
  } else if (p.n_vars * p.kernel > int_max / 2 || p.d_model > int_max / 4) {
    reason = "n_vars * kernel and d_model must fit 32-bit indices";
  } else if (head_blocks(p, kMaxHeadSplits) > int_max || tail_blocks(p) > int_max) {
    reason = "batch too large for a one-dimensional grid";
  }
  if (why != nullptr) *why = reason;
  return reason == nullptr;
}

cudaError_t launch_fused_score_attention(const Params& params, cudaStream_t stream) {
  if (!problem_supported(params.problem, nullptr) || params.plan.head_splits < 1 ||
      params.plan.head_splits > kMaxHeadSplits ||
      params.plan.tail_splits != tail_tiles(params.problem.n_vars)) {
    return cudaErrorInvalidValue;
  }
  if (reinterpret_cast<uintptr_t>(params.x) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(params.weights[kValueWeight]) % 16 != 0) {
    return cudaErrorMisalignedAddress;  // the value GEMM's 16-byte cp.async copies
  }
  switch (params.dtype) {
    case DType::kFloat32: return launch_typed<float>(params, stream);
    case DType::kFloat16: return launch_typed<half_t>(params, stream);
    case DType::kBFloat16: return launch_typed<bfloat16_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace casa
