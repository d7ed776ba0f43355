// Prints the CUDA kernels' launch plan (csrc/cuda/launch_plan.h) as JSON, for the static
// cost model (bench/cost_model/cuda_side.py), which builds this with a host compiler:
//   cuda_plan DTYPE B N D K SM_COUNT      (DTYPE: 0 float32, 1 float16, 2 bfloat16)
#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "launch_plan.h"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: cuda_plan DTYPE B N D K SM_COUNT\n");
    return 2;
  }
  using namespace casa::gpu;
  const auto dtype = static_cast<DType>(std::atoi(argv[1]));
  const Problem p{std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]),
                  std::atoll(argv[5])};
  const Plan plan = make_plan(p, std::atoi(argv[6]));
  const LaunchPlan lp = plan_launches(p, plan, dtype);
  const Launch* launches[kLaunches] = {&lp.head, &lp.head_reduce, &lp.enc1,       &lp.enc2,
                                       &lp.dec0, &lp.dec1,        &lp.tail_stats, &lp.tail_output};
  const char* names[kLaunches] = {"head", "head_reduce", "enc1",       "enc2",
                                  "dec0", "dec1",        "tail_stats", "tail_output"};
  // The bottleneck convs' launches, in bottleneck_layer order.
  const Launch* bottleneck[kBottleneckLayers] = {&lp.enc1, &lp.enc2, &lp.dec0, &lp.dec1};
  const int e = dtype_bytes(dtype);
  std::printf(
      "{\"head_splits\": %d, \"tail_splits\": %d, \"head_chunk_rows\": %d, \"tiles\": "
      "{\"conv\": [%d, %d], \"conv_stages\": %d, \"conv_halo\": [%d, %d, %d], \"tail\": "
      "[%d, %d], \"tail_score_stages\": %d, \"bk\": %d, \"value_stages\": %d, "
      "\"merge_batch\": %d, \"max_conv_splits\": %d}, "
      "\"launches\": [",
      plan.head_splits, plan.tail_splits, split_chunk(p.n_vars, plan.head_splits), kConvRows,
      kConvCols, kConvStages, conv_halo(e, false), conv_halo(e, true),
      conv_halo(e, true, plan.tail_cols / 2), kTailRows, plan.tail_cols, kTailScoreStages,
      operand_bk(e),
      kValueStages, kMergeBatch, kMaxConvSplits);
  for (int i = 0; i < kLaunches; ++i) {
    std::printf("%s{\"name\": \"%s\", \"kernel\": \"%s\", \"blocks\": %lld, \"threads\": %d, "
                "\"smem_bytes\": %d",
                i ? ", " : "", names[i], launches[i]->kernel,
                static_cast<long long>(launches[i]->blocks), launches[i]->threads,
                launches[i]->smem_bytes);
    // A bottleneck conv's layer, its splits and the input channels of its longest split.
    for (int j = 0; j < kBottleneckLayers; ++j) {
      if (launches[i] != bottleneck[j]) continue;
      const ConvLayer l = bottleneck_layer(p, j);
      const int splits = plan.conv_splits[j];
      std::printf(", \"layer\": {\"cin\": %lld, \"lin\": %lld, \"cout\": %lld, "
                  "\"transposed\": %s, \"splits\": %d, \"chunk\": %lld}",
                  static_cast<long long>(l.cin), static_cast<long long>(l.lin),
                  static_cast<long long>(l.cout), l.transposed ? "true" : "false", splits,
                  static_cast<long long>(std::min<int64_t>(l.cin, split_chunk(l.cin, splits))));
    }
    std::printf("}");
  }
  std::printf("]}\n");
  return 0;
}
