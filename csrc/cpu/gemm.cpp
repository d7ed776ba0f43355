#include "gemm.h"

#include "vectorised.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <limits>
#include <string>
#include <vector>

namespace casa {
namespace cpu {
namespace {

// Through ATen's matmul on views of the buffers (its BLAS functions are not exported).
template <typename T>
void aten_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate) {
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

// fp32 GEMMs up to this many multiply-adds, whose B operand takes at most this many bytes,
// run on brgemm (lower overhead); the others on ATen's matmul (MKL), which blocks for the
// caches itself where brgemm streams all of B for every block of A's rows
// (docs/design.md §5.3).
constexpr int64_t kMaxBrgemmMacs = int64_t{1} << 24;
constexpr int64_t kMaxBrgemmBBytes = int64_t{512} << 10;

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (M * N * K <= kMaxBrgemmMacs && K * N * int64_t{sizeof(float)} <= kMaxBrgemmBBytes) {
    // oneDNN's fp32 micro-kernel, or ATen's BLAS when the CPU lacks it (ATen decides).
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C);
    return;
  }
#endif
  aten_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  aten_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

int64_t packed_bf16_size(int64_t K, int64_t N) {
  return K * ((N + kPackedColumns - 1) / kPackedColumns) * kPackedColumns;
}

void pack_bf16(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, c10::BFloat16* packed) {
  TORCH_CHECK(K % 2 == 0, "pack_bf16: K must be even, received ", K);
  interleave_pairs_bf16(K, N, B, ldb, kPackedColumns, packed);
}

void pack_bf16(int64_t K, int64_t N, const float* B, int64_t ldb, c10::BFloat16* packed) {
  TORCH_CHECK(K % 2 == 0, "pack_bf16: K must be even, received ", K);
  interleave_pairs_bf16(K, N, B, ldb, kPackedColumns, packed);
}

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
namespace {

// Whether brgemm runs a bfloat16 GEMM here without the matrix unit: it needs the CPU's
// bfloat16 dot products and oneDNN allowed to use them (ONEDNN_MAX_CPU_ISA). Tried once
// on a 2 x 16 x 2 product; oneDNN or ATen raise where it cannot.
bool brgemm_bf16_runs() {
  try {
    std::vector<c10::BFloat16> a = {1.0f, 2.0f, 3.0f, 4.0f}, b(2 * 16, c10::BFloat16(1.0f));
    std::vector<c10::BFloat16> packed(packed_bf16_size(2, 16));
    std::vector<float> c(2 * 16);
    pack_bf16(2, 16, b.data(), 16, packed.data());
    at::native::cpublas::brgemm(2, 16, 2, 2, kPackedColumns, 16, false, a.data(), packed.data(),
                                c.data(), /*is_vnni=*/true);
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
    return c[0] == 3.0f && c[31] == 7.0f;
  } catch (const std::exception&) {
    return false;
  }
}

// Milliseconds of the fastest of `reps` runs of f.
template <typename F>
double fastest_ms(int reps, F&& f) {
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(
        best,
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Whether the avx512_bf16 GEMM beats what it replaces, fp32 GEMMs on the bfloat16
// operands converted to fp32, on a GEMM of the tail's shape (64 x 512 x 512). On AMD
// Zen 4 a bfloat16 dot product does twice the work of an fp32 FMA per instruction; on
// Intel CPUs it issues on one port where FMAs issue on two, and the fp32 path can win.
// Timed once per process (a few milliseconds): the fastest of 5 runs of each.
bool avx512_bf16_pays() {
  constexpr int64_t M = 64, K = 512, N = 512;
  std::vector<c10::BFloat16> a(M * K), b(K * N), packed(packed_bf16_size(K, N));
  for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 7) / 8.0f;
  for (int64_t i = 0; i < K * N; ++i) b[i] = static_cast<float>(i % 5) / 8.0f;
  std::vector<float> a32(M * K), b32(b.begin(), b.end()), c(M * N);
  pack_bf16(K, N, b.data(), N, packed.data());
  const double bf16_ms =
      fastest_ms(5, [&] { gemm_bf16(M, N, K, a.data(), K, packed.data(), c.data(), N, false); });
  release_bf16_gemm();
  const double fp32_ms = fastest_ms(5, [&] {
    std::copy(a.begin(), a.end(), a32.begin());
    gemm(M, N, K, a32.data(), K, b32.data(), N, c.data(), N, false);
  });
  return bf16_ms <= fp32_ms;
}

// The tier: CASA_CPU_BF16_GEMM names one ("amx", "avx512_bf16", "none"; it must be
// available here), else ("auto" or unset) AMX where oneDNN can pack for it, else
// avx512_bf16 where it runs and pays (avx512_bf16_pays), else none.
Bf16Gemm choose_bf16_gemm() {
  const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  const bool avx512_bf16 = !amx && brgemm_bf16_runs();
  const char* env = std::getenv("CASA_CPU_BF16_GEMM");
  const std::string requested = env == nullptr || *env == '\0' ? "auto" : env;
  if (requested == "auto") {
    if (amx) return Bf16Gemm::kAmx;
    return avx512_bf16 && avx512_bf16_pays() ? Bf16Gemm::kAvx512Bf16 : Bf16Gemm::kNone;
  }
  TORCH_CHECK(requested == "amx" || requested == "avx512_bf16" || requested == "none",
              "CASA_CPU_BF16_GEMM: expected \"auto\", \"amx\", \"avx512_bf16\" or \"none\", "
              "received \"",
              requested, "\"");
  const Bf16Gemm tier = bf16_gemm_from_name(requested);
  const Bf16Gemm available = amx           ? Bf16Gemm::kAmx
                             : avx512_bf16 ? Bf16Gemm::kAvx512Bf16
                                           : Bf16Gemm::kNone;
  TORCH_CHECK(tier == Bf16Gemm::kNone || tier == available, "CASA_CPU_BF16_GEMM=", requested,
              ": this CPU (with ONEDNN_MAX_CPU_ISA, if set) offers ",
              available == Bf16Gemm::kNone
                  ? std::string("only \"none\"")
                  : "\"" + std::string(bf16_gemm_name(available)) + "\" or \"none\"");
  return tier;
}

}  // namespace

Bf16Gemm bf16_gemm() {
  if (!at::globalContext().userEnabledMkldnn()) return Bf16Gemm::kNone;
  static const Bf16Gemm tier = choose_bf16_gemm();
  return tier;
}

void gemm_bf16(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
               const c10::BFloat16* packed, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kPackedColumns) {
    at::native::cpublas::brgemm(M, std::min(kPackedColumns, N - n0), K, lda, kPackedColumns, ldc,
                                accumulate, A, packed + n0 * K, C + n0, /*is_vnni=*/true);
  }
}

void release_bf16_gemm() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }
#else
Bf16Gemm bf16_gemm() { return Bf16Gemm::kNone; }
void gemm_bf16(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
               float*, int64_t, bool) {
  TORCH_CHECK(false, "gemm_bf16: this torch build has no bfloat16 brgemm");
}
void release_bf16_gemm() {}
#endif

const char* bf16_gemm_name(Bf16Gemm tier) {
  switch (tier) {
    case Bf16Gemm::kAmx: return "amx";
    case Bf16Gemm::kAvx512Bf16: return "avx512_bf16";
    case Bf16Gemm::kNone: break;
  }
  return "none";
}

Bf16Gemm bf16_gemm_from_name(const std::string& name) {
  for (const Bf16Gemm tier : {Bf16Gemm::kNone, Bf16Gemm::kAmx, Bf16Gemm::kAvx512Bf16}) {
    if (name == bf16_gemm_name(tier)) return tier;
  }
  TORCH_CHECK(false, "bf16_gemm: expected \"none\", \"amx\" or \"avx512_bf16\", received \"", name,
              "\"");
}

}  // namespace cpu
}  // namespace casa
