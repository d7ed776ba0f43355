// CUDA kernels of casa::fused_score_attention (v3: the split-N design of docs/design.md
// §5 on CuTe building blocks, every operand brought by 16-byte async copies); see
// score_attention_kernels.h for the stage list and the launcher contract. No torch
// headers here.
//
// Every GEMM is a CTA tile computed by a CuTe TiledMMA with fp32 accumulators:
// * fp16/bf16 operands on sm_80+ (the sm_80, sm_86 and sm_90a builds): mma.sync
//   tensor-core atoms (SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x16_F32BF16BF16F32_TN),
//   warps tiled over the CTA tile; on sm_90a the tail's value GEMM on wgmma instead
//   (make_value_mma: two warpgroups, operands swizzled in shared memory);
// * fp32 operands: a scalar fp32 multiply-add atom (ScalarFma) on the CUDA cores, so fp32
//   results keep fp32 accuracy (no TF32);
// * under the host emulation (tests/ops/test_cuda_emulation.py, no __CUDA_ARCH__): the
//   scalar atom for every dtype, products and sums in fp32 like the tensor cores.
// The operand tiles reach shared memory by 16-byte cp.async copies in multi-stage
// pipelines (plain 16-byte copies under the emulation), in one of two ways:
// * conv tiles (conv_gemm): the convolutions (the head, the bottleneck, the tail's score
//   GEMM) as implicit GEMMs with no im2col buffer: per K step of input channels, the
//   weights of every tap (packed per tap once per weight version, launch_plan.h) and one
//   contiguous halo tile of the input rows; each tap is an MMA on the halo tile at its
//   shared-memory offset; the kernel size k is a template parameter (1, 3, 5, 7);
// * streamed (stream_gemm): plain K-major matrices (the value projection's x rows and
//   value-weight rows), out-of-range vectors zero-filled.
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
#include <iterator>
#include <type_traits>

// CuTe: the tensor algebra first (the atom headers expect it), then the atoms.
#include <cute/tensor.hpp>

#include <cutlass/numeric_types.h>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm80.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#ifndef CASA_CUDA_EMULATION
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#endif

#ifndef CASA_CUDA_EMULATION
// The kernel's dynamic shared memory (the emulation defines its own). 1024-byte aligned:
// the swizzled wgmma operand tiles (stream_gemm) follow the address bits.
#define CASA_DYNAMIC_SMEM(name) extern __shared__ __align__(1024) unsigned char name[]
#endif

// Tensor cores where compiled for sm_80+; the scalar atom elsewhere (host passes, emulation).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define CASA_SM80_ATOMS 1
#else
#define CASA_SM80_ATOMS 0
#endif
// wgmma (warpgroup MMAs on operands in shared memory) where compiled for sm_90a.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CASA_SM90_GMMA 1
#else
#define CASA_SM90_GMMA 0
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

// The value GEMM (stream_gemm) runs on wgmma: fp16/bf16 on sm_90a.
template <typename T>
constexpr bool kValueGmma = CASA_SM90_GMMA && !std::is_same_v<T, float>;

// The value GEMM's TiledMMA over a kBM x kBN tile (kBM = 64): with kValueGmma, two
// warpgroups side by side along N, each one kBM x kBN/2 wgmma atom reading both operands
// from shared memory (K-major); else make_block_mma<T, 4, 2>.
template <typename T, int kBM, int kBN>
__host__ __device__ auto make_value_mma() {
#if CASA_SM90_GMMA
  if constexpr (kValueGmma<T>) {
    using Atom =
        decltype(SM90::GMMA::ss_op_selector<T, T, float,
                                            Shape<Int<kBM>, Int<kBN / 2>, Int<Tiling<T>::kBK>>>());
    return make_tiled_mma(Atom{}, Layout<Shape<_1, _2, _1>>{});
  } else
#endif
  {
    return make_block_mma<T, 4, 2>();
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
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
// exp(v) as exp2(v · log2 e), for the tail's fp32 sigmoid and softmax: one multiply and
// the exp2 unit where expf spends five floating-point instructions on its range
// reduction. The rounding of the product adds a relative error of about |v| · 2^-24 to
// exp2f's 2 ulp, at most 6e-6 over expf's finite range (|v| < 104), within the fp32
// tolerance (2e-5). ±inf and NaN map as in expf.
__host__ __device__ inline float exp_via_exp2(float v) { return exp2f(v * kLog2e); }

// 2^v and 1/v by the special-function unit alone (MUFU.EX2, MUFU.RCP: about 2 ulp and
// 1 ulp, subnormal inputs and results flushed to zero) on the device; exp2f and an IEEE
// division on the host (the emulation). ±inf, 0 and NaN map as in exp2f and 1/v.
__host__ __device__ inline float fast_exp2(float v) {
#ifdef __CUDA_ARCH__
  float out;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(out) : "f"(v));
  return out;
#else
  return exp2f(v);
#endif
}
__host__ __device__ inline float fast_rcp(float v) {
#ifdef __CUDA_ARCH__
  float out;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(out) : "f"(v));
  return out;
#else
  return 1.f / v;
#endif
}

// The tail's element-wise math on scores s = sigmoid(z + b2) + x, in the units its score
// tile P, its statistics and their merge share:
// * fp16/bf16 (the tensor-core path) in log2 units, u = log2(e) · s, so that every
//   exp(s − s') is 2^(u − u'): one subtraction and MUFU.EX2. The sigmoid is three fused
//   multiply-adds and two MUFU operations: t = −log2(e) · (z + b2), and
//   u = log2(e) · x + 1 / (ln 2 · (1 + 2^t)); a probability exp(s − max) / Σ is
//   2^(u − (max + log2 Σ)), one subtraction and MUFU.EX2. Four FP instructions per score
//   and probability where the fp32 form takes 14 (ex2's subnormal scaling, the IEEE
//   division's Newton steps). The roundings add a relative error of about
//   (|s| + |max| + log2 N) · 2^-23 to a probability, far below the bf16/fp16 outputs'
//   2^-8.
// * fp32 in natural units with the exact division and exp_via_exp2, within the fp32
//   tolerance (2e-5) for any finite score.
template <typename T>
struct TailMath {
  static constexpr bool kLog2 = !std::is_same_v<T, float>;
  // The per-row constant score() takes: −log2(e) · b2, or b2.
  __host__ __device__ static float row_bias(float b2) { return kLog2 ? -kLog2e * b2 : b2; }
  // The score of the raw conv sum z of a row whose constant is `bias`, skip value x.
  __host__ __device__ static float score(float z, float bias, float x) {
    if constexpr (kLog2) {
      const float e = fast_exp2(fmaf(z, -kLog2e, bias));
      return fmaf(x, kLog2e, fast_rcp(fmaf(e, kLn2, kLn2)));
    } else {
      return 1.f / (1.f + exp_via_exp2(-(z + bias))) + x;
    }
  }
  // exp(s − s') of two scores (or maxima) in these units.
  __host__ __device__ static float exp_diff(float u, float u_other) {
    if constexpr (kLog2) {
      return fast_exp2(u - u_other);
    } else {
      return exp_via_exp2(u - u_other);
    }
  }
  // What probability() takes of a column whose statistics are st = (max, Σ exp(s − max)):
  // max + log2 Σ, or (max, 1 / Σ). A column of only -inf scores (Σ = 0) gets -inf, or
  // 1/0 = inf, and its probabilities NaN (exp(-inf + inf)), as the reference's softmax.
  __host__ __device__ static float2 normaliser(float2 st) {
    if constexpr (kLog2) {
      return make_float2(st.x + log2f(st.y), 0.f);
    } else {
      return make_float2(st.x, 1.f / st.y);
    }
  }
  // exp(s − max) / Σ of a score of the column whose normaliser is `norm`.
  __host__ __device__ static float probability(float u, float2 norm) {
    const float e = exp_diff(u, norm.x);
    if constexpr (kLog2) {
      return e;
    } else {
      return e * norm.y;
    }
  }
};

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

// f(m, n, acc element) for every accumulator element this thread holds, (m, n) its
// coordinate in the kBM x kBN tile (f may take the element by reference to set it).
template <int kBM, int kBN, class TiledMma, class Acc, class F>
__device__ inline void for_each_acc(TiledMma const& mma, Acc& acc, F&& f) {
  Tensor coords = mma.get_slice(threadIdx.x)
                      .partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) f(get<0>(coords(i)), get<1>(coords(i)), acc(i));
}

struct NoHook {
  __device__ void operator()() const {}
};

// The K loop of a kStages-deep cp.async pipeline over `steps` K-steps: load(step, stage)
// issues the copies of a step into shared-memory stage `stage`, consume(stage) runs a landed
// stage's MMAs. Stage step % kStages is refilled only after every thread is done with it.
// landed() runs in each thread once its copies of a step have landed, before the barrier
// that publishes them. Synchronises the block after the last step.
template <int kStages, class Load, class Consume, class Landed = NoHook>
__device__ inline void pipelined_steps(int steps, Load&& load, Consume&& consume,
                                       Landed&& landed = {}) {
  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_fence();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `step` have landed
    landed();
    __syncthreads();  // everyone's have; everyone is done with step - 1
    const int next = step + kStages - 1;
    if (next < steps) load(next, next % kStages);  // the stage step - 1 read
    cp_async_fence();
    consume(step % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// Whether a TiledMMA is built of warpgroup (wgmma) atoms: 128 threads per atom.
template <class TiledMma>
constexpr bool kWarpgroupMma = decltype(size(typename TiledMma::AtomThrID{}))::value == 128;

// The (rows, BK, stages) shared layout of a streamed operand: operand_layout's padded
// K-major rows, or for wgmma (kGmma) K-major in the 64-byte swizzle its shared-memory
// descriptors address (atoms of 8 rows x BK = 32 16-bit elements, 512 bytes, each stage
// a whole number of them).
template <typename T, int kRows, int kStages, bool kGmma>
__host__ __device__ constexpr auto stream_operand_layout() {
#if CASA_SM90_GMMA
  if constexpr (kGmma) {
    return tile_to_shape(GMMA::Layout_K_SW64_Atom<T>{},
                         make_shape(Int<kRows>{}, Int<Tiling<T>::kBK>{}, Int<kStages>{}));
  } else
#endif
  {
    return operand_layout<T, kRows, kStages>();
  }
}

// acc += A · Bᵀ over the kBM x kBN tile: A = rows [0, a_rows) of a, B = rows [0, b_rows)
// of b, both row-major with K columns (K a multiple of Tiling<T>::kVec, rows 16-byte
// aligned); rows beyond a_rows / b_rows read as zero. 16-byte cp.async copies in a
// kStages-deep pipeline; `smem`: operand_bytes(sizeof(T), kBM, kBN, kStages) bytes, 1024-byte
// aligned. With an mma of wgmma atoms (make_value_mma with kValueGmma), the operands are
// swizzled for wgmma, which reads them from shared memory: each thread's landed copies (and zero
// fills) are made visible to wgmma's async proxy (fence.proxy.async) before the step's barrier, and
// each step's wgmma batch is waited for before its stage can be refilled. Synchronises the block
// after its last use of `smem`.
template <typename T, int kBM, int kBN, int kStages, class TiledMma, class Acc>
__device__ void stream_gemm(TiledMma const& mma, Acc& acc, const T* a, int a_rows, const T* b,
                            int b_rows, int K, T* smem) {
  constexpr bool kGmma = kWarpgroupMma<TiledMma>;
  constexpr int kBK = Tiling<T>::kBK, kVec = Tiling<T>::kVec;
  constexpr int kThreads = decltype(size(mma))::value;
  static_assert(kBK == 4 * kVec && kThreads % 4 == 0, "one thread per 16-byte vector of a row");
  constexpr auto layout_a = stream_operand_layout<T, kBM, kStages, kGmma>();
  constexpr auto layout_b = stream_operand_layout<T, kBN, kStages, kGmma>();
  Tensor sA = make_tensor(make_smem_ptr(smem), layout_a);
  Tensor sB = make_tensor(make_smem_ptr(smem + cosize(layout_a)), layout_b);
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
#if CASA_SM90_GMMA
  if constexpr (kGmma) {
    Tensor tCdA = thr.make_fragment_A(tCsA);  // shared-memory descriptors, every stage
    Tensor tCdB = thr.make_fragment_B(tCsB);
    pipelined_steps<kStages>(
        ceil_div_int(K, kBK), load_step,
        [&](int stage) {
          warpgroup_fence_operand(acc);
          warpgroup_arrive();
          gemm(mma, tCdA(_, _, _, stage), tCdB(_, _, _, stage), acc);
          warpgroup_commit_batch();
          warpgroup_wait<0>();
          warpgroup_fence_operand(acc);
        },
        [] {
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        });
    return;
  }
#endif
  Tensor tCrA = thr.partition_fragment_A(sA(_, _, 0));
  Tensor tCrB = thr.partition_fragment_B(sB(_, _, 0));
  pipelined_steps<kStages>(ceil_div_int(K, kBK), load_step, [&](int stage) {
    copy(tCsA(_, _, _, stage), tCrA);
    copy(tCsB(_, _, _, stage), tCrB);
    gemm(mma, tCrA, tCrB, acc);
  });
}

// ---------------------------------------------------------------------------------
// Stages 1 and 2: the conv kernel (the encoder head and the four bottleneck convs)
// ---------------------------------------------------------------------------------

// dst[0, 16 bytes) <- src[0, 16 bytes) if valid, else zeros; asynchronous (cp.async,
// completed by cp_async_wait) on sm_80+, a plain copy elsewhere. src is dereferenced only
// when valid.
__device__ inline void copy16_async(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(src),
               "r"(valid ? 16 : 0));
#else
  if (valid) {
    memcpy(dst, src, 16);
  } else {
    memset(dst, 0, 16);
  }
#endif
}

// One conv layer (or the head's split of it), in T with fp32 accumulation:
//   stride 2:      out[co, t] = Σ_{ci, j} w[co, ci, j] · in[ci, 2t + j - p]
//   transposed, output parity r (stride 2, output_padding 1):
//                  out[co, 2u + r] = Σ_ci Σ_{j ≡ r+p (mod 2)} w[ci, co, j] · in[ci, u + (r+p-j)/2]
// in: [B, cin, in_ld] rows of in_ld elements (16-byte aligned, zero beyond lin when in_ld >
// lin); w: packed per tap (launch_plan.h), rows of w_row elements; out: [B, cout, out_ld] in
// T with relu(· + bias) and zeros in [lout, out_ld). Split s of `splits` takes the input
// channels [s · chunk, (s + 1) · chunk); with more than one split, `partial` holds fp32
// partial sums: the head's [splits, B, cout, lout], a bottleneck conv's per tile and split
// (reduce_splits), whose `arrivals` count the splits done per tile. The head zeroes the
// first `clear_arrivals` ints of its `arrivals`: the bottleneck's counts, for the conv
// launches after it.
template <typename T>
struct ConvArgs {
  const T* in;
  const T* w;
  const T* bias;
  T* out;
  float* partial;
  int* arrivals;
  int batch, cin, lin, in_ld, cout, lout, out_ld, w_row, splits, chunk, clear_arrivals;
};

// The CTA's tile of blockIdx.x: (column tile, row tile, parity, split, batch), flattened
// column fastest. Columns are output positions (per parity for a transposed conv). `tile`
// numbers the output tile, the same for all its splits.
struct ConvTile {
  int col0, row0, r, split, b, tile;
};

__device__ inline ConvTile conv_tile(int cols, int rows, int parities, int splits) {
  const int tiles_c = ceil_div_int(cols, kConvCols), tiles_r = ceil_div_int(rows, kConvRows);
  int idx = blockIdx.x;
  ConvTile t;
  t.col0 = idx % tiles_c * kConvCols;
  idx /= tiles_c;
  t.row0 = idx % tiles_r * kConvRows;
  idx /= tiles_r;
  t.r = idx % parities;
  idx /= parities;
  t.split = idx % splits;
  t.b = idx / splits;
  const int per_split = tiles_c * tiles_r * parities;
  t.tile = t.b * per_split + static_cast<int>(blockIdx.x) % per_split;
  return t;
}

// The shared-memory shape of a conv tile's stages (launch_plan.h).
template <typename T, int kTaps, bool kTransposed, int kRows, int kCols>
struct ConvShape {
  static constexpr int kStaged = conv_staged_taps(kTaps, kTransposed);
  static constexpr int kHalo = conv_halo(static_cast<int>(sizeof(T)), kTransposed, kCols);
  static constexpr int kLdH = conv_halo_ld(static_cast<int>(sizeof(T)), kTransposed, kCols);
  static constexpr int kStage =
      conv_stage_elems(static_cast<int>(sizeof(T)), kTaps, kTransposed, kRows, kCols);
};

// acc += the CTA's kRows x kCols tile (output channels from t.row0, output positions from
// t.col0, per parity t.r for a transposed conv) of the conv over input channels
// [c_begin, c_end), taps kTaps. Per K step of kBK input channels, one pipeline stage
// holds the staged taps' weight tiles [tap][kRows][kBK] and the halo tile [kBK][halo
// positions] of the input rows, each brought by 16-byte copies (zero-filled outside the
// rows, the channels and the output channels), kStages deep; the taps are then kBK-deep MMAs on the
// same halo tile at their shared-memory offsets (stride 2 along the positions for a stride-2 conv).
// Synchronises the block after its last use of `smem`.
template <typename T, int kTaps, bool kTransposed, int kRows, int kCols, int kStages,
          class TiledMma, class Acc>
__device__ void conv_gemm(TiledMma const& mma, Acc& acc, const ConvArgs<T>& a, const ConvTile& t,
                          int c_begin, int c_end, T* smem) {
  using Shape = ConvShape<T, kTaps, kTransposed, kRows, kCols>;
  constexpr int e = static_cast<int>(sizeof(T));
  constexpr int kVec = Tiling<T>::kVec, kBK = Tiling<T>::kBK, kLdA = Tiling<T>::kLd;
  constexpr int kStaged = Shape::kStaged, kHalo = Shape::kHalo, kLdH = Shape::kLdH;
  constexpr int kStageA = kStaged * kRows * kLdA;
  constexpr int kStage = Shape::kStage;
  constexpr int kStep = kTransposed ? 1 : 2;  // halo positions per output position
  constexpr int kThreads = decltype(size(mma))::value;
  static_assert(kBK % kVec == 0 && kHalo % kVec == 0 && (kLdA * e) % 16 == 0 &&
                    (kLdH * e) % 16 == 0 && (kStage * e) % 16 == 0,
                "16-byte aligned shared rows and stages");
  static_assert(kTaps / 2 <= kVec, "the halo reaches p = k / 2 positions past the tile");

  const ParityTaps taps(kTaps, t.r, kTaps / 2);
  const int n_taps = kTransposed ? taps.count : kTaps;
  // Weight row of staged tap i: the tap j it stands for; halo offset of tap i.
  auto tap_of = [&](int i) { return kTransposed ? taps.tap(i) : i; };
  auto tap_offset = [&](int i) { return kVec + (kTransposed ? taps.shift(i) : i - kTaps / 2); };
  const T* in_b = a.in + static_cast<int64_t>(t.b) * a.cin * a.in_ld;
  const int pos0 = kStep * t.col0 - kVec;  // first halo position, a multiple of kVec

  auto load_stage = [&](int step, int stage) {
    const int c0 = c_begin + step * kBK;
    T* sa = smem + stage * kStage;
    T* sb = sa + kStageA;
    constexpr int kRowVecs = kBK / kVec;
    for (int v = threadIdx.x; v < kStaged * kRows * kRowVecs; v += kThreads) {
      const int i = v / (kRows * kRowVecs), m = v / kRowVecs % kRows, cv = v % kRowVecs;
      const int co = t.row0 + m, c = c0 + cv * kVec;
      const bool ok = i < n_taps && co < a.cout && c < c_end;
      const T* src = a.w + (static_cast<int64_t>(tap_of(i)) * a.cout + co) * a.w_row + c;
      copy16_async(sa + (i * kRows + m) * kLdA + cv * kVec, ok ? src : a.w, ok);
    }
    constexpr int kHaloVecs = kHalo / kVec;
    for (int v = threadIdx.x; v < kBK * kHaloVecs; v += kThreads) {
      const int kk = v / kHaloVecs, c = c0 + kk, pos = pos0 + v % kHaloVecs * kVec;
      const bool ok = c < c_end && pos >= 0 && pos < a.in_ld;
      const T* src = in_b + static_cast<int64_t>(c) * a.in_ld + pos;
      copy16_async(sb + kk * kLdH + v % kHaloVecs * kVec, ok ? src : a.in, ok);
    }
  };

  auto thr = mma.get_slice(threadIdx.x);
  const auto a_layout =
      make_layout(make_shape(Int<kRows>{}, Int<kBK>{}), make_stride(Int<kLdA>{}, _1{}));
  const auto b_layout =
      make_layout(make_shape(Int<kCols>{}, Int<kBK>{}), make_stride(Int<kStep>{}, Int<kLdH>{}));
  Tensor tCrA = thr.partition_fragment_A(make_tensor(make_smem_ptr(smem), a_layout));
  Tensor tCrB = thr.partition_fragment_B(make_tensor(make_smem_ptr(smem), b_layout));
  pipelined_steps<kStages>(ceil_div_int(c_end - c_begin, kBK), load_stage, [&](int stage) {
    const T* sa = smem + stage * kStage;
    const T* sb = sa + kStageA;
    CUTE_UNROLL
    for (int i = 0; i < kStaged; ++i) {
      if (i < n_taps) {
        copy(thr.partition_A(make_tensor(make_smem_ptr(sa + i * kRows * kLdA), a_layout)), tCrA);
        copy(thr.partition_B(make_tensor(make_smem_ptr(sb + tap_offset(i)), b_layout)), tCrB);
        gemm(mma, tCrA, tCrB, acc);
      }
    }
  });
}

// out[b, co, pos] = relu(acc + bias[co]) in T for pos < lout, 0 for pos in [lout, out_ld)
// (the row padding), for the CTA's tile: pos = t.col0 + col, or 2 · (t.col0 + col) + t.r
// for a transposed conv's output parity t.r.
template <bool kTransposed, typename T, class TiledMma, class Acc>
__device__ void store_activation(TiledMma const& mma, Acc const& acc, const ConvArgs<T>& a,
                                 const ConvTile& t) {
  T* out_b = a.out + static_cast<int64_t>(t.b) * a.cout * a.out_ld;
  for_each_acc<kConvRows, kConvCols>(mma, acc, [&](int m, int col, float v) {
    const int co = t.row0 + m;
    const int pos = kTransposed ? 2 * (t.col0 + col) + t.r : t.col0 + col;
    if (co < a.cout && pos < a.out_ld) {
      out_b[static_cast<int64_t>(co) * a.out_ld + pos] =
          T(pos < a.lout ? relu(v + to_float(a.bias[co])) : 0.f);
    }
  });
}

// Stage 1, the encoder head: partial[s, b, c, t] = Σ_{n in split s} Σ_j w0[c, n, j] ·
// x[b, n, 2t + j - p] (c < C1, t < D/2), a stride-2 conv over the variates as channels;
// with one split, h1 = relu(partial + bias) in T directly (store_activation; no reduce
// launch). Blocks: (t tile, c tile, split, batch).
template <typename T, int kTaps>
__global__ void __launch_bounds__(kConvThreads) head_kernel(ConvArgs<T> a) {
  CASA_DYNAMIC_SMEM(smem);
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < a.clear_arrivals; i += kConvThreads) a.arrivals[i] = 0;
  }
  const ConvTile t = conv_tile(a.lout, a.cout, 1, a.splits);
  const int c_begin = min(a.cin, t.split * a.chunk), c_end = min(a.cin, c_begin + a.chunk);
  auto mma = make_block_mma<T, 2, 2>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kConvRows>{}, Int<kConvCols>{}));
  clear(acc);
  conv_gemm<T, kTaps, false, kConvRows, kConvCols, kConvStages>(mma, acc, a, t, c_begin, c_end,
                                                                reinterpret_cast<T*>(smem));
  if (a.splits == 1) {
    store_activation<false>(mma, acc, a, t);
    return;
  }
  float* out = a.partial + (static_cast<int64_t>(t.split) * a.batch + t.b) * a.cout * a.lout;
  for_each_acc<kConvRows, kConvCols>(mma, acc, [&](int m, int col, float v) {
    const int c = t.row0 + m, pos = t.col0 + col;
    if (c < a.cout && pos < a.lout) out[static_cast<int64_t>(c) * a.lout + pos] = v;
  });
}

// h1[b, c, t] = relu(bias[c] + Σ_s partial[s, b, c, t]) in T for t < L1, 0 for t in
// [L1, ld) (the row padding); one thread per element of h1 [B, C1, ld].
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    head_reduce_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                       T* __restrict__ h1, int B, int C1, int L1, int ld, int splits) {
  const int64_t total = static_cast<int64_t>(B) * C1 * ld,
                per_split = static_cast<int64_t>(B) * C1 * L1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / ld;  // b * C1 + c
    const int pos = static_cast<int>(i % ld);
    float v = 0.f;
    if (pos < L1) {
      v = to_float(bias[row % C1]);
      for (int s = 0; s < splits; ++s) v += partial[s * per_split + row * L1 + pos];
    }
    h1[i] = T(relu(v));
  }
}

// Split-K of a bottleneck conv tile: the CTA stores its fp32 accumulators in its slot of
// a.partial ([tile][split][accumulator][thread], 16-byte vectors) and counts itself in
// a.arrivals[t.tile]. Returns false in every CTA of the tile but the last to arrive,
// which sums every split's accumulators in split order (its own from registers, the
// others' loaded at once: kMaxConvSplits slots, unconditionally, a split beyond
// a.splits reading its own slot again) into acc, so the sum's bits do not depend on which
// split arrives last, and returns true.
template <typename T, class Acc>
__device__ bool reduce_splits(Acc& acc, const ConvArgs<T>& a, const ConvTile& t) {
  constexpr int kVecs = decltype(size(acc))::value / 4;
  static_assert(decltype(size(acc))::value % 4 == 0, "accumulators in 16-byte vectors");
  auto slot = [&](int split) {
    const int64_t at = (static_cast<int64_t>(t.tile) * a.splits + split) * kVecs * kConvThreads;
    return reinterpret_cast<float4*>(a.partial) + at + threadIdx.x;
  };
  // The CTA's own accumulators, vector v.
  auto own = [&](int v) {
    return make_float4(acc(4 * v), acc(4 * v + 1), acc(4 * v + 2), acc(4 * v + 3));
  };
  float4* mine = slot(t.split);
  CUTE_UNROLL
  for (int v = 0; v < kVecs; ++v) mine[v * kConvThreads] = own(v);
  __threadfence();  // the slot before the count, for the CTA that sums
  __shared__ int arrived;
  __syncthreads();
  if (threadIdx.x == 0) arrived = atomicAdd(a.arrivals + t.tile, 1);
  __syncthreads();
  if (arrived != a.splits - 1) return false;
  __threadfence();  // the count before the other splits' slots
  float4 parts[kMaxConvSplits][kVecs];
  CUTE_UNROLL
  for (int s = 0; s < kMaxConvSplits; ++s) {
    const float4* from = slot(s < a.splits ? s : t.split);
    CUTE_UNROLL
    for (int v = 0; v < kVecs; ++v) parts[s][v] = __ldcg(from + v * kConvThreads);
  }
  CUTE_UNROLL
  for (int v = 0; v < kVecs; ++v) {
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    CUTE_UNROLL
    for (int s = 0; s < kMaxConvSplits; ++s) {
      if (s < a.splits) {
        const float4 p = s == t.split ? own(v) : parts[s][v];
        sum.x += p.x, sum.y += p.y, sum.z += p.z, sum.w += p.w;
      }
    }
    acc(4 * v) = sum.x, acc(4 * v + 1) = sum.y, acc(4 * v + 2) = sum.z, acc(4 * v + 3) = sum.w;
  }
  return true;
}

// Stage 2, a bottleneck layer (activations in T, tensor cores for fp16/bf16, fp32
// accumulation): out = relu(conv(in) + bias), a stride-2 conv or (kTransposed) a
// stride-2 transposed conv, written with its row padding zeroed. Blocks: (position tile,
// channel tile, parity (transposed only), split, batch). kSplitK (a.splits > 1): the last
// split of a tile to finish writes it (reduce_splits); without, a.splits is 1.
template <typename T, int kTaps, bool kTransposed, bool kSplitK>
__global__ void __launch_bounds__(kConvThreads) conv_kernel(ConvArgs<T> a) {
  CASA_DYNAMIC_SMEM(smem);
  const int cols = kTransposed ? a.lin : a.lout;
  const ConvTile t = conv_tile(cols, a.cout, kTransposed ? 2 : 1, kSplitK ? a.splits : 1);
  const int c_begin = kSplitK ? min(a.cin, t.split * a.chunk) : 0;
  const int c_end = kSplitK ? min(a.cin, c_begin + a.chunk) : a.cin;
  auto mma = make_block_mma<T, 2, 2>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kConvRows>{}, Int<kConvCols>{}));
  clear(acc);
  conv_gemm<T, kTaps, kTransposed, kConvRows, kConvCols, kConvStages>(
      mma, acc, a, t, c_begin, c_end, reinterpret_cast<T*>(smem));
  if constexpr (kSplitK) {
    if (!reduce_splits(acc, a, t)) return;
  }
  store_activation<kTransposed>(mma, acc, a, t);
}

// ---------------------------------------------------------------------------------
// Stage 3: tail, split over N (stats, merge, output)
// ---------------------------------------------------------------------------------

// Arguments of the tail kernels. h5: [B, D/4, h5_ld] (relu(dec1) output, T, rows of D/2
// values padded to h5_ld); w2: the dec2 weight [C1, N, k] packed per tap (launch_plan.h,
// rows of w2_row elements); b2: [N]; wv: [D, D]; bv: [D]; stats: [B, n_tiles, D] (max,
// Σexp) per row tile.
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
  int N, D, n_tiles, h5_ld, w2_row;
};

// The shared-memory shape of a tail tile of kCols columns (launch_plan.h): P's row
// stride in floats, and the bytes of P and the column statistics before the operands.
template <int kCols>
struct TailShape {
  static constexpr int kLd = tail_ld(kCols);
  static constexpr int kPBytes = tail_p_bytes(kCols);
};

// The tail CTA of blockIdx.x with tiles of kCols columns: batch b, rows [n0, n0 + rows),
// columns [o0, o0 + cols).
struct TailTile {
  int b, n_tile, n0, rows, o0, cols;
};

template <int kCols>
__device__ inline TailTile tail_tile(int N, int D, int n_tiles) {
  const int col_tiles = ceil_div_int(D, kCols);
  int idx = blockIdx.x;
  TailTile t;
  const int ct = idx % col_tiles;
  idx /= col_tiles;
  t.n_tile = idx % n_tiles;
  t.b = idx / n_tiles;
  t.n0 = t.n_tile * kTailRows;
  t.rows = min(kTailRows, N - t.n0);
  t.o0 = ct * kCols;
  t.cols = min(kCols, D - t.o0);
  return t;
}

// The 16-byte vector of T at `src` (16-byte aligned), as kVec values.
template <typename T>
struct Vec16 {
  T v[Tiling<T>::kVec];
};
template <typename T>
__device__ inline Vec16<T> load16(const T* src) {
  Vec16<T> out;
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  memcpy(&out, &raw, 16);
  return out;
}
template <typename T>
__device__ inline void store16(T* dst, const Vec16<T>& value) {
  uint4 raw;
  memcpy(&raw, &value, 16);
  *reinterpret_cast<uint4*>(dst) = raw;
}

// P[m][o] <- finish(m, o, S[n0 + m, o0 + o]) for m < rows, o < cols (P's rows
// tail_ld(kCols) floats apart; S in TailMath<T>'s units), where
//   S[n, o] = sigmoid(b2[n] + Σ_c Σ_{j ≡ o+p (mod 2)} w2[c, n, j] · h5[b, c, o/2 + (o%2 + p -
//   j)/2]) + x[b, n, o],
// the last transposed conv as one conv tile per output parity (kTailRows x kCols/2,
// the conv kernel's pipeline: w2 packed per tap, h5's halo tile, kTailScoreStages deep)
// whose raw sums land in P's even or odd columns, then one row-major pass (16-byte x
// reads) adding bias, sigmoid and skip. Ends with a barrier.
template <typename T, int kTaps, int kCols, class Finish>
__device__ void tail_scores(const TailArgs<T>& a, const TailTile& t, float* P, T* ops,
                            const Finish& finish) {
  constexpr int kVec = Tiling<T>::kVec, kLd = TailShape<kCols>::kLd;
  const int N = a.N, D = a.D, C1 = D / 4;
  const T* x_b = a.x + static_cast<int64_t>(t.b) * N * D;
  // The last decoder layer as a conv: C1 -> N channels, D/2 -> D positions.
  const ConvArgs<T> conv{a.h5,    a.w2, nullptr, nullptr, nullptr,  nullptr, 0,  C1, D / 2,
                         a.h5_ld, N,    D,       0,       a.w2_row, 1,       C1, 0};
  auto mma = make_block_mma<T, 4, 2>();
  for (int r = 0; r < 2; ++r) {
    const ConvTile tile{t.o0 / 2, t.n0, r, 0, t.b, 0};
    Tensor acc = partition_fragment_C(mma, make_shape(Int<kTailRows>{}, Int<kCols / 2>{}));
    clear(acc);
    conv_gemm<T, kTaps, true, kTailRows, kCols / 2, kTailScoreStages>(mma, acc, conv, tile, 0, C1,
                                                                      ops);
    for_each_acc<kTailRows, kCols / 2>(
        mma, acc, [&](int m, int uu, float v) { P[m * kLd + 2 * uu + r] = v; });
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTailRows * kCols / kVec; e += kTailThreads) {
    const int m = e / (kCols / kVec), o = e % (kCols / kVec) * kVec, n = t.n0 + m;
    if (m < t.rows && o < t.cols) {  // cols is a multiple of kVec (D % 8 == 0)
      const Vec16<T> xv = load16(x_b + static_cast<int64_t>(n) * D + t.o0 + o);
      const float bias = TailMath<T>::row_bias(to_float(a.b2[n]));
      CUTE_UNROLL
      for (int i = 0; i < kVec; ++i) {
        const float s = TailMath<T>::score(P[m * kLd + o + i], bias, to_float(xv.v[i]));
        P[m * kLd + o + i] = finish(m, o + i, s);
      }
    }
  }
  __syncthreads();
}

// (max, Σ_i sum_i · exp(max_i − max)) of `count` partial statistics (max_i, sum_i) =
// get(i), in TailMath<T>'s units: a pass for the maximum, then one for the sum, each
// loading kMergeBatch partials before it uses any. A partial whose maximum is -inf (no
// finite score) adds nothing, so a column of only -inf scores has sum 0; NaN and +inf
// propagate as in the reference's softmax. A score is the partial (s, 1).
template <typename T, class Get>
__device__ inline float2 merge_stats(int count, const Get& get) {
  float2 s[kMergeBatch];
  auto load_batch = [&](int i0) {
    CUTE_UNROLL
    for (int u = 0; u < kMergeBatch; ++u) {
      s[u] = i0 + u < count ? get(i0 + u) : make_float2(-INFINITY, 0.f);
    }
  };
  float m_all = -INFINITY;
  for (int i0 = 0; i0 < count; i0 += kMergeBatch) {
    load_batch(i0);
    CUTE_UNROLL
    for (int u = 0; u < kMergeBatch; ++u) m_all = max_nan(m_all, s[u].x);
  }
  float sum = 0.f;
  for (int i0 = 0; i0 < count; i0 += kMergeBatch) {
    load_batch(i0);
    CUTE_UNROLL
    for (int u = 0; u < kMergeBatch; ++u) {
      if (s[u].x != -INFINITY) sum += s[u].y * TailMath<T>::exp_diff(s[u].x, m_all);
    }
  }
  return make_float2(m_all, sum);
}

// The statistics of column o < cols merged over `count` items get(i, o), by every thread
// of the CTA: its threads are kTailThreads / kCols groups of kCols columns, the thread of
// column o in group g merges items g, g + groups, ..., and the groups' partials (through
// `part`, groups x kCols float2 of shared memory) are merged in group order, so the
// result does not depend on timing. Returned to the threads of the first group (thread o
// holds column o; the others get their own partial). Contains a barrier.
template <typename T, int kCols, class Get>
__device__ inline float2 merge_column(int count, int cols, float2* part, const Get& get) {
  constexpr int kGroups = kTailThreads / kCols;
  static_assert(kTailThreads % kCols == 0, "whole column groups");
  const int o = threadIdx.x % kCols, g = threadIdx.x / kCols;
  float2 mine = make_float2(-INFINITY, 0.f);
  if (o < cols) {
    mine = merge_stats<T>(ceil_div_int(count - g, kGroups),
                          [&](int i) { return get(g + i * kGroups, o); });
  }
  part[g * kCols + o] = mine;
  __syncthreads();
  if (g == 0 && o < cols)
    mine = merge_stats<T>(kGroups, [&](int i) { return part[i * kCols + o]; });
  return mine;
}

// stats[b, n_tile, o] = (max, Σ exp(S - max)) of the scores of the CTA's rows, for its
// columns (TailMath<T>'s units). Blocks: (column tile, row tile, batch), tiles of kCols
// columns.
template <typename T, int kTaps, int kCols>
__global__ void __launch_bounds__(kTailThreads, kTailBlocksPerSm) tail_stats_kernel(TailArgs<T> a) {
  CASA_DYNAMIC_SMEM(smem);
  constexpr int kLd = TailShape<kCols>::kLd;
  float* P = reinterpret_cast<float*>(smem);
  T* ops = reinterpret_cast<T*>(smem + TailShape<kCols>::kPBytes);
  const TailTile t = tail_tile<kCols>(a.N, a.D, a.n_tiles);
  tail_scores<T, kTaps, kCols>(a, t, P, ops, [](int, int, float s) { return s; });
  // The operand stages are free after tail_scores' barrier.
  const float2 st =
      merge_column<T, kCols>(t.rows, t.cols, reinterpret_cast<float2*>(ops),
                             [&](int m, int o) { return make_float2(P[m * kLd + o], 1.f); });
  if (threadIdx.x < t.cols) {
    a.stats[(static_cast<int64_t>(t.b) * a.n_tiles + t.n_tile) * a.D + t.o0 + threadIdx.x] = st;
  }
}

// y[b, n, o] = exp(S[n, o] - max[o]) / Σ[o] · (bv[o] + Σ_d x[b, n, d] · wv[o, d]) + x[b, n, o]
// for the CTA's rows and columns: its columns' statistics merged over the row tiles, the
// probabilities into P (scores recomputed), the value tile as one streamed kTailRows x
// kCols GEMM (K = D) from bv, P ⊙ (V + bv) in place, then a row-major pass adding x and writing y
// (16-byte vectors). Blocks: (column tile, row tile, batch), tiles of kCols columns.
template <typename T, int kTaps, int kCols>
__global__ void __launch_bounds__(kTailThreads, kTailBlocksPerSm)
    tail_output_kernel(TailArgs<T> a) {
  CASA_DYNAMIC_SMEM(smem);
  constexpr int kLd = TailShape<kCols>::kLd;
  float* P = reinterpret_cast<float*>(smem);
  float2* col = reinterpret_cast<float2*>(smem + kTailRows * kLd * 4);
  T* ops = reinterpret_cast<T*>(smem + TailShape<kCols>::kPBytes);
  const int N = a.N, D = a.D;
  const TailTile t = tail_tile<kCols>(N, D, a.n_tiles);
  // Its columns' statistics merged over every row tile, in a fixed order (so every CTA of
  // a column computes the same bits), as their normalisers.
  const float2* stats_b = a.stats + static_cast<int64_t>(t.b) * a.n_tiles * D + t.o0;
  const float2 st = merge_column<T, kCols>(
      a.n_tiles, t.cols, reinterpret_cast<float2*>(ops),
      [&](int i, int o) { return stats_b[static_cast<int64_t>(i) * D + o]; });
  if (threadIdx.x < t.cols) col[threadIdx.x] = TailMath<T>::normaliser(st);
  __syncthreads();  // col is complete; the operand stages are free for tail_scores
  tail_scores<T, kTaps, kCols>(
      a, t, P, ops, [&](int, int o, float s) { return TailMath<T>::probability(s, col[o]); });

  const T* x_b = a.x + static_cast<int64_t>(t.b) * N * D;
  T* y_b = a.y + static_cast<int64_t>(t.b) * N * D;
  auto mma = make_value_mma<T, kTailRows, kCols>();
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kTailRows>{}, Int<kCols>{}));
  // The value bias is the accumulators' starting value: V + bv with no add per element.
  for_each_acc<kTailRows, kCols>(
      mma, acc, [&](int, int o, float& v) { v = o < t.cols ? to_float(a.bv[t.o0 + o]) : 0.f; });
  stream_gemm<T, kTailRows, kCols, kValueStages>(mma, acc, x_b + static_cast<int64_t>(t.n0) * D,
                                                 t.rows, a.wv + static_cast<int64_t>(t.o0) * D,
                                                 t.cols, D, ops);
  for_each_acc<kTailRows, kCols>(mma, acc, [&](int m, int o, float v) {
    if (m < t.rows && o < t.cols) P[m * kLd + o] *= v;
  });
  __syncthreads();
  constexpr int kVec = Tiling<T>::kVec;
  for (int e = threadIdx.x; e < kTailRows * kCols / kVec; e += kTailThreads) {
    const int m = e / (kCols / kVec), o = e % (kCols / kVec) * kVec;
    if (m < t.rows && o < t.cols) {
      const int64_t at = static_cast<int64_t>(t.n0 + m) * D + t.o0 + o;
      const Vec16<T> xv = load16(x_b + at);
      Vec16<T> yv;
      CUTE_UNROLL
      for (int i = 0; i < kVec; ++i) yv.v[i] = T(P[m * kLd + o + i] + to_float(xv.v[i]));
      store16(y_b + at, yv);
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

// allow_smem for both variants (with and without split-K) of a conv kernel.
template <typename T, int kTaps, bool kTransposed>
cudaError_t allow_conv_smem(int bytes) {
  const cudaError_t err = allow_smem(conv_kernel<T, kTaps, kTransposed, false>, bytes);
  return err != cudaSuccess ? err : allow_smem(conv_kernel<T, kTaps, kTransposed, true>, bytes);
}

// Workspace regions, in floats, each a multiple of 32 floats (128 bytes).
int64_t round_floats(int64_t n) { return (n + 31) / 32 * 32; }

// The workspace: head partials [head_splits, B, C1, D/2] fp32; the bottleneck's split-K
// partials (the largest of its split layers' tiles x splits x kConvRows x kConvCols fp32,
// the layers running one after another) and arrival counts (int, one per tile of each
// split layer, conv_arrivals[i] the first of layer i's); the activations h1..h5 in T with
// padded rows (launch_plan.h); the tail's stats [B, tail_splits, D] (float2). Each region
// starts on 128 bytes.
struct Workspace {
  int64_t partial, conv_partial, arrivals, act[5], stats, total;  // offsets and total, in floats
  int64_t conv_arrivals[kBottleneckLayers], arrival_count;        // in ints, from `arrivals`
};

// Rows and logical lengths of h1..h5: h1 [C1, D/2], h2 [C2, D/4], h3 [D, D/8],
// h4 [C2, D/4], h5 [C1, D/2].
inline void activation_shape(int64_t D, int i, int64_t* rows, int64_t* length) {
  const int64_t rows_of[5] = {D / 4, D / 2, D, D / 2, D / 4};
  const int64_t length_of[5] = {D / 2, D / 4, D / 8, D / 4, D / 2};
  *rows = rows_of[i];
  *length = length_of[i];
}

Workspace workspace_layout(const Problem& p, const Plan& plan, int elem_bytes) {
  const int64_t B = p.batch, D = p.d_model;
  Workspace w{};
  int64_t at = 0;
  w.partial = at;
  at += round_floats(plan.head_splits * B * (D / 4) * (D / 2));
  int64_t conv_partial = 0;
  w.arrival_count = 0;
  for (int i = 0; i < kBottleneckLayers; ++i) {
    const int64_t splits = plan.conv_splits[i], tiles = conv_tiles(p, bottleneck_layer(p, i));
    w.conv_arrivals[i] = w.arrival_count;
    if (splits > 1) {
      conv_partial = std::max(conv_partial, tiles * splits * kConvRows * kConvCols);
      w.arrival_count += tiles;
    }
  }
  w.conv_partial = at;
  at += round_floats(conv_partial);
  w.arrivals = at;
  at += round_floats(w.arrival_count);  // an int per float
  for (int i = 0; i < 5; ++i) {
    int64_t rows, length;
    activation_shape(D, i, &rows, &length);
    w.act[i] = at;
    at += round_floats(ceil_div(B * rows * padded_length(length, elem_bytes) * elem_bytes, 4));
  }
  w.stats = at;
  at += 2 * B * plan.tail_splits * D;
  w.total = at;
  return w;
}

// The tail's two launches with tiles of kCols columns (the plan's tail_cols): row-tile
// stats, then the output (which merges its columns' stats).
template <typename T, int kTaps, int kCols>
cudaError_t launch_tail(const TailArgs<T>& args, const LaunchPlan& lp, cudaStream_t stream) {
  const int stats_smem = lp.tail_stats.smem_bytes, output_smem = lp.tail_output.smem_bytes;
  const int stats_blocks = static_cast<int>(lp.tail_stats.blocks);
  const int output_blocks = static_cast<int>(lp.tail_output.blocks);
  cudaError_t err = cudaSuccess;
  if ((err = allow_smem(tail_stats_kernel<T, kTaps, kCols>, stats_smem)) != cudaSuccess) return err;
  if ((err = allow_smem(tail_output_kernel<T, kTaps, kCols>, output_smem)) != cudaSuccess) {
    return err;
  }
  tail_stats_kernel<T, kTaps, kCols><<<stats_blocks, kTailThreads, stats_smem, stream>>>(args);
  tail_output_kernel<T, kTaps, kCols><<<output_blocks, kTailThreads, output_smem, stream>>>(args);
  return cudaSuccess;
}

// The launches of one dtype and kernel size, in plan order.
template <typename T, int kTaps>
cudaError_t launch_typed(const Params& prm, cudaStream_t stream) {
  constexpr int e = static_cast<int>(sizeof(T));
  const int B = static_cast<int>(prm.problem.batch), N = static_cast<int>(prm.problem.n_vars);
  const int D = static_cast<int>(prm.problem.d_model);
  const int C1 = D / 4;
  const int head_splits = prm.plan.head_splits, n_tiles = prm.plan.tail_splits;
  auto w = [&](WeightIndex i) { return static_cast<const T*>(prm.weights[i]); };
  const T* x = static_cast<const T*>(prm.x);
  T* y = static_cast<T*>(prm.y);

  const Workspace ws = workspace_layout(prm.problem, prm.plan, e);
  float* partial = prm.workspace + ws.partial;
  int* arrivals = reinterpret_cast<int*>(prm.workspace + ws.arrivals);
  T* h[5];  // h1 .. h5, rows padded to padded_length
  int ld[5];
  for (int i = 0; i < 5; ++i) {
    int64_t rows, length;
    activation_shape(D, i, &rows, &length);
    h[i] = reinterpret_cast<T*>(prm.workspace + ws.act[i]);
    ld[i] = static_cast<int>(padded_length(length, e));
  }
  float2* stats = reinterpret_cast<float2*>(prm.workspace + ws.stats);

  // Grids and shared memory: the plan (launch_plan.h); its grids fit int (problem_supported).
  const LaunchPlan lp = plan_launches(prm.problem, prm.plan, prm.dtype);
  auto blocks = [](const Launch& launch) { return static_cast<int>(launch.blocks); };
  cudaError_t err = cudaSuccess;
  // A conv layer's arguments: in [B, cin, in_ld] (length lin), weight wi packed per tap,
  // the input channels in `splits` chunks of `chunk`.
  auto conv_args = [&](const T* in, int cin, int lin, int in_ld, WeightIndex wi, WeightIndex bi,
                       T* out, int cout, int lout, int out_ld, float* part, int* arrive, int splits,
                       int chunk) {
    return ConvArgs<T>{
        in,     w(wi), w(bi), out,  part, arrive, B,
        cin,    lin,   in_ld, cout, lout, out_ld, static_cast<int>(packed_row(cin, e)),
        splits, chunk, 0};
  };
  // 1. head (split over the variates), then, for more than one split, the reduce:
  //    h1 = relu(Σ partials + bias). Its first block zeroes the bottleneck's arrival counts.
  {
    ConvArgs<T> args = conv_args(x, N, D, D, kEnc0Weight, kEnc0Bias, h[0], C1, D / 2, ld[0],
                                 partial, arrivals, head_splits, split_chunk(N, head_splits));
    args.clear_arrivals = static_cast<int>(ws.arrival_count);
    const int smem = lp.head.smem_bytes;
    if ((err = allow_smem(head_kernel<T, kTaps>, smem)) != cudaSuccess) return err;
    head_kernel<T, kTaps><<<blocks(lp.head), kConvThreads, smem, stream>>>(args);
    if (lp.head_reduce.blocks > 0) {
      head_reduce_kernel<T><<<blocks(lp.head_reduce), kReduceThreads, 0, stream>>>(
          partial, w(kEnc0Bias), h[0], B, C1, D / 2, ld[0], head_splits);
    }
  }
  // 2. bottleneck (launch_plan.h's bottleneck_layer): enc1, enc2, dec0, dec1, layer i from
  //    h[i] to h[i + 1], each split over its input channels as the plan says
  {
    const int smem = lp.enc1.smem_bytes, smem_t = lp.dec0.smem_bytes;
    if ((err = allow_conv_smem<T, kTaps, false>(smem)) != cudaSuccess) return err;
    if ((err = allow_conv_smem<T, kTaps, true>(smem_t)) != cudaSuccess) return err;
    const WeightIndex weights[kBottleneckLayers][2] = {{kEnc1Weight, kEnc1Bias},
                                                       {kEnc2Weight, kEnc2Bias},
                                                       {kDec0Weight, kDec0Bias},
                                                       {kDec1Weight, kDec1Bias}};
    const Launch* launches[kBottleneckLayers] = {&lp.enc1, &lp.enc2, &lp.dec0, &lp.dec1};
    for (int i = 0; i < kBottleneckLayers; ++i) {
      const ConvLayer l = bottleneck_layer(prm.problem, i);
      const int splits = prm.plan.conv_splits[i];
      const ConvArgs<T> args =
          conv_args(h[i], static_cast<int>(l.cin), static_cast<int>(l.lin), ld[i], weights[i][0],
                    weights[i][1], h[i + 1], static_cast<int>(l.cout), static_cast<int>(l.lout),
                    ld[i + 1], prm.workspace + ws.conv_partial, arrivals + ws.conv_arrivals[i],
                    splits, split_chunk(l.cin, splits));
      const int grid = blocks(*launches[i]);
      if (l.transposed && splits > 1) {
        conv_kernel<T, kTaps, true, true><<<grid, kConvThreads, smem_t, stream>>>(args);
      } else if (l.transposed) {
        conv_kernel<T, kTaps, true, false><<<grid, kConvThreads, smem_t, stream>>>(args);
      } else if (splits > 1) {
        conv_kernel<T, kTaps, false, true><<<grid, kConvThreads, smem, stream>>>(args);
      } else {
        conv_kernel<T, kTaps, false, false><<<grid, kConvThreads, smem, stream>>>(args);
      }
    }
  }
  // 3. tail: row-tile stats, then the output (which merges its columns' stats), tiles of
  //    the plan's tail_cols columns
  {
    const TailArgs<T> args{x,
                           h[4],
                           w(kDec2Weight),
                           w(kDec2Bias),
                           w(kValueWeight),
                           w(kValueBias),
                           y,
                           stats,
                           N,
                           D,
                           n_tiles,
                           ld[4],
                           static_cast<int>(packed_row(C1, e))};
    static_assert(std::size(kTailColOptions) == 2 && kTailColOptions[1] == 64,
                  "one case below per tail tile width");
    switch (prm.plan.tail_cols) {
      case kTailMaxCols: err = launch_tail<T, kTaps, kTailMaxCols>(args, lp, stream); break;
      case 64: err = launch_tail<T, kTaps, 64>(args, lp, stream); break;
      default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

// launch_typed for the problem's kernel size (problem_supported admits 1, 3, 5, 7).
template <typename T>
cudaError_t launch_kernel_size(const Params& params, cudaStream_t stream) {
  switch (params.problem.kernel) {
    case 1: return launch_typed<T, 1>(params, stream);
    case 3: return launch_typed<T, 3>(params, stream);
    case 5: return launch_typed<T, 5>(params, stream);
    case 7: return launch_typed<T, 7>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t workspace_floats(const Problem& p, const Plan& plan) {
  return static_cast<size_t>(workspace_layout(p, plan, 4).total);  // fp32, the widest
}

size_t shared_memory_bytes(DType dtype) {
  const int e = dtype_bytes(dtype);
  return static_cast<size_t>(std::max({tail_smem_bytes(e, 7, true, kTailMaxCols),
                                       conv_smem_bytes(e, 7, false), conv_smem_bytes(e, 7, true)}));
}

bool problem_supported(const Problem& p, const char** why) {
  const int64_t int_max = 0x7fffffff;
  const char* reason = nullptr;
  if (p.batch < 1 || p.n_vars < 1 || p.d_model < 8 || p.d_model % 8 != 0 || p.kernel < 1 ||
      p.kernel % 2 == 0) {
    reason = "expected batch >= 1, n_vars >= 1, d_model a positive multiple of 8, odd kernel";
  } else if (!kernel_instantiated(p.kernel)) {
    reason = "kernel must be 1, 3, 5 or 7 (the kernel sizes the CUDA kernels are built for)";
  } else if (p.n_vars * p.kernel > int_max / 2 || p.d_model > int_max / 4) {
    reason = "n_vars * kernel and d_model must fit 32-bit indices";
  } else if (head_blocks(p, kMaxHeadSplits) > int_max ||
             tail_blocks(p, kTailColOptions[std::size(kTailColOptions) - 1]) > int_max) {
    reason = "batch too large for a one-dimensional grid";
  }
  if (why != nullptr) *why = reason;
  return reason == nullptr;
}

cudaError_t launch_fused_score_attention(const Params& params, cudaStream_t stream) {
  for (int splits : params.plan.conv_splits) {
    if (splits < 1 || splits > kMaxConvSplits) return cudaErrorInvalidValue;
  }
  if (!problem_supported(params.problem, nullptr) || params.plan.head_splits < 1 ||
      params.plan.head_splits > kMaxHeadSplits ||
      params.plan.tail_splits != tail_tiles(params.problem.n_vars) ||
      !tail_cols_instantiated(params.plan.tail_cols)) {
    return cudaErrorInvalidValue;
  }
  // The 16-byte cp.async copies of the conv kernel and of the value GEMM.
  for (const void* ptr :
       {params.x, params.weights[kValueWeight], params.weights[kEnc0Weight],
        params.weights[kEnc1Weight], params.weights[kEnc2Weight], params.weights[kDec0Weight],
        params.weights[kDec1Weight], params.weights[kDec2Weight]}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorMisalignedAddress;
  }
  switch (params.dtype) {
    case DType::kFloat32: return launch_kernel_size<float>(params, stream);
    case DType::kFloat16: return launch_kernel_size<half_t>(params, stream);
    case DType::kBFloat16: return launch_kernel_size<bfloat16_t>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace casa
