#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

namespace casa {
namespace cpu {
namespace {

// Through ATen's matmul on views of the buffers (its BLAS functions are not exported).
template <typename T>
void aten_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  const at::TensorOptions options(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  const at::Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  // oneDNN's fp32 micro-kernel, or ATen's BLAS when the CPU lacks it (ATen decides).
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C);
#else
  aten_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
#endif
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  aten_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace cpu
}  // namespace casa
