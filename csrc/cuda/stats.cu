// Per-channel batch statistics: a split reduction whose partial Welford states are merged
// in a fixed order (deterministic, no atomics), for the planar and channels-last layouts.
//   1. partial kernel: block (channel [tile], split) -> Welford state into the workspace, in
//      double; the threads accumulate in the accumulation type, and the planar kernel's block
//      merges their states in double, so that a float mean is rounded once, at the end
//   2. finalize kernel: a warp per channel merges its splits' states (Chan, in double, fixed order)
// The states are of the values minus a per-channel shift (bn_math.h stats_shift, from the
// channel's first values), so that a large common offset costs no digits; the partial kernel
// stores it in the workspace and the finalize adds it back.
#include "common.cuh"

namespace fastbn {
namespace cuda {

namespace {

// Statistics of V values (block_stats), merged into s.
template <int V, class Acc> __device__ __forceinline__ void welford_add_vec(WelfordState<Acc>& s, const Acc (&v)[V]) {
  if (V == 1) {
    welford_add(s, v[0]);
    return;
  }
  WelfordState<Acc> b{V, Acc(0), Acc(0)};
  block_stats(v, V, b.mean, b.m2);
  s = chan_merge(s, b);
}

// Vectors a thread of a planar statistics tile loads before merging them (K * V, the values
// merged at once, is a power of two: 16, or 32 for 16-byte half-precision vectors).
template <int V> constexpr int kStatsTileVecs = V >= 4 ? 4 : 16 / V;

// Planar: block b handles channel c = b / splits, split b % splits of its tiles (planar_tiles);
// a thread merges each whole tile's K * V values as one state (welford_add_vec).
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    stats_planar_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t S, int64_t splits,
                        double* __restrict__ ws_shift, int64_t* __restrict__ ws_n, double* __restrict__ ws_mean,
                        double* __restrict__ ws_m2) {
  using Acc = acc_t<T>;
  constexpr int K = kStatsTileVecs<V>;
  FASTBN_SHARED_ARRAY(shared, kThreads / 32, WelfordState<double>);
  const int64_t c = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
  const Acc shift = stats_shift<Acc>(N * S, [&](int j) { return to_acc(x[c * S + channel_value_offset(j, C, S)]); });
  WelfordState<Acc> st{0, Acc(0), Acc(0)};
  const auto load_shifted = [&](int64_t o, Acc(&w)[V]) {  // the V values at o, minus the shift
    load_acc<V>(x + o, w);
#pragma unroll
    for (int i = 0; i < V; ++i) w[i] -= shift;
  };
  Acc v[K * V];  // a whole tile's values
  planar_tiles<V, K>(
      N, C, S, c, split, splits,
      [&](int k, int64_t o) {
        Acc w[V];
        load_shifted(o, w);
#pragma unroll
        for (int i = 0; i < V; ++i) v[k * V + i] = w[i];
      },
      [&] { welford_add_vec<K * V>(st, v); },
      [&](int64_t o) {
        Acc w[V];
        load_shifted(o, w);
        welford_add_vec<V>(st, w);
      });
  const WelfordState<double> bs =
      block_merge(WelfordState<double>{st.n, static_cast<double>(st.mean), static_cast<double>(st.m2)}, shared);
  if (flat_tid() == 0) {
    const int64_t k = partial_index(split, c, splits);
    if (split == 0) ws_shift[c] = static_cast<double>(shift);
    ws_n[k] = bs.n;
    ws_mean[k] = bs.mean;
    ws_m2[k] = bs.m2;
  }
}

// Channels-last: thread (tx, ty) of block (bx, by) accumulates VC consecutive channels over
// rows ty + by * blockDim.y + k * gridDim.y * blockDim.y; the block then merges over ty in
// Acc (a double tree slowed half-precision forwards: DESIGN_NOTES.md) and stores the states
// in double.
// Dynamic shared memory: blockDim.y * (blockDim.x * VC * 2 Acc + 1 int64).
template <class T, int VC>
__global__ void __launch_bounds__(kThreads)
    stats_cl_kernel(const T* __restrict__ x, int64_t M, int64_t C, double* __restrict__ ws_shift,
                    int64_t* __restrict__ ws_n, double* __restrict__ ws_mean, double* __restrict__ ws_m2) {
  using Acc = acc_t<T>;
  FASTBN_DYNAMIC_SHARED(smem);
  const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int width = bx * VC;
  Acc* sm_mean = reinterpret_cast<Acc*>(smem);
  Acc* sm_m2 = sm_mean + by * width;
  int64_t* sm_n = reinterpret_cast<int64_t*>(sm_m2 + by * width);

  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * bx + tx) * VC;
  Acc mean[VC], m2[VC], shift[VC];
#pragma unroll
  for (int i = 0; i < VC; ++i) mean[i] = m2[i] = shift[i] = Acc(0);
  int64_t n = 0;
  if (c0 < C) {
    // The VC channels' shifts, a row of them at a time (stats_shift's bits).
    stats_shifts<VC>(M, [&](int j, Acc (&v)[VC]) { load_acc<VC>(x + j * C + c0, v); }, shift);
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * by + ty; m < M; m += static_cast<int64_t>(gridDim.y) * by) {
      Acc v[VC];
      load_acc<VC>(x + m * C + c0, v);
#pragma unroll
      for (int i = 0; i < VC; ++i) v[i] -= shift[i];
      // welford_add for VC channels at once, the merge weights shared.
      if (n == 0) {  // the first row: single_state
#pragma unroll
        for (int i = 0; i < VC; ++i) {
          const WelfordState<Acc> one = single_state(v[i]);
          mean[i] = one.mean;
          m2[i] = one.m2;
        }
      } else {
        const ChanWeights<Acc> w = chan_weights<Acc>(n, 1);
#pragma unroll
        for (int i = 0; i < VC; ++i) chan_absorb(mean[i], m2[i], v[i], single_state(v[i]).m2, w);
      }
      n += 1;
    }
  }
#pragma unroll
  for (int i = 0; i < VC; ++i) {
    sm_mean[ty * width + tx * VC + i] = mean[i];
    sm_m2[ty * width + tx * VC + i] = m2[i];
  }
  if (tx == 0) sm_n[ty] = n;
  __syncthreads();
  for (int stride = by / 2; stride > 0; stride /= 2) {
    if (ty < stride) {
      const int64_t na = sm_n[ty], nb = sm_n[ty + stride];
#pragma unroll
      for (int i = 0; i < VC; ++i) {
        const int j = tx * VC + i;
        const WelfordState<Acc> r = chan_merge(WelfordState<Acc>{na, sm_mean[ty * width + j], sm_m2[ty * width + j]},
                                               WelfordState<Acc>{nb, sm_mean[(ty + stride) * width + j],
                                                                 sm_m2[(ty + stride) * width + j]});
        sm_mean[ty * width + j] = r.mean;
        sm_m2[ty * width + j] = r.m2;
      }
    }
    __syncthreads();
    if (ty < stride && tx == 0) sm_n[ty] = sm_n[ty] + sm_n[ty + stride];
    __syncthreads();
  }
  if (ty == 0 && c0 < C) {
#pragma unroll
    for (int i = 0; i < VC; ++i) {
      const int64_t k = partial_index(blockIdx.y, c0 + i, gridDim.y);
      if (blockIdx.y == 0) ws_shift[c0 + i] = static_cast<double>(shift[i]);
      ws_n[k] = sm_n[0];
      ws_mean[k] = sm_mean[tx * VC + i];
      ws_m2[k] = sm_m2[tx * VC + i];
    }
  }
}

// A warp per channel (threadIdx.y): lane l merges partials l, l + 32, ... in order (in
// double; kFinalizeBatch of them loaded at a time), then the lanes merge in a fixed shuffle
// tree; the order depends on `splits` alone. The partials are of the values minus the
// channel's shift (ws_shift, stored by the partial kernel), added back here.
template <class Acc>
__global__ void stats_finalize_kernel(const double* __restrict__ ws_shift, const int64_t* __restrict__ ws_n,
                                      const double* __restrict__ ws_mean, const double* __restrict__ ws_m2,
                                      int64_t splits, int64_t C, Acc eps, Acc* __restrict__ mean,
                                      Acc* __restrict__ var, Acc* __restrict__ invstd, RunningStats<Acc> run) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // the whole warp
  WelfordState<double> s{0, 0.0, 0.0};
  for (int64_t k0 = threadIdx.x; k0 < splits; k0 += 32 * kFinalizeBatch) {
    // All loads first (unconditional: past the last split the index is clamped and the
    // value dropped below), so that they overlap; then the merges in order.
    int64_t pn[kFinalizeBatch];
    double pmean[kFinalizeBatch], pm2[kFinalizeBatch];
#pragma unroll
    for (int j = 0; j < kFinalizeBatch; ++j) {
      const int64_t i = partial_index(min(k0 + 32 * j, splits - 1), c, splits);
      pn[j] = ws_n[i];
      pmean[j] = ws_mean[i];
      pm2[j] = ws_m2[i];
    }
#pragma unroll
    for (int j = 0; j < kFinalizeBatch; ++j) {
      if (k0 + 32 * j < splits)
        s = chan_merge(s, WelfordState<double>{pn[j], pmean[j], pm2[j]});
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s = chan_merge(s, shfl_down(s, off));
  if (threadIdx.x != 0) return;
  add_shift(s, ws_shift[c]);
  finalize_stats(s, eps, mean, var, invstd, c);
  update_running(run, c, mean[c], var[c], s.n);
}

template <class T, int V>
void launch_planar(const Geometry& g, const T* x, ReduceWorkspace<double>& ws, int64_t splits, cudaStream_t stream) {
  FASTBN_LAUNCH(static_cast<unsigned>(g.C * splits), kThreads, 0, stream, stats_planar_kernel<T, V>)(
      x, g.N, g.C, g.S, splits, ws.shift, ws.n, ws.a, ws.b);
}

template <class T, int VC>
void launch_cl(const Geometry& g, const T* x, ReduceWorkspace<double>& ws, int64_t splits, cudaStream_t stream) {
  const ClBlock blk(g.C, VC);
  const dim3 grid(static_cast<unsigned>(blk.grid_x), static_cast<unsigned>(splits));
  const dim3 block(blk.bx, blk.by);
  const size_t smem = static_cast<size_t>(blk.by) * (blk.bx * VC * 2 * sizeof(acc_t<T>) + sizeof(int64_t));
  FASTBN_LAUNCH(grid, block, smem, stream, stats_cl_kernel<T, VC>)(x, g.rows(), g.C, ws.shift, ws.n, ws.a, ws.b);
}

}  // namespace

size_t reduce_workspace_bytes(const Geometry& g, int elem_size, int sm_count) {
  const int v = 16 / elem_size;  // vec_width<T>()
  const int64_t splits = std::max(reduction_splits(g, sm_count, 1), reduction_splits(g, sm_count, v));
  return ReduceWorkspace<double>::bytes(splits, g.C);  // statistics partials are double (sums: Acc, no larger)
}

template <class T>
cudaError_t launch_stats(const Geometry& g, const T* x, acc_t<T>* mean, acc_t<T>* var, acc_t<T>* invstd, double eps,
                         RunningStats<acc_t<T>> run, void* workspace, const LaunchEnv& env) {
  using Acc = acc_t<T>;
  constexpr int V = vec_width<T>();
  int64_t splits;
  if (g.channels_last) {
    const bool vec = g.C % V == 0 && aligned16(x);
    splits = reduction_splits(g, env.sm_count, vec ? V : 1);
    ReduceWorkspace<double> ws(workspace, splits, g.C);
    if (vec) launch_cl<T, V>(g, x, ws, splits, env.stream);
    else launch_cl<T, 1>(g, x, ws, splits, env.stream);
  } else {
    splits = reduction_splits(g, env.sm_count, 1);
    ReduceWorkspace<double> ws(workspace, splits, g.C);
    with_vec<T>(planar_reduce_vec<T>(g.S, {x}), [&](auto v) { launch_planar<T, decltype(v)::value>(g, x, ws, splits, env.stream); });
  }
  ReduceWorkspace<double> ws(workspace, splits, g.C);
  FASTBN_LAUNCH(static_cast<unsigned>(ceil_div(g.C, kFinalizeChannels)), dim3(32, kFinalizeChannels), 0, env.stream,
                stats_finalize_kernel<Acc>)(ws.shift, ws.n, ws.a, ws.b, splits, g.C, static_cast<Acc>(eps), mean, var,
                                            invstd, run);
  return cudaGetLastError();
}

#define FASTBN_INSTANTIATE_STATS(T)                                                                          \
  template cudaError_t launch_stats<T>(const Geometry&, const T*, acc_t<T>*, acc_t<T>*, acc_t<T>*, double,          \
                                       RunningStats<acc_t<T>>, void*, const LaunchEnv&);
FASTBN_INSTANTIATE_STATS(float)
FASTBN_INSTANTIATE_STATS(double)
FASTBN_INSTANTIATE_STATS(f16)
FASTBN_INSTANTIATE_STATS(bf16)

}  // namespace cuda
}  // namespace fastbn
