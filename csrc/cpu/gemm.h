// Row-major GEMMs on raw pointers for the CPU kernel, called from inside its parallel
// workers (single-threaded each).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>

namespace casa {
namespace cpu {

// C[M, N] = A[M, K] · B[K, N] (+ C[M, N] when accumulate); lda, ldb, ldc are the row
// strides. float runs on oneDNN's brgemm micro-kernel through ATen where the CPU has it
// and the product is cache-sized (2^24 multiply-adds or fewer, B at most 512 KiB), else on
// ATen's matmul; double on ATen's matmul.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate);

// bfloat16 × bfloat16 -> fp32 GEMMs through oneDNN's brgemm (via ATen), on the best
// bfloat16 GEMM the CPU has: the AMX matrix unit, else the AVX-512 bfloat16 dot
// products (avx512_bf16, e.g. AMD Zen 4). ONEDNN_MAX_CPU_ISA caps the choice, as it
// does for PyTorch's own bfloat16 GEMMs. B is packed once (pack_bf16) into blocks of
// kPackedColumns columns, each [K, kPackedColumns] in the pair-interleaved (VNNI)
// layout both take; K must be even.
constexpr int64_t kPackedColumns = 64;

enum class Bf16Gemm { kNone, kAmx, kAvx512Bf16 };

// The bfloat16 GEMM for this CPU, torch build and settings, chosen once per process:
// AMX where oneDNN packs for it; else avx512_bf16 where it runs and a timed probe shows
// it faster than fp32 GEMMs on converted operands (on Intel CPUs the bfloat16 dot
// product issues on one port, and it may not be); else kNone. kNone also when oneDNN is
// disabled (torch.backends.mkldnn). The environment variable CASA_CPU_BF16_GEMM ("amx",
// "avx512_bf16", "none"; "auto" is the default) overrides the choice among the tiers
// available here; naming an unavailable one raises.
Bf16Gemm bf16_gemm();
const char* bf16_gemm_name(Bf16Gemm tier);
Bf16Gemm bf16_gemm_from_name(const std::string& name);

// Elements of B [K, N] once packed.
int64_t packed_bf16_size(int64_t K, int64_t N);

// Packs B [K, N] (row stride ldb) into `packed` (packed_bf16_size(K, N) elements); fp32
// B is rounded to bfloat16 (nearest even) as it is packed.
void pack_bf16(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, c10::BFloat16* packed);
void pack_bf16(int64_t K, int64_t N, const float* B, int64_t ldb, c10::BFloat16* packed);

// C[M, N] = A[M, K] · B (+ C when accumulate), B packed by pack_bf16, fp32 accumulation.
// Needs bf16_gemm() != kNone.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
               const c10::BFloat16* packed, float* C, int64_t ldc, bool accumulate);

// Releases what this thread's gemm_bf16 calls hold (the AMX tile state).
void release_bf16_gemm();

}  // namespace cpu
}  // namespace casa
