// Torch-free launch API of fastbn's CUDA kernels: raw pointers, sizes and a cudaStream_t.
// Implemented in stats.cu, normalize.cu, grad.cu, channel_ops.cu; called from
// cuda_backend.h. T is the storage type (float, double, f16, bf16); per-channel arrays
// are acc_t<T> (float, or double for double), length C, contiguous. Every launcher returns
// the launch status (cudaGetLastError()) and never synchronises or allocates.
#pragma once
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "../bn_types.h"

namespace fastbn {
namespace cuda {

struct LaunchEnv {
  cudaStream_t stream;
  int sm_count;  // multiprocessors of the current device
  int device;    // the current device's index
};

// A per-device value: query() the first time for `device`, then the cached value (devices
// 0..63; a result <= 0 is returned, not cached).
template <class Query> int cached_per_device(std::array<std::atomic<int>, 64>& cache, int device, const Query& query) {
  const bool cached = device >= 0 && static_cast<size_t>(device) < cache.size();
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int v = query();
  if (cached && v > 0) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Bytes of device workspace the per-channel reductions (stats, grad sums) need for geometry
// g; the caller allocates them (caching allocator) and passes them to the launchers below.
size_t reduce_workspace_bytes(const Geometry& g, int elem_size, int sm_count);

// Per-channel mean and biased variance of x; invstd = 1 / sqrt(var + eps) when invstd != null;
// the running statistics in `run` (if any) updated with them (bn_math.h update_running).
template <class T>
cudaError_t launch_stats(const Geometry& g, const T* x, acc_t<T>* mean, acc_t<T>* var, acc_t<T>* invstd, double eps,
                         RunningStats<acc_t<T>> run, void* workspace, const LaunchEnv& env);

// y = (x - mean) * invstd * w + b [+ r] [relu]; st gives mean and invstd (or var + eps).
// x, y, r share the layout of g.
template <class T>
cudaError_t launch_normalize(const Geometry& g, const T* x, T* y, ChannelStats<acc_t<T>> st, Affine<acc_t<T>> af,
                             const T* r, bool relu, const LaunchEnv& env);

// sum_dy[c] = sum dy_eff, sum_dy_xhat[c] = invstd * sum dy_eff * (x - mean), with dy_eff = dy,
// or dy masked where the (recomputed) pre-activation (x - mean) * a + b + r <= 0 when relu.
template <class T>
cudaError_t launch_grad_reduce(const Geometry& g, const T* dy, const T* x, ChannelStats<acc_t<T>> st,
                               Affine<acc_t<T>> af, const T* r, bool relu, acc_t<T>* sum_dy, acc_t<T>* sum_dy_xhat,
                               void* workspace, const LaunchEnv& env);

// dx = A * dy_eff + Bm * (x - mean) + D (bn_math.h backward_coef; sums over `count` values, read
// from device memory at device_count instead when that is not null, or eval formula when
// !training); dr = dy_eff. dx and dr may each be null; sums may be null when !training.
template <class T>
cudaError_t launch_grad_input(const Geometry& g, const T* dy, const T* x, ChannelStats<acc_t<T>> st,
                              Affine<acc_t<T>> af, const T* r, bool relu, bool training, const acc_t<T>* sum_dy,
                              const acc_t<T>* sum_dy_xhat, int64_t count, const int64_t* device_count, T* dx, T* dr,
                              const LaunchEnv& env);

// Chan merge of W per-rank statistics (counts [W], means/vars [W, C] biased) into
// (mean, invstd, var) of the union and *total, its count (C >= 1); the running statistics in
// `run` (if any) updated with them.
template <class Acc>
cudaError_t launch_merge_stats(const int64_t* counts, const Acc* means, const Acc* vars, int64_t W, int64_t C,
                               double eps, Acc* mean, Acc* invstd, Acc* var, int64_t* total, RunningStats<Acc> run,
                               const LaunchEnv& env);

}  // namespace cuda
}  // namespace fastbn
