// Row-major GEMMs on raw pointers for the CPU kernel, called from inside its parallel
// workers (single-threaded each).
#pragma once

#include <cstdint>

namespace casa {
namespace cpu {

// C[M, N] = A[M, K] · B[K, N] (+ C[M, N] when accumulate); lda, ldb, ldc are the row
// strides. float runs on oneDNN's brgemm micro-kernel through ATen where the CPU has it
// (ATen's matmul otherwise), double on ATen's matmul.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate);

}  // namespace cpu
}  // namespace casa
