// Per-channel (length-C) kernel: the Chan merge of per-rank statistics (SyncBatchNorm), with
// the running statistics' update. One thread per channel.
#include "common.cuh"

namespace fastbn {
namespace cuda {

namespace {

template <class Acc>
__global__ void merge_stats_kernel(const int64_t* __restrict__ counts, const Acc* __restrict__ means,
                                   const Acc* __restrict__ vars, int64_t W, int64_t C, Acc eps, Acc* __restrict__ mean,
                                   Acc* __restrict__ invstd, Acc* __restrict__ var, int64_t* __restrict__ total,
                                   RunningStats<Acc> run) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  WelfordState<double> s{0, 0.0, 0.0};
  for (int64_t w = 0; w < W; ++w) s = chan_merge(s, rank_state<double>(counts[w], means[w * C + c], vars[w * C + c]));
  finalize_stats(s, eps, mean, var, invstd, c);
  update_running(run, c, mean[c], var[c], s.n);
  if (c == 0) *total = s.n;
}

}  // namespace

template <class Acc>
cudaError_t launch_merge_stats(const int64_t* counts, const Acc* means, const Acc* vars, int64_t W, int64_t C,
                               double eps, Acc* mean, Acc* invstd, Acc* var, int64_t* total, RunningStats<Acc> run,
                               const LaunchEnv& env) {
  FASTBN_LAUNCH(static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, env.stream, merge_stats_kernel<Acc>)(
      counts, means, vars, W, C, static_cast<Acc>(eps), mean, invstd, var, total, run);
  return cudaGetLastError();
}

template cudaError_t launch_merge_stats<float>(const int64_t*, const float*, const float*, int64_t, int64_t, double,
                                               float*, float*, float*, int64_t*, RunningStats<float>,
                                               const LaunchEnv&);
template cudaError_t launch_merge_stats<double>(const int64_t*, const double*, const double*, int64_t, int64_t, double,
                                                double*, double*, double*, int64_t*, RunningStats<double>,
                                                const LaunchEnv&);

}  // namespace cuda
}  // namespace fastbn
