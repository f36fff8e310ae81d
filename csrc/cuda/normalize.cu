// Elementwise normalisation: y = (x - mean) * a + b [+ r] [relu], a = invstd * w.
// Planar: thread (tx, ty) handles positions of plane ty (one channel: its coefficients are
// computed once per plane), V values a thread; planes whose size is not a multiple of the
// vector width take the flat kernel (16-byte vectors across plane boundaries).
// Channels-last: thread tx owns VC channels (coefficients computed once) and walks
// its rows (grid-strided), two at a time.
// Every walk goes from the tensor's end to its start (last plane, vector or row first), so
// that it does not start by evicting what the statistics pass read last (LRU): channels-last,
// that pass ends on the last rows, where this walk starts; planar, it ends on the last
// channels of every image, which this walk reaches in part first (DESIGN_NOTES.md).
#include "common.cuh"

namespace fastbn {
namespace cuda {

namespace {

// v = forward_value(v) in place; res is read only when has_res; fk(i): value i's coefficients.
template <int V, class Acc, class FK>
__device__ __forceinline__ void affine_values(Acc (&v)[V], const Acc (&res)[V], bool has_res, bool relu, const FK& fk) {
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = forward_value(v[i], fk(i), has_res ? res[i] : Acc(0), has_res, relu);
}

template <int V, class T, class FK>
__device__ __forceinline__ void affine_vec(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ r,
                                           bool relu, const FK& fk, int64_t off) {
  using Acc = acc_t<T>;
  Acc v[V];
  load_acc<V>(x + off, v);
  Acc res[V];
  if (r) load_acc<V>(r + off, res);
  affine_values<V>(v, res, r != nullptr, relu, fk);
  store_acc<V>(y + off, v);
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads, 4)
    normalize_planar_kernel(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ r, bool relu,
                            int64_t planes, int64_t C, int64_t S, ChannelStats<acc_t<T>> st, Affine<acc_t<T>> af) {
  using Acc = acc_t<T>;
  for (int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < planes;
       p += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t q = planes - 1 - p;  // last plane first (see the file comment)
    const FwdCoef<Acc> k = forward_coef(st, af, q % C);
    const int64_t base = q * S;
    for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; s < S;
         s += static_cast<int64_t>(gridDim.x) * blockDim.x * V) {
      affine_vec<V>(x, y, r, relu, [&](int) { return k; }, base + s);
    }
  }
}

// Flat: thread t handles vectors t, t + gridDim.x * blockDim.x, ... of the (N, C, S) tensor
// seen as numel values (numel a multiple of V, S >= V); a vector that crosses into the next
// plane takes that plane's coefficients for its last values (FlatPos).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, 4)
    normalize_flat_kernel(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ r, bool relu,
                          int64_t numel, int64_t C, int64_t S, ChannelStats<acc_t<T>> st, Affine<acc_t<T>> af) {
  using Acc = acc_t<T>;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * V) {
    const int64_t o = numel - V - i;  // last vector first
    const FlatPos pos(o, C, S);
    const FwdCoef<Acc> k0 = forward_coef(st, af, pos.c), k1 = forward_coef(st, af, pos.next(C, V));
    affine_vec<V>(x, y, r, relu, [&](int j) { return j < pos.rest ? k0 : k1; }, o);
  }
}

template <class T, int VC>
__global__ void __launch_bounds__(kThreads, 4)
    normalize_cl_kernel(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ r, bool relu, int64_t M,
                        int64_t C, ChannelStats<acc_t<T>> st, Affine<acc_t<T>> af) {
  using Acc = acc_t<T>;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VC;
  if (c0 >= C) return;
  FwdCoef<Acc> k[VC];
#pragma unroll
  for (int i = 0; i < VC; ++i) k[i] = forward_coef(st, af, c0 + i);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  for (; m + stride < M; m += 2 * stride) {  // two rows: both loads before either store
    Acc v0[VC], v1[VC], r0[VC], r1[VC];
    const int64_t o0 = (M - 1 - m) * C + c0, o1 = (M - 1 - m - stride) * C + c0;  // last row first
    load_acc<VC>(x + o0, v0);
    load_acc<VC>(x + o1, v1);
    if (r) {
      load_acc<VC>(r + o0, r0);
      load_acc<VC>(r + o1, r1);
    }
    const auto fk = [&](int i) { return k[i]; };
    affine_values<VC>(v0, r0, r != nullptr, relu, fk);
    affine_values<VC>(v1, r1, r != nullptr, relu, fk);
    store_acc<VC>(y + o0, v0);
    store_acc<VC>(y + o1, v1);
  }
  if (m < M) affine_vec<VC>(x, y, r, relu, [&](int i) { return k[i]; }, (M - 1 - m) * C + c0);
}

}  // namespace

template <class T>
cudaError_t launch_normalize(const Geometry& g, const T* x, T* y, ChannelStats<acc_t<T>> st, Affine<acc_t<T>> af,
                             const T* r, bool relu, const LaunchEnv& env) {
  const ElemPlan p = elementwise_plan(g, sizeof(T), pointer_alignment({x, y, r}), env.sm_count);
  const dim3 grid(p.grid_x, p.grid_y), block(p.block_x, p.block_y);
  with_vec<T>(p.vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (p.walk == Walk::channels_last) {
      if constexpr (V == 1 || V == cl_elem_vec(sizeof(T)))
        FASTBN_LAUNCH(grid, block, 0, env.stream, normalize_cl_kernel<T, V>)(x, y, r, relu, g.rows(), g.C, st, af);
    } else if (p.walk == Walk::flat) {
      if constexpr (V == vec_width<T>())
        FASTBN_LAUNCH(grid, block, 0, env.stream, normalize_flat_kernel<T, V>)(x, y, r, relu, g.numel(), g.C, g.S, st,
                                                                              af);
    } else {
      if constexpr (V == 1 || V == vec_width<T>())
        FASTBN_LAUNCH(grid, block, 0, env.stream, normalize_planar_kernel<T, V>)(x, y, r, relu, g.N * g.C, g.C, g.S,
                                                                                st, af);
    }
  });
  return cudaGetLastError();
}

#define FASTBN_INSTANTIATE_NORMALIZE(T)                                                                   \
  template cudaError_t launch_normalize<T>(const Geometry&, const T*, T*, ChannelStats<acc_t<T>>,          \
                                           Affine<acc_t<T>>, const T*, bool, const LaunchEnv&);
FASTBN_INSTANTIATE_NORMALIZE(float)
FASTBN_INSTANTIATE_NORMALIZE(double)
FASTBN_INSTANTIATE_NORMALIZE(f16)
FASTBN_INSTANTIATE_NORMALIZE(bf16)

}  // namespace cuda
}  // namespace fastbn
