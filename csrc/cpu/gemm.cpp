#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>

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

bool has_bf16_matrix_unit() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

int64_t packed_bf16_size(int64_t K, int64_t N) {
  return K * ((N + kPackedColumns - 1) / kPackedColumns) * kPackedColumns;
}

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
void pack_bf16(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, c10::BFloat16* packed) {
  TORCH_CHECK(K % 2 == 0, "pack_bf16: K must be even, received ", K);
  for (int64_t n0 = 0; n0 < N; n0 += kPackedColumns) {
    at::native::cpublas::pack(K, std::min(kPackedColumns, N - n0), ldb, kPackedColumns,
                              at::kBFloat16, at::kBFloat16, B + n0, packed + n0 * K);
  }
}

void gemm_bf16(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
               const c10::BFloat16* packed, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kPackedColumns) {
    at::native::cpublas::brgemm(M, std::min(kPackedColumns, N - n0), K, lda, kPackedColumns,
                                ldc, accumulate, A, packed + n0 * K, C + n0, /*is_vnni=*/true);
  }
}

void release_bf16_matrix_unit() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }
#else
void pack_bf16(int64_t, int64_t, const c10::BFloat16*, int64_t, c10::BFloat16*) {
  TORCH_CHECK(false, "pack_bf16: this torch build has no bfloat16 brgemm");
}
void gemm_bf16(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
               float*, int64_t, bool) {
  TORCH_CHECK(false, "gemm_bf16: this torch build has no bfloat16 brgemm");
}
void release_bf16_matrix_unit() {}
#endif

}  // namespace cpu
}  // namespace casa
