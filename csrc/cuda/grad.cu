// Backward: per-channel sums (split reduction, fixed-order merge, no atomics) and the
// elementwise grad_input / grad_residual pass (planar, flat across planes, or channels-last,
// as in normalize.cu). dy_eff = bn_math.h effective_dy: dy, masked by the relu of the
// recomputed pre-activation when the forward had relu. The elementwise pass walks from the
// tensor's end, where the sums' pass ended (normalize.cu).
#include "common.cuh"

namespace fastbn {
namespace cuda {

namespace {

// The V values of dy, x and r at one offset as stored (16-bit values take half the registers
// of their float conversions), for loading several rows before using any.
template <class T, int V> struct RawOperands {
  Pack<T, V> g, v, r;
  __device__ __forceinline__ void load(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ rp,
                                       int64_t off) {
    g = *reinterpret_cast<const Pack<T, V>*>(dy + off);
    v = *reinterpret_cast<const Pack<T, V>*>(x + off);
    if (rp) r = *reinterpret_cast<const Pack<T, V>*>(rp + off);
  }
  // The values in the accumulation type; r's are 0 without a residual.
  __device__ __forceinline__ void to_acc(bool has_r, acc_t<T> (&go)[V], acc_t<T> (&vo)[V], acc_t<T> (&ro)[V]) const {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      go[i] = fastbn::to_acc(g.v[i]);
      vo[i] = fastbn::to_acc(v.v[i]);
      ro[i] = has_r ? fastbn::to_acc(r.v[i]) : acc_t<T>(0);
    }
  }
};

// The V values of dy, x and r (0 without r) at element offset off, converted as loaded (the
// planar tiles' registers fit their budgets this way, not through RawOperands).
template <int V, class T, class Acc>
__device__ __forceinline__ void load_grad_operands(const T* __restrict__ dy, const T* __restrict__ x,
                                                   const T* __restrict__ r, int64_t off, Acc (&g)[V], Acc (&v)[V],
                                                   Acc (&res)[V]) {
  load_acc<V>(dy + off, g);
  load_acc<V>(x + off, v);
  if (r) {
    load_acc<V>(r + off, res);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) res[i] = Acc(0);
  }
}

// Accumulates V loaded values: s1 += dy_eff, s2 += dy_eff * (x - mean).
template <int V, class Acc>
__device__ __forceinline__ void sums_add(const Acc (&g)[V], const Acc (&v)[V], const Acc (&res)[V], bool has_r,
                                         bool relu, const FwdCoef<Acc> (&k)[V], Acc (&s1)[V], Acc (&s2)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i)
    grad_sums_add(s1[i], s2[i], effective_dy(g[i], v[i], k[i], res[i], has_r, relu), v[i], k[i].mean);
}

// Loads and accumulates the V values at element offset off.
template <int V, class T, class Acc>
__device__ __forceinline__ void sums_vec(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                                         bool relu, const FwdCoef<Acc> (&k)[V], int64_t off, Acc (&s1)[V],
                                         Acc (&s2)[V]) {
  Acc g[V], v[V], res[V];
  load_grad_operands<V>(dy, x, r, off, g, v, res);
  sums_add<V>(g, v, res, r != nullptr, relu, k, s1, s2);
}

// Blocks an SM must hold (__launch_bounds__): register budgets without spills.
template <class T, int V> constexpr int kGradPlanarMinBlocks = sizeof(T) == 8 || V == 8 ? 2 : 4;

// Vectors of each tensor a thread of a planar backward-sum tile loads before using them.
template <int V> constexpr int kGradTileVecs = V >= 4 ? 2 : 8 / V;

// Planar: block b handles channel c = b / splits, split b % splits of its tiles (planar_tiles).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kGradPlanarMinBlocks<T, V>)
    grad_reduce_planar_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                              int64_t N, int64_t C, int64_t S, int64_t splits, ChannelStats<acc_t<T>> st,
                              Affine<acc_t<T>> af, acc_t<T>* __restrict__ ws_a, acc_t<T>* __restrict__ ws_b) {
  using Acc = acc_t<T>;
  constexpr int K = kGradTileVecs<V>;
  FASTBN_SHARED_ARRAY(shared, 2 * (kThreads / 32), Acc);
  const int64_t c = blockIdx.x / static_cast<unsigned>(splits);  // 32-bit: splits <= kMaxGridY
  const int64_t split = blockIdx.x % static_cast<unsigned>(splits);
  const FwdCoef<Acc> k1 = forward_coef(st, af, c);
  FwdCoef<Acc> k[V];
  Acc s1[V], s2[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    k[i] = k1;
    s1[i] = s2[i] = Acc(0);
  }
  Acc g[K][V], v[K][V], res[K][V];  // a whole tile's values: every load first, then the sums
  planar_tiles<V, K>(
      N, C, S, c, split, splits,
      [&](int j, int64_t o) { load_grad_operands<V>(dy, x, r, o, g[j], v[j], res[j]); },
      [&] {
#pragma unroll
        for (int j = 0; j < K; ++j) sums_add<V>(g[j], v[j], res[j], r != nullptr, relu, k, s1, s2);
      },
      [&](int64_t o) { sums_vec<V>(dy, x, r, relu, k, o, s1, s2); });
  Acc a = 0, b = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    a += s1[i];
    b += s2[i];
  }
  block_sum2(a, b, shared);
  if (flat_tid() == 0) {
    ws_a[partial_index(split, c, splits)] = a;
    ws_b[partial_index(split, c, splits)] = b;
  }
}

// Grouped planar (plan.h Walk::grouped, common.cuh GroupedWalk): block b handles channels
// (b / splits) * G ... + G - 1, split b % splits of their rows; a thread sums for the two
// channels its vector covers, kGroupedGradRows vectors of each tensor loaded at a time.
template <int V> constexpr int kGroupedGradRows = V >= 8 ? 1 : 8 / V;

template <class T>
__global__ void __launch_bounds__(kThreads, 2)
    grad_reduce_grouped_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                               int64_t N, int64_t C, int S, int G, int64_t splits, ChannelStats<acc_t<T>> st,
                               Affine<acc_t<T>> af, acc_t<T>* __restrict__ ws_a, acc_t<T>* __restrict__ ws_b) {
  using Acc = acc_t<T>;
  constexpr int V = static_cast<int>(16 / sizeof(T));  // 16-byte vectors
  constexpr int K = kGroupedGradRows<V>;
  struct Sums {
    Acc a, b;
  };
  FASTBN_SHARED_ARRAY(shared, 2 * kThreads, Sums);
  const int64_t c0 = (blockIdx.x / static_cast<unsigned>(splits)) * static_cast<int64_t>(G);
  const int64_t split = blockIdx.x % static_cast<unsigned>(splits);
  const GroupedWalk w(S, G, V, split, splits);
  const int ja = w.active ? w.j : 0, jb = w.active && w.lo < V ? w.j + 1 : ja;
  const FwdCoef<Acc> ka = forward_coef(st, af, c0 + ja), kb = forward_coef(st, af, c0 + jb);
  Sums sa{Acc(0), Acc(0)}, sb{Acc(0), Acc(0)};
  const auto add = [&](const Acc(&gv)[V], const Acc(&xv)[V], const Acc(&rv)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (i < w.lo)
        grad_sums_add(sa.a, sa.b, effective_dy(gv[i], xv[i], ka, rv[i], r != nullptr, relu), xv[i], ka.mean);
      else
        grad_sums_add(sb.a, sb.b, effective_dy(gv[i], xv[i], kb, rv[i], r != nullptr, relu), xv[i], kb.mean);
    }
  };
  Acc g[K][V], v[K][V], res[K][V];  // a whole tile's values: every load first, then the sums
  w.rows<K>(
      N, C, S, c0, V, [&](int k, int64_t o) { load_grad_operands<V>(dy, x, r, o, g[k], v[k], res[k]); },
      [&] {
#pragma unroll
        for (int k = 0; k < K; ++k) add(g[k], v[k], res[k]);
      },
      [&](int64_t o) {
        Acc g1[V], v1[V], r1[V];
        load_grad_operands<V>(dy, x, r, o, g1, v1, r1);
        add(g1, v1, r1);
      });
  int ch;
  const Sums s = w.merge(
      sa, sb, S, G, V, shared, [](const Sums& p, const Sums& q) { return Sums{p.a + q.a, p.b + q.b}; },
      [](const Sums& p, int off) {
        return Sums{__shfl_down_sync(0xffffffffu, p.a, off), __shfl_down_sync(0xffffffffu, p.b, off)};
      },
      ch);
  if (ch < G && threadIdx.x % 32 == 0) {
    ws_a[partial_index(split, c0 + ch, splits)] = s.a;
    ws_b[partial_index(split, c0 + ch, splits)] = s.b;
  }
}

// Dynamic shared memory: blockDim.y * blockDim.x * VC * 2 Acc.
template <class T, int VC>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 2 && VC > 1 ? 2 : 4)
    grad_reduce_cl_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                          int64_t M, int64_t C, ChannelStats<acc_t<T>> st, Affine<acc_t<T>> af,
                          acc_t<T>* __restrict__ ws_a, acc_t<T>* __restrict__ ws_b) {
  using Acc = acc_t<T>;
  FASTBN_DYNAMIC_SHARED(smem);
  const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int width = bx * VC;
  Acc* sa = reinterpret_cast<Acc*>(smem);
  Acc* sb = sa + by * width;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * bx + tx) * VC;
  Acc s1[VC], s2[VC];
#pragma unroll
  for (int i = 0; i < VC; ++i) s1[i] = s2[i] = Acc(0);
  if (c0 < C) {
    FwdCoef<Acc> k[VC];
#pragma unroll
    for (int i = 0; i < VC; ++i) k[i] = forward_coef(st, af, c0 + i);
    const int64_t stride = static_cast<int64_t>(gridDim.y) * by;
    int64_t m = static_cast<int64_t>(blockIdx.y) * by + ty;
    for (; m + stride < M; m += 2 * stride) {  // two rows: every load (as stored), then the sums
      RawOperands<T, VC> raw[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) raw[h].load(dy, x, r, (m + h * stride) * C + c0);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        Acc g[VC], v[VC], res[VC];
        raw[h].to_acc(r != nullptr, g, v, res);
        sums_add<VC>(g, v, res, r != nullptr, relu, k, s1, s2);
      }
    }
    if (m < M) sums_vec<VC>(dy, x, r, relu, k, m * C + c0, s1, s2);
  }
#pragma unroll
  for (int i = 0; i < VC; ++i) {
    sa[ty * width + tx * VC + i] = s1[i];
    sb[ty * width + tx * VC + i] = s2[i];
  }
  __syncthreads();
  for (int stride = by / 2; stride > 0; stride /= 2) {
    if (ty < stride) {
#pragma unroll
      for (int i = 0; i < VC; ++i) {
        const int j = tx * VC + i;
        sa[ty * width + j] += sa[(ty + stride) * width + j];
        sb[ty * width + j] += sb[(ty + stride) * width + j];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && c0 < C) {
#pragma unroll
    for (int i = 0; i < VC; ++i) {
      const int64_t kidx = partial_index(blockIdx.y, c0 + i, gridDim.y);
      ws_a[kidx] = sa[tx * VC + i];
      ws_b[kidx] = sb[tx * VC + i];
    }
  }
}

// plan.h finalize_plan: `lanes` threads a channel; lane l sums partials l, l + lanes, ... in
// order (in double), then the lanes add in a fixed tree (finalize_tree); sum_dy_xhat is
// scaled by invstd. Shared memory: kThreads pairs of doubles.
template <class Acc>
__global__ void __launch_bounds__(kThreads)
    grad_finalize_kernel(const Acc* __restrict__ ws_a, const Acc* __restrict__ ws_b, int64_t splits, int64_t C,
                         int lanes, ChannelStats<Acc> st, Acc* __restrict__ sum_dy, Acc* __restrict__ sum_dy_xhat) {
  struct Sums {
    double a, b;
  };
  FASTBN_SHARED_ARRAY(shared, kThreads, Sums);
  const FinalizeLane fl(lanes);
  Sums s{0.0, 0.0};
  if (fl.c < C) {
    Acc pa[kFinalizeBatch], pb[kFinalizeBatch];
    fl.walk(
        splits,
        [&](int64_t k, int j) {
          const int64_t i = partial_index(k, fl.c, splits);
          pa[j] = ws_a[i];
          pb[j] = ws_b[i];
        },
        [&](int j) {
          s.a += static_cast<double>(pa[j]);
          s.b += static_cast<double>(pb[j]);
        });
  }
  s = finalize_tree(
      s, fl, shared, [](const Sums& x, const Sums& y) { return Sums{x.a + y.a, x.b + y.b}; },
      [](const Sums& x, int off) {
        return Sums{__shfl_down_sync(0xffffffffu, x.a, off), __shfl_down_sync(0xffffffffu, x.b, off)};
      });
  if (fl.c < C && fl.lane == 0) finalize_grad_sums(s.a, s.b, st, fl.c, sum_dy, sum_dy_xhat);
}

// dx = grad_input(dy_eff) (A * dy_eff + Bm * (x - mean) + D in training, A * dy_eff in
// evaluation); dr = dy_eff. fk(i), bk(i): the forward and backward coefficients of value i.
// The same for values already loaded (g: dy, v: x, res: r), stored at off.
template <int V, class T, class FK, class BK>
__device__ __forceinline__ void grad_values(acc_t<T> (&g)[V], acc_t<T> (&v)[V], const acc_t<T> (&res)[V], bool has_r,
                                            bool relu, const FK& fk, const BK& bk, int64_t off, T* __restrict__ dx,
                                            T* __restrict__ dr) {
#pragma unroll
  for (int i = 0; i < V; ++i) g[i] = effective_dy(g[i], v[i], fk(i), res[i], has_r, relu);
  if (dr) store_acc<V>(dr + off, g);
  if (dx) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = grad_input(g[i], v[i], bk(i));
    store_acc<V>(dx + off, v);
  }
}
template <int V, class T, class FK, class BK>
__device__ __forceinline__ void grad_vec(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                                         bool relu, const FK& fk, const BK& bk, int64_t off, T* __restrict__ dx,
                                         T* __restrict__ dr) {
  using Acc = acc_t<T>;
  Acc g[V], v[V], res[V];
  load_grad_operands<V>(dy, x, r, off, g, v, res);
  grad_values<V, T>(g, v, res, r != nullptr, relu, fk, bk, off, dx, dr);
}

template <class Acc> struct GradArgs {
  ChannelStats<Acc> st;
  Affine<Acc> af;
  const Acc* sum_dy;
  const Acc* sum_dy_xhat;
  int64_t count;
  const int64_t* device_count;  // when not null, the count is read there
  bool training;
  __device__ __forceinline__ BwdCoef<Acc> coef(int64_t c) const {
    return backward_coef(st, af, c, training, sum_dy ? sum_dy[c] : Acc(0), sum_dy_xhat ? sum_dy_xhat[c] : Acc(0),
                         device_count ? *device_count : count);
  }
};

template <class T, int V>
__global__ void __launch_bounds__(kThreads, 4)
    grad_input_planar_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                             int64_t planes, int64_t C, int64_t S, GradArgs<acc_t<T>> ga, T* __restrict__ dx,
                             T* __restrict__ dr) {
  using Acc = acc_t<T>;
  for (int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < planes;
       p += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t q = planes - 1 - p;  // last plane first (see the file comment)
    const int64_t c = q % C;
    const FwdCoef<Acc> k = forward_coef(ga.st, ga.af, c);
    const BwdCoef<Acc> gk = ga.coef(c);
    const int64_t base = q * S;
    for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; s < S;
         s += static_cast<int64_t>(gridDim.x) * blockDim.x * V)
      grad_vec<V>(dy, x, r, relu, [&](int) { return k; }, [&](int) { return gk; }, base + s, dx, dr);
  }
}

// Flat (as normalize_flat_kernel): vectors of V values over the (N, C, S) tensor seen as
// numel values; a vector crossing into the next plane takes its coefficients there.
template <class T, int V>
__global__ void __launch_bounds__(kThreads, 4)
    grad_input_flat_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                           int64_t numel, int64_t C, int64_t S, GradArgs<acc_t<T>> ga, T* __restrict__ dx,
                           T* __restrict__ dr) {
  using Acc = acc_t<T>;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * V) {
    const int64_t o = numel - V - i;  // last vector first
    const FlatPos pos(o, C, S);
    const int64_t c1 = pos.next(C, V);
    const FwdCoef<Acc> k0 = forward_coef(ga.st, ga.af, pos.c), k1 = forward_coef(ga.st, ga.af, c1);
    const BwdCoef<Acc> g0 = ga.coef(pos.c), g1 = ga.coef(c1);
    grad_vec<V>(
        dy, x, r, relu, [&](int j) { return j < pos.rest ? k0 : k1; }, [&](int j) { return j < pos.rest ? g0 : g1; },
        o, dx, dr);
  }
}

template <class T, int VC>
__global__ void __launch_bounds__(kThreads, 4)
    grad_input_cl_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                         int64_t M, int64_t C, GradArgs<acc_t<T>> ga, T* __restrict__ dx, T* __restrict__ dr) {
  using Acc = acc_t<T>;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VC;
  if (c0 >= C) return;
  FwdCoef<Acc> k[VC];
  BwdCoef<Acc> gk[VC];
#pragma unroll
  for (int i = 0; i < VC; ++i) {
    k[i] = forward_coef(ga.st, ga.af, c0 + i);
    gk[i] = ga.coef(c0 + i);
  }
  const auto fk = [&](int i) { return k[i]; };
  const auto bk = [&](int i) { return gk[i]; };
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  // Two rows at a time for 8-byte vectors (both rows' loads, as stored, before either's
  // stores); one for 16-byte ones, whose two rows would not fit in 64 registers.
  constexpr bool kTwoRows = VC > 1 && VC * sizeof(T) <= 8;
  for (; kTwoRows && m + stride < M; m += 2 * stride) {
    RawOperands<T, VC> raw[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) raw[h].load(dy, x, r, (M - 1 - m - h * stride) * C + c0);  // last row first
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Acc g[VC], v[VC], res[VC];
      raw[h].to_acc(r != nullptr, g, v, res);
      grad_values<VC, T>(g, v, res, r != nullptr, relu, fk, bk, (M - 1 - m - h * stride) * C + c0, dx, dr);
    }
  }
  for (; m < M; m += stride) grad_vec<VC>(dy, x, r, relu, fk, bk, (M - 1 - m) * C + c0, dx, dr);
}

// Dynamic shared memory of grad_reduce_cl_kernel for a block of bx x by threads.
template <class T> size_t grad_cl_smem(int bx, int by, int vc) {
  return cl_reduce_smem(bx, by, vc, sizeof(acc_t<T>), /*counts=*/false);
}

// The backward sums' partial kernel for shape sh, and the shared memory its occupancy is
// queried with (as with_stats_kernel).
template <class T, class F> void with_grad_kernel(ReduceShape sh, F&& f) {
  if (sh.walk == Walk::grouped) return f(KernelC<&grad_reduce_grouped_kernel<T>>{}, size_t{0});
  with_vec<T>(sh.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (sh.walk == Walk::channels_last) {
      if constexpr (V == 1 || V == vec_width<T>()) f(KernelC<&grad_reduce_cl_kernel<T, V>>{}, grad_cl_smem<T>(1, kThreads, V));
    } else {
      f(KernelC<&grad_reduce_planar_kernel<T, V>>{}, size_t{0});
    }
  });
}

}  // namespace

template <class T>
cudaError_t launch_grad_reduce(const Geometry& g, const T* dy, const T* x, ChannelStats<acc_t<T>> st,
                               Affine<acc_t<T>> af, const T* r, bool relu, acc_t<T>* sum_dy, acc_t<T>* sum_dy_xhat,
                               void* workspace, const LaunchEnv& env) {
  using Acc = acc_t<T>;
  const ReduceShape sh = reduce_shape(g, sizeof(T), pointer_alignment({dy, x, r}));
  ReducePlan p{};
  with_grad_kernel<T>(sh, [&](auto kernel, size_t smem_bound) {
    p = reduce_plan(g, sh, env.sm_count, resident_blocks<decltype(kernel)::value>(env.device, smem_bound));
  });
  ReduceWorkspace<Acc> ws(workspace, p.splits, g.C);
  if (sh.walk == Walk::grouped) {
    FASTBN_LAUNCH(p.grid_x, kThreads, 0, env.stream, grad_reduce_grouped_kernel<T>)(
        dy, x, r, relu, g.N, g.C, static_cast<int>(g.S), sh.group, p.splits, st, af, ws.a, ws.b);
  } else with_vec<T>(sh.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (sh.walk == Walk::channels_last) {
      if constexpr (V == 1 || V == vec_width<T>())
        FASTBN_LAUNCH(dim3(p.grid_x, p.grid_y), dim3(p.block_x, p.block_y), grad_cl_smem<T>(p.block_x, p.block_y, V),
                      env.stream, grad_reduce_cl_kernel<T, V>)(dy, x, r, relu, g.rows(), g.C, st, af, ws.a, ws.b);
    } else {
      FASTBN_LAUNCH(p.grid_x, kThreads, 0, env.stream, grad_reduce_planar_kernel<T, V>)(
          dy, x, r, relu, g.N, g.C, g.S, p.splits, st, af, ws.a, ws.b);
    }
  });
  const FinalizePlan f = finalize_plan(g.C, p.splits);
  FASTBN_LAUNCH(f.blocks, kThreads, 0, env.stream, grad_finalize_kernel<Acc>)(ws.a, ws.b, p.splits, g.C, f.lanes, st,
                                                                             sum_dy, sum_dy_xhat);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_grad_input(const Geometry& g, const T* dy, const T* x, ChannelStats<acc_t<T>> st,
                              Affine<acc_t<T>> af, const T* r, bool relu, bool training, const acc_t<T>* sum_dy,
                              const acc_t<T>* sum_dy_xhat, int64_t count, const int64_t* device_count, T* dx, T* dr,
                              const LaunchEnv& env) {
  const GradArgs<acc_t<T>> ga{st, af, sum_dy, sum_dy_xhat, count, device_count, training};
  const ElemPlan p = elementwise_plan(g, sizeof(T), pointer_alignment({dy, x, r, dx, dr}), env.sm_count);
  const dim3 grid(p.grid_x, p.grid_y), block(p.block_x, p.block_y);
  with_vec<T>(p.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (p.walk == Walk::channels_last) {
      if constexpr (V == 1 || V == cl_elem_vec(sizeof(T)))
        FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_cl_kernel<T, V>)(dy, x, r, relu, g.rows(), g.C, ga, dx,
                                                                             dr);
    } else if (p.walk == Walk::flat) {
      if constexpr (V == vec_width<T>())
        FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_flat_kernel<T, V>)(dy, x, r, relu, g.numel(), g.C, g.S,
                                                                               ga, dx, dr);
    } else {
      if constexpr (V == 1 || V == vec_width<T>())
        FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_planar_kernel<T, V>)(dy, x, r, relu, g.N * g.C, g.C,
                                                                                 g.S, ga, dx, dr);
    }
  });
  return cudaGetLastError();
}

#define FASTBN_INSTANTIATE_GRAD(T)                                                                                \
  template cudaError_t launch_grad_reduce<T>(const Geometry&, const T*, const T*, ChannelStats<acc_t<T>>,          \
                                             Affine<acc_t<T>>, const T*, bool, acc_t<T>*, acc_t<T>*, void*,        \
                                             const LaunchEnv&);                                                    \
  template cudaError_t launch_grad_input<T>(const Geometry&, const T*, const T*, ChannelStats<acc_t<T>>,           \
                                            Affine<acc_t<T>>, const T*, bool, bool, const acc_t<T>*,               \
                                            const acc_t<T>*, int64_t, const int64_t*, T*, T*, const LaunchEnv&);
FASTBN_INSTANTIATE_GRAD(float)
FASTBN_INSTANTIATE_GRAD(double)
FASTBN_INSTANTIATE_GRAD(f16)
FASTBN_INSTANTIATE_GRAD(bf16)

}  // namespace cuda
}  // namespace fastbn
