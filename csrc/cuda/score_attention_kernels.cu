// CUDA kernels of casa::fused_score_attention; see score_attention_kernels.h for the
// stage list and the launcher contract. No torch headers here.
//
// Every GEMM-like part is one 64x64 output tile per block of 128 threads, reduced
// over K in steps of 16 through shared memory (block_gemm below). The operands are
// produced by loader functors that gather, with bounds masks, straight from the
// tensors (implicit GEMM, no im2col buffer):
//
// * stride-2 conv, out[co, t] = Σ_{ci, j} W[co, ci, j] · in[ci, 2t + j - p]:
//   A = W as [Cout, Cin·k] (contiguous), B[(ci, j), t] = in[ci, 2t + j - p] or 0.
// * stride-2 transposed conv with output_padding 1 (odd k), by output parity r:
//   out[co, 2u + r] = Σ_ci Σ_{j ≡ r+p (mod 2)} W[ci, co, j] · in[ci, u + (r + p - j)/2],
//   so K = Cin · taps(r) with no structural zeros (taps(r) = the number of such j).
//
// Tensor cores (nvcuda::wmma m16n16k16, fp32 accumulation) serve fp16 (sm_70+) and
// bf16 (sm_80+) operands; fp32 operands use an fp32 SIMT path, so fp32 results keep
// fp32 accuracy (no TF32). The bottleneck always runs in fp32.
//
// tests/ops/test_cuda_emulation.py runs this file on the host (a source transform plus
// cuda_emulation/shim.h). It relies on: launches of a templated kernel with the
// configuration (grid, block, 0, stream) on one statement, shared arrays declared
// `__shared__` or `__shared__ alignas(N)`,
// one-dimensional grids and blocks, and device code that uses only __syncthreads,
// threadIdx/blockIdx/blockDim/gridDim .x, and the fp16/bf16 conversion intrinsics.

#include "score_attention_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>

namespace casa {
namespace gpu {
namespace {

// ---------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // output rows per block tile
constexpr int kBN = 64;        // output columns per block tile
constexpr int kBK = 16;        // reduction step
constexpr int kLdA = kBK + 8;  // smem row strides (elements): multiples of 8 keep
constexpr int kLdB = kBN + 8;  // 16-bit wmma rows 16-byte aligned
constexpr int kLdC = kBN + 4;  // fp32 result tile stride, a multiple of 4 for wmma

// Operand tiles of one K step, in the compute type of the GEMM.
template <typename ComputeT>
struct GemmSmem {
  alignas(128) ComputeT a[kBM * kLdA];  // A[m][kk]
  alignas(128) ComputeT b[kBK * kLdB];  // B[kk][n]
};

// ---------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------

// max(v, 0) keeping NaN, as torch.relu does (fmaxf(v, 0) returns 0 for NaN).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }
// max(a, b) propagating NaN, as torch's max and softmax do (fmaxf drops a NaN operand).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Whether block_gemm may use tensor cores for this operand type on the arch being compiled.
template <typename T>
struct UseTensorCores {
  static constexpr bool value = false;
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
template <>
struct UseTensorCores<__half> {
  static constexpr bool value = true;
};
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
struct UseTensorCores<__nv_bfloat16> {
  static constexpr bool value = true;
};
#endif

// ---------------------------------------------------------------------------------
// Block GEMM: c[m][n] = Σ_{g < K} load_a(m, g) · load_b(g, n), m < kBM, n < kBN.
// ---------------------------------------------------------------------------------

// Fills the operand tiles of the step starting at k0; entries with k0 + kk >= K are 0.
// Loaders return 0 themselves for rows/columns outside the problem. With
// kBKContiguous the B tile is gathered with kk fastest across threads (for operands
// whose K index is contiguous in memory, like the rows of the value weight).
template <bool kBKContiguous, typename ComputeT, typename LoadA, typename LoadB>
__device__ __forceinline__ void fill_tiles(int k0, int K, const LoadA& load_a, const LoadB& load_b,
                                           GemmSmem<ComputeT>& sm) {
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int m = e / kBK, kk = e % kBK, g = k0 + kk;
    sm.a[m * kLdA + kk] = from_float<ComputeT>(g < K ? load_a(m, g) : 0.f);
  }
  for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
    const int kk = kBKContiguous ? e % kBK : e / kBN;
    const int n = kBKContiguous ? e / kBK : e % kBN;
    const int g = k0 + kk;
    sm.b[kk * kLdB + n] = from_float<ComputeT>(g < K ? load_b(g, n) : 0.f);
  }
}

// fp32 SIMT: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8i, columns tx + 16j.
template <bool kBKContiguous, typename ComputeT, typename LoadA, typename LoadB>
__device__ void gemm_simt(int K, const LoadA& load_a, const LoadB& load_b, GemmSmem<ComputeT>& sm,
                          float* c) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kBK) {
    fill_tiles<kBKContiguous>(k0, K, load_a, load_b, sm);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = to_float(sm.a[(ty + 8 * i) * kLdA + kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = to_float(sm.b[kk * kLdB + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) c[(ty + 8 * i) * kLdC + tx + 16 * j] = acc[i][j];
}

// Tensor cores: warp w computes the 32x32 sub-tile (w / 2, w % 2) as 2x2 wmma fragments.
template <bool kBKContiguous, typename ComputeT, typename LoadA, typename LoadB>
__device__ void gemm_wmma(int K, const LoadA& load_a, const LoadB& load_b, GemmSmem<ComputeT>& sm,
                          float* c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int k0 = 0; k0 < K; k0 += kBK) {
    fill_tiles<kBKContiguous>(k0, K, load_a, load_b, sm);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, ComputeT, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, ComputeT, wmma::row_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      wmma::load_matrix_sync(fa[i], sm.a + (wm * 32 + i * 16) * kLdA, kLdA);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sm.b + wn * 32 + j * 16, kLdB);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
#else
  (void)K, (void)load_a, (void)load_b, (void)sm, (void)c;
  __trap();  // unreachable: UseTensorCores is false below sm_70
#endif
}

// c (shared, [kBM][kLdC] fp32) = the K-reduction of the operands. Must be reached by
// all threads of the block; synchronises on entry (so callers may still be reading c
// or the operand tiles) and on exit (so c is ready for every thread).
template <bool kBKContiguous, typename ComputeT, typename LoadA, typename LoadB>
__device__ void block_gemm(int K, const LoadA& load_a, const LoadB& load_b, GemmSmem<ComputeT>& sm,
                           float* c) {
  __syncthreads();
  if constexpr (UseTensorCores<ComputeT>::value) {
    gemm_wmma<kBKContiguous>(K, load_a, load_b, sm, c);
  } else {
    gemm_simt<kBKContiguous>(K, load_a, load_b, sm, c);
  }
  __syncthreads();
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Transposed conv, output parity r: tap t (t < taps(r)) is j = first + 2t, and it reads
// input column u + (r + p - j) / 2 for output column 2u + r (r + p - j is even).
struct ParityTaps {
  int first, count, r, p;
  __device__ ParityTaps(int k, int r_, int p_) : first((r_ + p_) & 1), count(0), r(r_), p(p_) {
    count = (k - first + 1) / 2;
  }
  __device__ int tap(int t) const { return first + 2 * t; }
  __device__ int shift(int t) const { return (r + p - tap(t)) / 2; }
};

// ---------------------------------------------------------------------------------
// Stage 1: encoder head
// ---------------------------------------------------------------------------------

// partial[s, b, c, t] = Σ_{n in split s} Σ_j w0[c, n, j] · x[b, n, 2t + j - p],
// c < C1 = D/4, t < D/2. Blocks: (t tile, c tile, split, batch), flattened.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    head_kernel(const T* __restrict__ x, const T* __restrict__ w0, float* __restrict__ partial,
                int B, int N, int D, int k, int splits, int n_chunk) {
  __shared__ GemmSmem<T> sm;
  __shared__ alignas(128) float c_tile[kBM * kLdC];
  const int C1 = D / 4, L1 = D / 2, p = k / 2;
  const int tiles_t = ceil_div(L1, kBN), tiles_c = ceil_div(C1, kBM);
  int idx = blockIdx.x;
  const int tt = idx % tiles_t;
  idx /= tiles_t;
  const int tc = idx % tiles_c;
  idx /= tiles_c;
  const int s = idx % splits;
  const int b = idx / splits;
  const int t0 = tt * kBN, c0 = tc * kBM;
  const int n_begin = min(N, s * n_chunk), n_end = min(N, n_begin + n_chunk);
  const int K = (n_end - n_begin) * k, g0 = n_begin * k;
  const T* x_b = x + static_cast<int64_t>(b) * N * D;

  auto load_a = [&](int m, int g) -> float {
    const int c = c0 + m;
    return c < C1 ? to_float(w0[static_cast<int64_t>(c) * N * k + g0 + g]) : 0.f;
  };
  auto load_b = [&](int g, int col) -> float {
    const int t = t0 + col, n = (g0 + g) / k, j = (g0 + g) % k, pos = 2 * t + j - p;
    return (t < L1 && pos >= 0 && pos < D) ? to_float(x_b[static_cast<int64_t>(n) * D + pos]) : 0.f;
  };
  block_gemm<false>(K, load_a, load_b, sm, c_tile);

  float* out = partial + (static_cast<int64_t>(s) * B + b) * C1 * L1;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int m = e / kBN, col = e % kBN, c = c0 + m, t = t0 + col;
    if (c < C1 && t < L1) out[static_cast<int64_t>(c) * L1 + t] = c_tile[m * kLdC + col];
  }
}

// h1[b, c, t] = relu(bias[c] + Σ_s partial[s, b, c, t]); one thread per element.
template <typename T>
__global__ void __launch_bounds__(256)
    head_reduce_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                       float* __restrict__ h1, int B, int C1, int L1, int splits) {
  const int64_t total = static_cast<int64_t>(B) * C1 * L1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>((i / L1) % C1);
    float v = to_float(bias[c]);
    for (int s = 0; s < splits; ++s) v += partial[s * total + i];
    h1[i] = relu(v);
  }
}

// ---------------------------------------------------------------------------------
// Stage 2: bottleneck (fp32 activations, weights of dtype T, fp32 SIMT GEMMs)
// ---------------------------------------------------------------------------------

// out[b, co, t] = relu(bias[co] + Σ_{ci, j} w[co, ci, j] · in[b, ci, 2t + j - p]);
// in: [B, Cin, Lin], out: [B, Cout, Lin/2]. Blocks: (t tile, co tile, batch).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_s2_relu_kernel(const float* __restrict__ in, const T* __restrict__ w,
                        const T* __restrict__ bias, float* __restrict__ out, int Cin, int Lin,
                        int Cout, int k) {
  __shared__ GemmSmem<float> sm;
  __shared__ alignas(128) float c_tile[kBM * kLdC];
  const int Lout = Lin / 2, p = k / 2;
  const int tiles_t = ceil_div(Lout, kBN), tiles_c = ceil_div(Cout, kBM);
  int idx = blockIdx.x;
  const int tt = idx % tiles_t;
  idx /= tiles_t;
  const int tc = idx % tiles_c;
  const int b = idx / tiles_c;
  const int t0 = tt * kBN, c0 = tc * kBM;
  const float* in_b = in + static_cast<int64_t>(b) * Cin * Lin;

  auto load_a = [&](int m, int g) -> float {
    const int co = c0 + m;
    return co < Cout ? to_float(w[static_cast<int64_t>(co) * Cin * k + g]) : 0.f;
  };
  auto load_b = [&](int g, int col) -> float {
    const int t = t0 + col, ci = g / k, pos = 2 * t + g % k - p;
    return (t < Lout && pos >= 0 && pos < Lin) ? in_b[static_cast<int64_t>(ci) * Lin + pos] : 0.f;
  };
  block_gemm<false>(Cin * k, load_a, load_b, sm, c_tile);

  float* out_b = out + static_cast<int64_t>(b) * Cout * Lout;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int m = e / kBN, col = e % kBN, co = c0 + m, t = t0 + col;
    if (co < Cout && t < Lout)
      out_b[static_cast<int64_t>(co) * Lout + t] =
          relu(c_tile[m * kLdC + col] + to_float(bias[co]));
  }
}

// out[b, co, 2u + r] = relu(bias[co] + Σ_ci Σ_{j ≡ r+p} w[ci, co, j] · in[b, ci, u + (r+p-j)/2]);
// the transposed conv (stride 2, padding p, output_padding 1). in: [B, Cin, Lin],
// w: [Cin, Cout, k], out: [B, Cout, 2·Lin]. Blocks: (u tile, co tile, parity r, batch).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_transpose_s2_relu_kernel(const float* __restrict__ in, const T* __restrict__ w,
                                  const T* __restrict__ bias, float* __restrict__ out, int Cin,
                                  int Lin, int Cout, int k) {
  __shared__ GemmSmem<float> sm;
  __shared__ alignas(128) float c_tile[kBM * kLdC];
  const int Lout = 2 * Lin;
  const int tiles_u = ceil_div(Lin, kBN), tiles_c = ceil_div(Cout, kBM);
  int idx = blockIdx.x;
  const int tu = idx % tiles_u;
  idx /= tiles_u;
  const int tc = idx % tiles_c;
  idx /= tiles_c;
  const int r = idx % 2;
  const int b = idx / 2;
  const int u0 = tu * kBN, c0 = tc * kBM;
  const ParityTaps taps(k, r, k / 2);
  const float* in_b = in + static_cast<int64_t>(b) * Cin * Lin;

  auto load_a = [&](int m, int g) -> float {
    const int co = c0 + m, ci = g / taps.count, j = taps.tap(g % taps.count);
    return co < Cout ? to_float(w[(static_cast<int64_t>(ci) * Cout + co) * k + j]) : 0.f;
  };
  auto load_b = [&](int g, int col) -> float {
    const int u = u0 + col, ci = g / taps.count, pos = u + taps.shift(g % taps.count);
    return (u < Lin && pos >= 0 && pos < Lin) ? in_b[static_cast<int64_t>(ci) * Lin + pos] : 0.f;
  };
  block_gemm<false>(Cin * taps.count, load_a, load_b, sm, c_tile);

  float* out_b = out + static_cast<int64_t>(b) * Cout * Lout;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int m = e / kBN, col = e % kBN, co = c0 + m, u = u0 + col;
    if (co < Cout && u < Lin)
      out_b[static_cast<int64_t>(co) * Lout + 2 * u + r] =
          relu(c_tile[m * kLdC + col] + to_float(bias[co]));
  }
}

// ---------------------------------------------------------------------------------
// Stage 3: fused tail
// ---------------------------------------------------------------------------------

// What one launch of tail_kernel does for its rows [n_begin, n_end):
//   kFused:  both passes (the rows are all of N: one split);
//   kStats:  pass 1 only, writing the rows' column (max, sum of exp) to `stats`;
//   kOutput: combines every split's stats, then pass 2.
enum class TailPhase { kFused, kStats, kOutput };

// One block per (u tile, parity r, split s, batch b) owns the output columns
// o = 2u + r, u in [u0, u0 + kBN) ∩ [0, D/2), for the rows n of split s. With
//   S[n, o] = sigmoid(b2[n] + Σ_c Σ_{j ≡ r+p} w2[c, n, j] · h5[b, c, u + (r+p-j)/2]) + x[b, n, o]
//   V[n, o] = bv[o] + Σ_d x[b, n, d] · wv[o, d]
// pass 1 walks the rows in tiles of kBM keeping each column's running max and sum of
// exp (online softmax); pass 2 recomputes S (bit-identically), computes V and writes
//   y[b, n, o] = exp(S - max) / sum · V + x[b, n, o].
// h5: [B, D/4, D/2] fp32 (relu(dec1) output); w2: [D/4, N, k]; b2: [N]; wv: [D, D];
// bv: [D]; stats: [B, splits, D] of (max, sum), used by kStats/kOutput only.
// Split s covers rows [s · n_chunk, min(N, (s + 1) · n_chunk)).
template <typename T, TailPhase kPhase>
__global__ void __launch_bounds__(kThreads)
    tail_kernel(const T* __restrict__ x, const float* __restrict__ h5, const T* __restrict__ w2,
                const T* __restrict__ b2, const T* __restrict__ wv, const T* __restrict__ bv,
                T* __restrict__ y, float2* __restrict__ stats, int N, int D, int k, int splits,
                int n_chunk) {
  __shared__ GemmSmem<T> sm;
  __shared__ alignas(128) float s_tile[kBM * kLdC];  // scores, then probabilities
  __shared__ alignas(128) float v_tile[kBM * kLdC];  // value projection (no bias)
  __shared__ float col_max[kBN], col_sum[kBN];
  const int C1 = D / 4, U = D / 2;
  const int tiles_u = ceil_div(U, kBN);
  int idx = blockIdx.x;
  const int tu = idx % tiles_u;
  idx /= tiles_u;
  const int r = idx % 2;
  idx /= 2;
  const int s = idx % splits;
  const int b = idx / splits;
  const int u0 = tu * kBN;
  const int n_begin = min(N, s * n_chunk), n_end = min(N, n_begin + n_chunk);
  const ParityTaps taps(k, r, k / 2);
  const int K_s = C1 * taps.count;
  const T* x_b = x + static_cast<int64_t>(b) * N * D;
  T* y_b = y + static_cast<int64_t>(b) * N * D;
  const float* h5_b = h5 + static_cast<int64_t>(b) * C1 * U;
  float2* stats_b = stats + static_cast<int64_t>(b) * splits * D;  // unused for kFused

  int n0 = n_begin;  // first row of the current row tile
  auto load_s_a = [&](int m, int g) -> float {
    const int n = n0 + m, c = g / taps.count, j = taps.tap(g % taps.count);
    return n < n_end ? to_float(w2[(static_cast<int64_t>(c) * N + n) * k + j]) : 0.f;
  };
  auto load_s_b = [&](int g, int col) -> float {
    const int u = u0 + col, c = g / taps.count, pos = u + taps.shift(g % taps.count);
    return (u < U && pos >= 0 && pos < U) ? h5_b[static_cast<int64_t>(c) * U + pos] : 0.f;
  };
  auto load_v_a = [&](int m, int d) -> float {
    const int n = n0 + m;
    return n < n_end ? to_float(x_b[static_cast<int64_t>(n) * D + d]) : 0.f;
  };
  auto load_v_b = [&](int d, int col) -> float {
    const int u = u0 + col;
    return u < U ? to_float(wv[static_cast<int64_t>(2 * u + r) * D + d]) : 0.f;
  };
  // s_tile[m][col] <- S[n0 + m, 2(u0 + col) + r] where n0 + m < n_end and u0 + col < U.
  auto scores = [&]() {
    block_gemm<false>(K_s, load_s_a, load_s_b, sm, s_tile);
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int m = e / kBN, col = e % kBN, n = n0 + m, u = u0 + col;
      if (n < n_end && u < U) {
        const float z = s_tile[m * kLdC + col] + to_float(b2[n]);
        s_tile[m * kLdC + col] =
            1.f / (1.f + expf(-z)) + to_float(x_b[static_cast<int64_t>(n) * D + 2 * u + r]);
      }
    }
    __syncthreads();
  };
  // Column `col` is valid, and owned by thread `col`, when threadIdx.x < kBN and u < U.
  const int col = threadIdx.x;
  const bool owns_column = col < kBN && u0 + col < U;

  if constexpr (kPhase != TailPhase::kOutput) {
    // Pass 1: column max and sum of exp over the rows of this split.
    if (col < kBN) {
      col_max[col] = -INFINITY;
      col_sum[col] = 0.f;
    }
    for (n0 = n_begin; n0 < n_end; n0 += kBM) {
      scores();
      if (owns_column) {
        const int rows = min(kBM, n_end - n0);
        float tile_max = -INFINITY;
        for (int m = 0; m < rows; ++m) tile_max = max_nan(tile_max, s_tile[m * kLdC + col]);
        const float new_max = max_nan(col_max[col], tile_max);
        // Rows of -inf scores add nothing (while every score so far is -inf, the sum stays
        // 0: exp(-inf - (-inf)) would be NaN); NaN and +inf propagate as in the reference.
        if (new_max != -INFINITY) {
          float sum = col_sum[col] * expf(col_max[col] - new_max);  // 0 while col_max is -inf
          for (int m = 0; m < rows; ++m) sum += expf(s_tile[m * kLdC + col] - new_max);
          col_max[col] = new_max;
          col_sum[col] = sum;
        }
      }
    }
  }
  if constexpr (kPhase == TailPhase::kStats) {
    if (owns_column) {
      stats_b[static_cast<int64_t>(s) * D + 2 * (u0 + col) + r] =
          make_float2(col_max[col], col_sum[col]);
    }
    return;
  }
  if constexpr (kPhase == TailPhase::kOutput) {
    // Combine the splits: max over splits, sums rescaled to it. A split with no finite
    // score has (-inf, 0) and contributes nothing; NaN propagates.
    if (owns_column) {
      const int o = 2 * (u0 + col) + r;
      float m_all = -INFINITY;
      for (int t = 0; t < splits; ++t)
        m_all = max_nan(m_all, stats_b[static_cast<int64_t>(t) * D + o].x);
      float sum = 0.f;
      for (int t = 0; t < splits; ++t) {
        const float2 st = stats_b[static_cast<int64_t>(t) * D + o];
        if (st.x != -INFINITY) sum += st.y * expf(st.x - m_all);
      }
      col_max[col] = m_all;
      col_sum[col] = sum;
    }
  }
  // Pass 2: probabilities, value projection, output.
  // >= 1 (the max term is exp(0)); 1/0 = inf for a column of -inf scores, whose exp(NaN)
  // numerators then give NaN, as the reference's softmax does.
  if (owns_column) col_sum[col] = 1.f / col_sum[col];
  for (n0 = n_begin; n0 < n_end; n0 += kBM) {
    scores();  // starts with __syncthreads: col_max / col_sum are visible
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int m = e / kBN, c = e % kBN;
      if (n0 + m < n_end && u0 + c < U)
        s_tile[m * kLdC + c] = expf(s_tile[m * kLdC + c] - col_max[c]) * col_sum[c];
    }
    block_gemm<true>(D, load_v_a, load_v_b, sm, v_tile);
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int m = e / kBN, c = e % kBN, n = n0 + m, u = u0 + c;
      if (n < n_end && u < U) {
        const int o = 2 * u + r;
        const int64_t at = static_cast<int64_t>(n) * D + o;
        const float v = v_tile[m * kLdC + c] + to_float(bv[o]);
        y_b[at] = from_float<T>(s_tile[m * kLdC + c] * v + to_float(x_b[at]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------

// Rows per split of N for `splits` splits: equal chunks, a multiple of kBM for the tail.
int chunk_rows(int64_t N, int64_t splits, int64_t multiple) {
  const int64_t chunk = (N + splits - 1) / splits;
  return static_cast<int>((chunk + multiple - 1) / multiple * multiple);
}

template <typename T>
cudaError_t launch_typed(const Params& prm, cudaStream_t stream) {
  const int B = static_cast<int>(prm.problem.batch), N = static_cast<int>(prm.problem.n_vars);
  const int D = static_cast<int>(prm.problem.d_model), k = static_cast<int>(prm.problem.kernel);
  const int C1 = D / 4, C2 = D / 2;
  const int head_splits = prm.plan.head_splits, tail_splits = prm.plan.tail_splits;
  auto w = [&](WeightIndex i) { return static_cast<const T*>(prm.weights[i]); };
  const T* x = static_cast<const T*>(prm.x);
  T* y = static_cast<T*>(prm.y);

  const size_t act = static_cast<size_t>(B) * D * D / 8;  // every activation is [B, D²/8]
  float* partial = prm.workspace;
  float* h1 = partial + static_cast<size_t>(head_splits) * act;  // [B, C1, D/2]
  float* h2 = h1 + act;                                          // [B, C2, D/4]
  float* h3 = h2 + act;                                          // [B, D, D/8]
  float* h4 = h3 + act;                                          // [B, C2, D/4]
  float* h5 = h4 + act;                                          // [B, C1, D/2]
  float2* stats = reinterpret_cast<float2*>(h5 + act);           // [B, tail_splits, D]

  // 1. head
  head_kernel<T>
      <<<ceil_div(D / 2, kBN) * ceil_div(C1, kBM) * head_splits * B, kThreads, 0, stream>>>(
          x, w(kEnc0Weight), partial, B, N, D, k, head_splits, chunk_rows(N, head_splits, 1));
  const int reduce_blocks = static_cast<int>(std::min<size_t>((act + 255) / 256, 65536));
  head_reduce_kernel<T>
      <<<reduce_blocks, 256, 0, stream>>>(partial, w(kEnc0Bias), h1, B, C1, D / 2, head_splits);
  // 2. bottleneck: enc1 (C1 -> C2, D/2 -> D/4), enc2 (C2 -> D, D/4 -> D/8),
  //    dec0 (D -> C2, D/8 -> D/4), dec1 (C2 -> C1, D/4 -> D/2)
  conv_s2_relu_kernel<T><<<ceil_div(D / 4, kBN) * ceil_div(C2, kBM) * B, kThreads, 0, stream>>>(
      h1, w(kEnc1Weight), w(kEnc1Bias), h2, C1, D / 2, C2, k);
  conv_s2_relu_kernel<T><<<ceil_div(D / 8, kBN) * ceil_div(D, kBM) * B, kThreads, 0, stream>>>(
      h2, w(kEnc2Weight), w(kEnc2Bias), h3, C2, D / 4, D, k);
  conv_transpose_s2_relu_kernel<T>
      <<<ceil_div(D / 8, kBN) * ceil_div(C2, kBM) * 2 * B, kThreads, 0, stream>>>(
          h3, w(kDec0Weight), w(kDec0Bias), h4, D, D / 8, C2, k);
  conv_transpose_s2_relu_kernel<T>
      <<<ceil_div(D / 4, kBN) * ceil_div(C1, kBM) * 2 * B, kThreads, 0, stream>>>(
          h4, w(kDec1Weight), w(kDec1Bias), h5, C2, D / 4, C1, k);
  // 3. tail
  const int tail_blocks = ceil_div(D / 2, kBN) * 2 * tail_splits * B;
  const int tail_chunk = chunk_rows(N, tail_splits, kBM);
  if (tail_splits == 1) {
    tail_kernel<T, TailPhase::kFused>
        <<<tail_blocks, kThreads, 0, stream>>>(x, h5, w(kDec2Weight), w(kDec2Bias), w(kValueWeight),
                                               w(kValueBias), y, stats, N, D, k, 1, tail_chunk);
  } else {
    tail_kernel<T, TailPhase::kStats><<<tail_blocks, kThreads, 0, stream>>>(
        x, h5, w(kDec2Weight), w(kDec2Bias), w(kValueWeight), w(kValueBias), y, stats, N, D, k,
        tail_splits, tail_chunk);
    tail_kernel<T, TailPhase::kOutput><<<tail_blocks, kThreads, 0, stream>>>(
        x, h5, w(kDec2Weight), w(kDec2Bias), w(kValueWeight), w(kValueBias), y, stats, N, D, k,
        tail_splits, tail_chunk);
  }
  return cudaGetLastError();
}

// Blocks of the head's grid for `splits`.
int64_t head_blocks(const Problem& p, int64_t splits) {
  const int64_t D = p.d_model;
  return ((D / 2 + kBN - 1) / kBN) * ((D / 4 + kBM - 1) / kBM) * splits * p.batch;
}

// Blocks of a tail launch for `splits`.
int64_t tail_blocks(const Problem& p, int64_t splits) {
  return ((p.d_model / 2 + kBN - 1) / kBN) * 2 * splits * p.batch;
}

// Splits of N giving about `target` blocks (per_split blocks each), at least
// `min_rows` rows per split, at most `most` splits, and no empty split.
int64_t choose_splits(int64_t N, int64_t per_split, int64_t target, int64_t min_rows, int64_t most,
                      int64_t multiple) {
  const int64_t wanted = (target + per_split - 1) / per_split;
  int64_t splits = std::max<int64_t>(1, std::min({wanted, most, N / min_rows}));
  const int64_t chunk = chunk_rows(N, splits, multiple);
  return (N + chunk - 1) / chunk;
}

constexpr int64_t kMaxHeadSplits = 32, kMaxTailSplits = 64;

}  // namespace

Plan make_plan(const Problem& p, int sm_count) {
  const int64_t target = 2 * static_cast<int64_t>(std::max(sm_count, 1));
  Plan plan;
  plan.head_splits =
      static_cast<int>(choose_splits(p.n_vars, head_blocks(p, 1), target, 32, kMaxHeadSplits, 1));
  plan.tail_splits = static_cast<int>(
      choose_splits(p.n_vars, tail_blocks(p, 1), target, 2 * kBM, kMaxTailSplits, kBM));
  return plan;
}

size_t workspace_floats(const Problem& p, const Plan& plan) {
  const size_t B = static_cast<size_t>(p.batch), D = static_cast<size_t>(p.d_model);
  const size_t stats = plan.tail_splits > 1 ? 2 * B * static_cast<size_t>(plan.tail_splits) * D : 0;
  return static_cast<size_t>(plan.head_splits + 5) * B * D * D / 8 + stats;
}

bool problem_supported(const Problem& p, const char** why) {
  const int64_t int_max = 0x7fffffff;
  const char* reason = nullptr;
  if (p.batch < 1 || p.n_vars < 1 || p.d_model < 8 || p.d_model % 8 != 0 || p.kernel < 1 ||
      p.kernel % 2 == 0) {
    reason = "expected batch >= 1, n_vars >= 1, d_model a positive multiple of 8, odd kernel";
  } else if (p.n_vars * p.kernel > int_max / 2 || p.d_model > int_max / 4) {
    reason = "n_vars * kernel and d_model must fit 32-bit indices";
  } else if (head_blocks(p, kMaxHeadSplits) > int_max || tail_blocks(p, kMaxTailSplits) > int_max) {
    reason = "batch too large for a one-dimensional grid";
  }
  if (why != nullptr) *why = reason;
  return reason == nullptr;
}

cudaError_t launch_fused_score_attention(const Params& params, cudaStream_t stream) {
  if (!problem_supported(params.problem, nullptr) || params.plan.head_splits < 1 ||
      params.plan.head_splits > kMaxHeadSplits || params.plan.tail_splits < 1 ||
      params.plan.tail_splits > kMaxTailSplits) {
    return cudaErrorInvalidValue;
  }
  switch (params.dtype) {
    case DType::kFloat32: return launch_typed<float>(params, stream);
    case DType::kFloat16: return launch_typed<__half>(params, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace casa
