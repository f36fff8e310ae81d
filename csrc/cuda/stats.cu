// Per-channel batch statistics: a split reduction whose partial Welford states are merged
// in a fixed order (deterministic, no atomics), for the planar and channels-last layouts.
//   1. partial kernel: block (channel [tile], split) -> Welford state into the workspace, in
//      double; the threads accumulate in the accumulation type, and the planar kernel's block
//      merges their states in double, so that a float mean is rounded once, at the end
//   2. finalize kernel: `lanes` threads a channel merge its splits' states (Chan, in double,
//      fixed order; plan.h finalize_plan)
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
  block_stats<V>(v, b.mean, b.m2);
  s = chan_merge(s, b);
}

// Vectors a thread of a planar statistics tile loads before merging them (K * V, the values
// merged at once, is a power of two: 16, or 32 for 16-byte half-precision vectors).
template <int V> constexpr int kStatsTileVecs = V >= 4 ? 4 : 16 / V;

// Planar: block b handles channel c = b / splits, split b % splits of its tiles (planar_tiles);
// a thread merges each whole tile's K * V values as one state (welford_add_vec).
// Blocks an SM must hold (__launch_bounds__): a register budget without spills (plan.h
// blocks_per_sm gives the occupancy the ptxas report implies).
template <class T> constexpr int kStatsPlanarMinBlocks = sizeof(T) == 8 ? 2 : 3;

template <class T, int V>
__global__ void __launch_bounds__(kThreads, kStatsPlanarMinBlocks<T>)
    stats_planar_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t S, int64_t splits,
                        double* __restrict__ ws_shift, int64_t* __restrict__ ws_n, double* __restrict__ ws_mean,
                        double* __restrict__ ws_m2) {
  using Acc = acc_t<T>;
  constexpr int K = kStatsTileVecs<V>;
  FASTBN_SHARED_ARRAY(shared, kThreads / 32, WelfordState<double>);
  const int64_t c = blockIdx.x / static_cast<unsigned>(splits);  // 32-bit: splits <= kMaxGridY
  const int64_t split = blockIdx.x % static_cast<unsigned>(splits);
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

// Statistics of K vectors of V values split at `lo`: values i < lo of each vector merged into
// a, the others into b (two-pass in Acc: each part's mean from its values times 1 / count,
// which cannot overflow near the float range and is block_stats' rule where the count is a
// power of two (for other counts the reciprocal's rounding costs at most an ulp); then the
// centred squares; selects, not products, keep an infinite value of one part out of the
// other).
template <int K, int V, class Acc>
__device__ __forceinline__ void split_stats(const Acc (&v)[K][V], int lo, WelfordState<Acc>& a,
                                            WelfordState<Acc>& b) {
  const int64_t na = static_cast<int64_t>(K) * lo, nb = static_cast<int64_t>(K) * (V - lo);
  const Acc ia = Acc(1) / static_cast<Acc>(na), ib = nb > 0 ? Acc(1) / static_cast<Acc>(nb) : Acc(0);
  Acc ma = Acc(0), mb = Acc(0);
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (i < lo) ma = madd(v[k][i], ia, ma);
      else mb = madd(v[k][i], ib, mb);
    }
  Acc qa = Acc(0), qb = Acc(0);
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (i < lo) {
        const Acc d = v[k][i] - ma;
        qa = madd(d, d, qa);
      } else {
        const Acc d = v[k][i] - mb;
        qb = madd(d, d, qb);
      }
    }
  a = chan_merge(a, WelfordState<Acc>{na, ma, qa});
  if (nb > 0) b = chan_merge(b, WelfordState<Acc>{nb, mb, qb});
}

// Grouped planar (plan.h Walk::grouped, common.cuh GroupedWalk): block b handles channels
// (b / splits) * G ... + G - 1, split b % splits of their rows; a thread accumulates the states
// of the two channels its vector covers, 16 values (kGroupedRows vectors) at a time.
template <int V> constexpr int kGroupedRows = 16 / V;

template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    stats_grouped_kernel(const T* __restrict__ x, int64_t N, int64_t C, int S, int G, int64_t splits,
                         double* __restrict__ ws_shift, int64_t* __restrict__ ws_n, double* __restrict__ ws_mean,
                         double* __restrict__ ws_m2) {
  using Acc = acc_t<T>;
  constexpr int V = static_cast<int>(16 / sizeof(T));  // 16-byte vectors
  constexpr int K = kGroupedRows<V>;
  FASTBN_SHARED_ARRAY(shared, 2 * kThreads, WelfordState<double>);
  FASTBN_SHARED_ARRAY(shifts, 8, Acc);
  const int64_t c0 = (blockIdx.x / static_cast<unsigned>(splits)) * static_cast<int64_t>(G);
  const int64_t split = blockIdx.x % static_cast<unsigned>(splits);
  if (threadIdx.x < G) {
    const int64_t c = c0 + threadIdx.x;
    shifts[threadIdx.x] = stats_shift<Acc>(N * S, [&](int j) { return to_acc(x[c * S + channel_value_offset(j, C, S)]); });
  }
  __syncthreads();
  const GroupedWalk w(S, G, V, split, splits);
  const Acc shift_a = shifts[w.active ? w.j : 0], shift_b = shifts[w.active && w.lo < V ? w.j + 1 : 0];
  WelfordState<Acc> a{0, Acc(0), Acc(0)}, b{0, Acc(0), Acc(0)};
  const auto load_shifted = [&](int64_t o, Acc(&vals)[V]) {
    load_acc<V>(x + o, vals);
#pragma unroll
    for (int i = 0; i < V; ++i) vals[i] -= i < w.lo ? shift_a : shift_b;
  };
  Acc v[K][V];
  w.rows<K>(
      N, C, S, c0, V, [&](int k, int64_t o) { load_shifted(o, v[k]); }, [&] { split_stats<K, V>(v, w.lo, a, b); },
      [&](int64_t o) {
        Acc one[1][V];
        load_shifted(o, one[0]);
        split_stats<1, V>(one, w.lo, a, b);
      });
  using D = WelfordState<double>;
  int g;
  const D s = w.merge(
      D{a.n, static_cast<double>(a.mean), static_cast<double>(a.m2)},
      D{b.n, static_cast<double>(b.mean), static_cast<double>(b.m2)}, S, G, V, shared,
      [](const D& p, const D& q) { return chan_merge(p, q); }, [](const D& p, int off) { return shfl_down(p, off); },
      g);
  if (g < G && threadIdx.x % 32 == 0) {
    const int64_t k = partial_index(split, c0 + g, splits);
    if (split == 0) ws_shift[c0 + g] = static_cast<double>(shifts[g]);
    ws_n[k] = s.n;
    ws_mean[k] = s.mean;
    ws_m2[k] = s.m2;
  }
}

// Rows a channels-last statistics thread loads before merging them (one block_stats group
// per channel, one Chan merge weight for the VC channels).
template <int VC> constexpr int kStatsClRows = VC >= 4 ? 4 : 8;

// Channels-last: thread (tx, ty) of block (bx, by) accumulates VC consecutive channels over
// rows r = ty + by * blockDim.y + k * gridDim.y * blockDim.y, kStatsClRows rows at a time
// (the rest one by one); the block then merges over ty in Acc (a double tree slowed
// half-precision forwards: DESIGN_NOTES.md) and stores the states in double.
// Dynamic shared memory: blockDim.y * (blockDim.x * VC * 2 Acc + 1 int64).
template <class T, int VC>
__global__ void __launch_bounds__(kThreads, VC > 1 && sizeof(T) != 4 ? 3 : 4)
    stats_cl_kernel(const T* __restrict__ x, int64_t M, int64_t C, double* __restrict__ ws_shift,
                    int64_t* __restrict__ ws_n, double* __restrict__ ws_mean, double* __restrict__ ws_m2) {
  using Acc = acc_t<T>;
  constexpr int R = kStatsClRows<VC>;
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
    const int64_t stride = static_cast<int64_t>(gridDim.y) * by;
    int64_t m = static_cast<int64_t>(blockIdx.y) * by + ty;
    for (; m + (R - 1) * stride < M; m += R * stride) {  // R rows: every load, then the merges
      Pack<T, VC> pk[R];
#pragma unroll
      for (int r = 0; r < R; ++r) pk[r] = *reinterpret_cast<const Pack<T, VC>*>(x + (m + r * stride) * C + c0);
      const ChanWeights<Acc> w = chan_weights<Acc>(n > 0 ? n : 1, R);
#pragma unroll
      for (int i = 0; i < VC; ++i) {
        Acc v[R], bmean, bm2;
#pragma unroll
        for (int r = 0; r < R; ++r) v[r] = to_acc(pk[r].v[i]) - shift[i];
        block_stats<R>(v, bmean, bm2);
        if (n == 0) {
          mean[i] = bmean;
          m2[i] = bm2;
        } else {
          chan_absorb(mean[i], m2[i], bmean, bm2, w);
        }
      }
      n += R;
    }
    for (; m < M; m += stride) {  // the last rows, one at a time (welford_add)
      Acc v[VC];
      load_acc<VC>(x + m * C + c0, v);
      const ChanWeights<Acc> w = chan_weights<Acc>(n > 0 ? n : 1, 1);
#pragma unroll
      for (int i = 0; i < VC; ++i) {
        const WelfordState<Acc> one = single_state(v[i] - shift[i]);
        if (n == 0) {
          mean[i] = one.mean;
          m2[i] = one.m2;
        } else {
          chan_absorb(mean[i], m2[i], one.mean, one.m2, w);
        }
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

// plan.h finalize_plan: `lanes` threads a channel; lane l merges partials l, l + lanes, ...
// in order (in double), then the lanes merge in a fixed tree (finalize_tree); the order
// depends on `splits` alone. The partials are of the values minus the channel's shift
// (ws_shift, stored by the partial kernel), added back here. Shared memory: kThreads states.
template <class Acc>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const double* __restrict__ ws_shift, const int64_t* __restrict__ ws_n,
                          const double* __restrict__ ws_mean, const double* __restrict__ ws_m2, int64_t splits,
                          int64_t C, int lanes, Acc eps, Acc* __restrict__ mean, Acc* __restrict__ var,
                          Acc* __restrict__ invstd, RunningStats<Acc> run) {
  FASTBN_SHARED_ARRAY(shared, kThreads, WelfordState<double>);
  const FinalizeLane fl(lanes);
  WelfordState<double> s{0, 0.0, 0.0};
  if (fl.c < C) {
    WelfordState<double> p[kFinalizeBatch];
    fl.walk(
        splits,
        [&](int64_t k, int j) {
          const int64_t i = partial_index(k, fl.c, splits);
          p[j] = WelfordState<double>{ws_n[i], ws_mean[i], ws_m2[i]};
        },
        [&](int j) { s = chan_merge(s, p[j]); });
  }
  s = finalize_tree(
      s, fl, shared, [](const WelfordState<double>& a, const WelfordState<double>& b) { return chan_merge(a, b); },
      [](const WelfordState<double>& a, int off) { return shfl_down(a, off); });
  if (fl.c >= C || fl.lane != 0) return;
  add_shift(s, ws_shift[fl.c]);
  finalize_stats(s, eps, mean, var, invstd, fl.c);
  update_running(run, fl.c, mean[fl.c], var[fl.c], s.n);
}

// Dynamic shared memory of stats_cl_kernel for a block of bx x by threads.
template <class T> size_t stats_cl_smem(int bx, int by, int vc) {
  return cl_reduce_smem(bx, by, vc, sizeof(acc_t<T>), /*counts=*/true);
}

// The statistics' partial kernel for shape sh, and the occupancy its split is sized for.
template <class T, class F> void with_stats_kernel(ReduceShape sh, F&& f) {
  if (sh.walk == Walk::grouped) return f(KernelC<&stats_grouped_kernel<T>>{}, size_t{0});
  with_vec<T>(sh.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (sh.walk == Walk::channels_last) {
      if constexpr (V == 1 || V == vec_width<T>()) f(KernelC<&stats_cl_kernel<T, V>>{}, stats_cl_smem<T>(1, kThreads, V));
    } else {
      f(KernelC<&stats_planar_kernel<T, V>>{}, size_t{0});
    }
  });
}

}  // namespace

size_t reduce_workspace_bytes(const Geometry& g, int elem_size, int sm_count) {
  return reduce_workspace_bound(g, elem_size, sm_count);  // statistics partials are double (sums: Acc, no larger)
}

template <class T>
cudaError_t launch_stats(const Geometry& g, const T* x, acc_t<T>* mean, acc_t<T>* var, acc_t<T>* invstd, double eps,
                         RunningStats<acc_t<T>> run, void* workspace, const LaunchEnv& env) {
  using Acc = acc_t<T>;
  const ReduceShape sh = reduce_shape(g, sizeof(T), pointer_alignment({x}));
  ReducePlan p{};
  with_stats_kernel<T>(sh, [&](auto kernel, size_t smem_bound) {
    p = reduce_plan(g, sh, env.sm_count, resident_blocks<decltype(kernel)::value>(env.device, smem_bound));
  });
  ReduceWorkspace<double> ws(workspace, p.splits, g.C);
  if (sh.walk == Walk::grouped) {
    FASTBN_LAUNCH(p.grid_x, kThreads, 0, env.stream, stats_grouped_kernel<T>)(
        x, g.N, g.C, static_cast<int>(g.S), sh.group, p.splits, ws.shift, ws.n, ws.a, ws.b);
  } else with_vec<T>(sh.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (sh.walk == Walk::channels_last) {
      if constexpr (V == 1 || V == vec_width<T>()) {
        FASTBN_LAUNCH(dim3(p.grid_x, p.grid_y), dim3(p.block_x, p.block_y),
                      stats_cl_smem<T>(p.block_x, p.block_y, V), env.stream, stats_cl_kernel<T, V>)(
            x, g.rows(), g.C, ws.shift, ws.n, ws.a, ws.b);
      }
    } else {
      FASTBN_LAUNCH(p.grid_x, kThreads, 0, env.stream, stats_planar_kernel<T, V>)(x, g.N, g.C, g.S, p.splits, ws.shift,
                                                                               ws.n, ws.a, ws.b);
    }
  });
  const FinalizePlan f = finalize_plan(g.C, p.splits);
  FASTBN_LAUNCH(f.blocks, kThreads, 0, env.stream, stats_finalize_kernel<Acc>)(
      ws.shift, ws.n, ws.a, ws.b, p.splits, g.C, f.lanes, static_cast<Acc>(eps), mean, var, invstd, run);
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
