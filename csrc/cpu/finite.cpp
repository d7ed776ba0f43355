// casa::cpu_all_finite: whether every element of a list of CPU tensors is finite, in one
// pass over their memory (ops/finite_weights.py asks it once per weight version, after
// every optimizer step; docs/design.md §11.2). An IEEE value is NaN or ±inf exactly when
// its exponent bits are all ones, so each element is one AND and one compare on its bits,
// which the compiler vectorises; a NaN payload or sign changes nothing. The tensors'
// elements are split over the threads as one range, so small lists run on one thread and
// a list of many small tensors costs one parallel region at most.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace casa {
namespace {

constexpr int64_t kGrain = int64_t{1} << 16;  // elements a thread scans at least

// A tensor's elements as unsigned words of its width, with its exponent mask.
struct Span {
  const void* data;
  int64_t numel;
  int bytes;  // 2, 4 or 8
  uint64_t exponent;
};

template <typename Bits>
bool any_non_finite(const Bits* bits, int64_t n, Bits exponent) {
  Bits found = 0;
  for (int64_t i = 0; i < n; ++i) found |= static_cast<Bits>((bits[i] & exponent) == exponent);
  return found != 0;
}

bool any_non_finite(const Span& s, int64_t begin, int64_t end) {
  switch (s.bytes) {
    case 2:
      return any_non_finite(static_cast<const uint16_t*>(s.data) + begin, end - begin,
                            static_cast<uint16_t>(s.exponent));
    case 4:
      return any_non_finite(static_cast<const uint32_t*>(s.data) + begin, end - begin,
                            static_cast<uint32_t>(s.exponent));
    default:
      return any_non_finite(static_cast<const uint64_t*>(s.data) + begin, end - begin, s.exponent);
  }
}

// The exponent bits of tensors[i]'s dtype; a dtype without them is an error naming it.
uint64_t exponent_mask(at::ScalarType dtype, size_t i) {
  switch (dtype) {
    case at::kFloat: return 0x7f800000u;
    case at::kDouble: return 0x7ff0000000000000u;
    case at::kBFloat16: return 0x7f80u;
    case at::kHalf: return 0x7c00u;
    default:
      TORCH_CHECK(false, "cpu_all_finite: tensors[", i,
                  "] must be float32, float64, bfloat16 or float16, received ", dtype);
  }
}

bool all_finite(at::TensorList tensors) {
  std::vector<at::Tensor> held;  // contiguous copies of strided tensors, kept alive
  std::vector<Span> spans;
  std::vector<int64_t> starts{0};  // spans[i] covers [starts[i], starts[i + 1]) of the range
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "cpu_all_finite: tensors[", i,
                "] must be on the CPU, received one on ", t.device());
    const uint64_t exponent = exponent_mask(t.scalar_type(), i);
    if (t.numel() == 0) continue;
    const at::Tensor& dense = t.is_contiguous() ? t : held.emplace_back(t.contiguous());
    spans.push_back(
        {dense.data_ptr(), dense.numel(), static_cast<int>(dense.element_size()), exponent});
    starts.push_back(starts.back() + dense.numel());
  }
  std::atomic<bool> found{false};
  at::parallel_for(0, starts.back(), kGrain, [&](int64_t begin, int64_t end) {
    // The first span reaching past begin, then each span's part of [begin, end).
    size_t s = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; s < spans.size() && starts[s] < end && !found.load(std::memory_order_relaxed); ++s) {
      const int64_t lo = std::max(begin, starts[s]) - starts[s];
      const int64_t hi = std::min(end, starts[s + 1]) - starts[s];
      if (any_non_finite(spans[s], lo, hi)) found.store(true, std::memory_order_relaxed);
    }
  });
  return !found.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(casa, m) { m.def("cpu_all_finite(Tensor[] tensors) -> bool", &all_finite); }

}  // namespace casa
