// Keeps BLAS single-threaded on the calling thread while a guard lives.
//
// The CPU kernel calls GEMMs from inside at::parallel_for workers. MKL, which torch's
// x86 builds link, does not see that it is nested in torch's OpenMP region and would
// start its own threads in every worker: 2 workers x 2 MKL threads on 2 cores, spinning
// against each other. The guard sets MKL's
// thread-local count to 1 and restores it. MKL_Set_Num_Threads_Local (the C entry point;
// the lower-case symbol is the Fortran one, taking a pointer) is looked up as a
// weak symbol, so builds of torch without MKL (e.g. OpenBLAS on aarch64) get a no-op.
#pragma once

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace casa {
namespace cpu {

class SequentialBlasGuard {
 public:
  SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlasGuard(const SequentialBlasGuard&) = delete;
  SequentialBlasGuard& operator=(const SequentialBlasGuard&) = delete;

 private:
  int previous_ = 0;  // 0: follow the global setting again
};

}  // namespace cpu
}  // namespace casa
