// Backward: per-channel sums (split reduction, fixed-order merge, no atomics) and the
// elementwise grad_input / grad_residual pass (planar, flat across planes, or channels-last,
// as in normalize.cu). dy_eff = bn_math.h effective_dy: dy, masked by the relu of the
// recomputed pre-activation when the forward had relu.
#include "common.cuh"

namespace fastbn {
namespace cuda {

namespace {

template <int V, class T, class Acc> __device__ __forceinline__ void load_residual(const T* r, int64_t off, Acc (&res)[V]) {
  if (r) {
    load_acc<V>(r + off, res);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) res[i] = Acc(0);
  }
}

// The V values of dy, x and r (0 without r) at element offset off.
template <int V, class T, class Acc>
__device__ __forceinline__ void load_grad_operands(const T* __restrict__ dy, const T* __restrict__ x,
                                                   const T* __restrict__ r, int64_t off, Acc (&g)[V], Acc (&v)[V],
                                                   Acc (&res)[V]) {
  load_acc<V>(dy + off, g);
  load_acc<V>(x + off, v);
  load_residual<V>(r, off, res);
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

// Vectors of each tensor a thread of a planar backward-sum tile loads before using them.
template <int V> constexpr int kGradTileVecs = V >= 4 ? 2 : 8 / V;

// Planar: block b handles channel c = b / splits, split b % splits of its tiles (planar_tiles).
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_reduce_planar_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                              int64_t N, int64_t C, int64_t S, int64_t splits, ChannelStats<acc_t<T>> st,
                              Affine<acc_t<T>> af, acc_t<T>* __restrict__ ws_a, acc_t<T>* __restrict__ ws_b) {
  using Acc = acc_t<T>;
  constexpr int K = kGradTileVecs<V>;
  FASTBN_SHARED_ARRAY(shared, 2 * (kThreads / 32), Acc);
  const int64_t c = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
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

// Dynamic shared memory: blockDim.y * blockDim.x * VC * 2 Acc.
template <class T, int VC>
__global__ void __launch_bounds__(kThreads)
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
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * by + ty; m < M; m += static_cast<int64_t>(gridDim.y) * by)
      sums_vec<VC>(dy, x, r, relu, k, m * C + c0, s1, s2);
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

// A warp per channel (threadIdx.y): lane l sums partials l, l + 32, ... in order (in double;
// kFinalizeBatch of them loaded at a time), then the lanes add in a fixed shuffle tree;
// sum_dy_xhat is scaled by invstd.
template <class Acc>
__global__ void grad_finalize_kernel(const Acc* __restrict__ ws_a, const Acc* __restrict__ ws_b, int64_t splits,
                                     int64_t C, ChannelStats<Acc> st, Acc* __restrict__ sum_dy,
                                     Acc* __restrict__ sum_dy_xhat) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // the whole warp
  double a = 0, b = 0;
  for (int64_t k0 = threadIdx.x; k0 < splits; k0 += 32 * kFinalizeBatch) {
    // All loads first (unconditional: past the last split the index is clamped and the
    // value dropped below), so that they overlap; then the sums in order.
    Acc pa[kFinalizeBatch], pb[kFinalizeBatch];
#pragma unroll
    for (int j = 0; j < kFinalizeBatch; ++j) {
      const int64_t i = partial_index(min(k0 + 32 * j, splits - 1), c, splits);
      pa[j] = ws_a[i];
      pb[j] = ws_b[i];
    }
#pragma unroll
    for (int j = 0; j < kFinalizeBatch; ++j) {
      if (k0 + 32 * j < splits) {
        a += static_cast<double>(pa[j]);
        b += static_cast<double>(pb[j]);
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  if (threadIdx.x == 0) finalize_grad_sums(a, b, st, c, sum_dy, sum_dy_xhat);
}

// dx = grad_input(dy_eff) (A * dy_eff + Bm * (x - mean) + D in training, A * dy_eff in
// evaluation); dr = dy_eff.
template <int V, class T, class Acc>
__device__ __forceinline__ void grad_vec(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r,
                                         bool relu, const FwdCoef<Acc> (&k)[V], const BwdCoef<Acc> (&gk)[V],
                                         int64_t off, T* __restrict__ dx, T* __restrict__ dr) {
  Acc g[V], v[V], res[V];
  load_grad_operands<V>(dy, x, r, off, g, v, res);
#pragma unroll
  for (int i = 0; i < V; ++i) g[i] = effective_dy(g[i], v[i], k[i], res[i], r != nullptr, relu);
  if (dr) store_acc<V>(dr + off, g);
  if (dx) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = grad_input(g[i], v[i], gk[i]);
    store_acc<V>(dx + off, v);
  }
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
__global__ void __launch_bounds__(kThreads)
    grad_input_planar_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                             int64_t planes, int64_t C, int64_t S, GradArgs<acc_t<T>> ga, T* __restrict__ dx,
                             T* __restrict__ dr) {
  using Acc = acc_t<T>;
  for (int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < planes;
       p += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t c = p % C;
    const FwdCoef<Acc> k1 = forward_coef(ga.st, ga.af, c);
    const BwdCoef<Acc> g1 = ga.coef(c);
    FwdCoef<Acc> k[V];
    BwdCoef<Acc> gk[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      k[i] = k1;
      gk[i] = g1;
    }
    const int64_t base = p * S;
    for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; s < S;
         s += static_cast<int64_t>(gridDim.x) * blockDim.x * V)
      grad_vec<V>(dy, x, r, relu, k, gk, base + s, dx, dr);
  }
}

// Flat (as normalize_flat_kernel): vectors of V values over the (N, C, S) tensor seen as
// numel values; a vector crossing into the next plane takes its coefficients there.
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    grad_input_flat_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ r, bool relu,
                           int64_t numel, int64_t C, int64_t S, GradArgs<acc_t<T>> ga, T* __restrict__ dx,
                           T* __restrict__ dr) {
  using Acc = acc_t<T>;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * V) {
    struct Coefs {
      FwdCoef<Acc> f;
      BwdCoef<Acc> b;
    };
    Coefs both[V];  // one FlatPos::coefs call: one branch for both coefficient sets
    FlatPos(i, C, S).coefs(C, [&](int64_t c) { return Coefs{forward_coef(ga.st, ga.af, c), ga.coef(c)}; }, both);
    FwdCoef<Acc> k[V];
    BwdCoef<Acc> gk[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      k[j] = both[j].f;
      gk[j] = both[j].b;
    }
    grad_vec<V>(dy, x, r, relu, k, gk, i, dx, dr);
  }
}

template <class T, int VC>
__global__ void __launch_bounds__(kThreads)
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
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < M;
       m += static_cast<int64_t>(gridDim.y) * blockDim.y)
    grad_vec<VC>(dy, x, r, relu, k, gk, m * C + c0, dx, dr);
}

}  // namespace

template <class T>
cudaError_t launch_grad_reduce(const Geometry& g, const T* dy, const T* x, ChannelStats<acc_t<T>> st,
                               Affine<acc_t<T>> af, const T* r, bool relu, acc_t<T>* sum_dy, acc_t<T>* sum_dy_xhat,
                               void* workspace, const LaunchEnv& env) {
  using Acc = acc_t<T>;
  constexpr int V = vec_width<T>();
  const bool aligned = aligned16(dy) && aligned16(x) && aligned16(r);
  int64_t splits;
  if (g.channels_last) {
    const bool vec = g.C % V == 0 && aligned;
    splits = reduction_splits(g, env.sm_count, vec ? V : 1);
    ReduceWorkspace<Acc> ws(workspace, splits, g.C);
    const ClBlock blk(g.C, vec ? V : 1);
    const dim3 grid(static_cast<unsigned>(blk.grid_x), static_cast<unsigned>(splits)), block(blk.bx, blk.by);
    const size_t smem = static_cast<size_t>(blk.by) * blk.bx * (vec ? V : 1) * 2 * sizeof(Acc);
    if (vec)
      FASTBN_LAUNCH(grid, block, smem, env.stream, grad_reduce_cl_kernel<T, V>)(dy, x, r, relu, g.rows(), g.C, st, af,
                                                                                ws.a, ws.b);
    else
      FASTBN_LAUNCH(grid, block, smem, env.stream, grad_reduce_cl_kernel<T, 1>)(dy, x, r, relu, g.rows(), g.C, st, af,
                                                                                ws.a, ws.b);
  } else {
    splits = reduction_splits(g, env.sm_count, 1);
    ReduceWorkspace<Acc> ws(workspace, splits, g.C);
    with_vec<T>(planar_reduce_vec<T>(g.S, {dy, x, r}), [&](auto v) {
      FASTBN_LAUNCH(static_cast<unsigned>(g.C * splits), kThreads, 0, env.stream,
                    grad_reduce_planar_kernel<T, decltype(v)::value>)(dy, x, r, relu, g.N, g.C, g.S, splits, st, af,
                                                                     ws.a, ws.b);
    });
  }
  ReduceWorkspace<Acc> ws(workspace, splits, g.C);
  FASTBN_LAUNCH(static_cast<unsigned>(ceil_div(g.C, kFinalizeChannels)), dim3(32, kFinalizeChannels), 0, env.stream,
                grad_finalize_kernel<Acc>)(
      ws.a, ws.b, splits, g.C, st, sum_dy, sum_dy_xhat);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_grad_input(const Geometry& g, const T* dy, const T* x, ChannelStats<acc_t<T>> st,
                              Affine<acc_t<T>> af, const T* r, bool relu, bool training, const acc_t<T>* sum_dy,
                              const acc_t<T>* sum_dy_xhat, int64_t count, const int64_t* device_count, T* dx, T* dr,
                              const LaunchEnv& env) {
  constexpr int V = vec_width<T>();
  const GradArgs<acc_t<T>> ga{st, af, sum_dy, sum_dy_xhat, count, device_count, training};
  const bool aligned = aligned16(dy) && aligned16(x) && aligned16(r) && aligned16(dx) && aligned16(dr);
  if (g.channels_last) {
    const bool vec = g.C % V == 0 && aligned;
    const ClBlock blk(g.C, vec ? V : 1);
    const int64_t gy = elementwise_grid_y(g.rows(), blk.by, blk.grid_x, env.sm_count);
    const dim3 grid(static_cast<unsigned>(blk.grid_x), static_cast<unsigned>(gy)), block(blk.bx, blk.by);
    if (vec)
      FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_cl_kernel<T, V>)(dy, x, r, relu, g.rows(), g.C, ga, dx, dr);
    else
      FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_cl_kernel<T, 1>)(dy, x, r, relu, g.rows(), g.C, ga, dx, dr);
  } else if (const int64_t numel = g.N * g.C * g.S; use_flat<T>(g.S, numel, aligned)) {
    FASTBN_LAUNCH(flat_blocks(numel, V, env.sm_count), kThreads, 0, env.stream, grad_input_flat_kernel<T, V>)(
        dy, x, r, relu, numel, g.C, g.S, ga, dx, dr);
  } else {
    const bool vec = g.S % V == 0 && aligned;
    const PlanarBlock blk(g.N * g.C, g.S, vec ? V : 1, env.sm_count);
    const dim3 grid(static_cast<unsigned>(blk.grid_x), static_cast<unsigned>(blk.grid_y)), block(blk.bx, blk.by);
    if (vec)
      FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_planar_kernel<T, V>)(dy, x, r, relu, g.N * g.C, g.C, g.S, ga,
                                                                               dx, dr);
    else
      FASTBN_LAUNCH(grid, block, 0, env.stream, grad_input_planar_kernel<T, 1>)(dy, x, r, relu, g.N * g.C, g.C, g.S, ga,
                                                                               dx, dr);
  }
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
