// Device helpers shared by fastbn's CUDA kernels: 16-byte vector access, launch shapes,
// and deterministic warp/block reductions. Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../bn_math.h"
#include "launch.h"

// Kernel launches and shared-memory declarations go through these macros, so that the CPU
// emulator (tests/cuda_emu, which defines its own versions first) runs the same sources:
//   FASTBN_LAUNCH(grid, block, smem_bytes, stream, kernel<...>)(args...);
//   FASTBN_SHARED_ARRAY(name, count, type...);   a block's `count` values of `type`
//   FASTBN_DYNAMIC_SHARED(name);                 the block's dynamic shared bytes, 16-aligned
// Every __global__ function's name ends in `_kernel` (the emulator's coverage check relies on it).
#ifndef FASTBN_LAUNCH
#define FASTBN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef FASTBN_SHARED_ARRAY
#define FASTBN_SHARED_ARRAY(name, count, ...) __shared__ __VA_ARGS__ name[count]
#endif
#ifndef FASTBN_DYNAMIC_SHARED
#define FASTBN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastbn {
namespace cuda {

constexpr int kThreads = 256;        // threads per block, every kernel
constexpr int kBlocksPerSM = 4;      // reduction grids aim for this many blocks per SM
constexpr int64_t kMinPerBlock = 4096;  // values one reduction block handles, at least
constexpr int kMaxGridY = 65535;
constexpr int kElemBlocksPerSM = 16;  // elementwise grids: enough blocks to fill each SM, then loop

// Values per 16-byte vector: float 4, double 2, f16/bf16 8.
template <class T> constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

template <class T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, class T> __device__ __forceinline__ void load_acc(const T* __restrict__ p, acc_t<T> (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_acc(pk.v[i]);
}

template <int N, class T> __device__ __forceinline__ void store_acc(T* __restrict__ p, const acc_t<T> (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_acc<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Whether every pointer (null ones ignored) is aligned to `bytes`.
inline bool aligned_to(size_t bytes, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  return true;
}
inline bool aligned16(const void* p) { return aligned_to(16, {p}); }

// Vector width (values a thread loads at once) of a planar reduction over planes of S values
// of type T: the 16-byte width when S is a multiple of it, else half of it (8 bytes; e.g.
// 14x14 planes in half precision), else 1; wider only where every pointer is aligned to it.
template <class T> inline int planar_reduce_vec(int64_t S, std::initializer_list<const void*> ptrs) {
  constexpr int W = vec_width<T>();
  if (S % W == 0 && aligned_to(sizeof(T) * W, ptrs)) return W;
  if (W >= 4 && S % (W / 2) == 0 && aligned_to(sizeof(T) * W / 2, ptrs)) return W / 2;
  return 1;
}

// Calls f(std::integral_constant<int, V>{}) for V = v, one of vec_width<T>(), its half, or 1.
template <class T, class F> inline void with_vec(int v, F&& f) {
  constexpr int W = vec_width<T>();
  if (v == W) {
    f(std::integral_constant<int, W>{});
  } else if constexpr (W >= 4) {
    if (v == W / 2) f(std::integral_constant<int, W / 2>{});
    else f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Whether an elementwise pass over planes of S values takes the flat path (see
// FlatPos): S not a multiple of the vector width W, but at least W (a vector spans at most
// two planes), the element count a multiple of W and every pointer 16-byte aligned.
template <class T> inline bool use_flat(int64_t S, int64_t numel, bool aligned) {
  constexpr int W = vec_width<T>();
  return S % W != 0 && S >= W && numel % W == 0 && aligned;
}

// Position of flat element i of a planar (N, C, S) tensor: its channel c and how many values
// of its plane remain from it (rest, >= 1). A vector of V <= S values starting at i covers
// channel c for its first min(rest, V) values and channel (c + 1) % C for the others.
struct FlatPos {
  int64_t c, rest;
  __device__ __forceinline__ FlatPos(int64_t i, int64_t C, int64_t S) {
    const int64_t plane = i / S;
    c = plane % C;
    rest = (plane + 1) * S - i;
  }
  // k[j] = coef(channel of the vector's value j); coef is called once, or twice where the
  // vector crosses into the next plane.
  template <int V, class K, class F> __device__ __forceinline__ void coefs(int64_t C, F coef, K (&k)[V]) const {
    const K k0 = coef(c);
    if (rest >= V) {
#pragma unroll
      for (int j = 0; j < V; ++j) k[j] = k0;
      return;
    }
    const K k1 = coef(c + 1 == C ? 0 : c + 1);
#pragma unroll
    for (int j = 0; j < V; ++j) k[j] = j < rest ? k0 : k1;
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < kThreads) p <<= 1;
  return p;
}

// Channels-last thread block: x covers channel vectors (VC channels a thread), y covers rows.
struct ClBlock {
  int bx, by;
  int64_t grid_x;
  ClBlock(int64_t C, int vc) {
    const int64_t cv = ceil_div(C, vc);
    bx = std::min(32, next_pow2(cv));
    by = kThreads / bx;
    grid_x = ceil_div(cv, bx);
  }
};

// grid.y of an elementwise kernel that needs `rows` thread rows of `by` threads, beside
// grid_x blocks along x: enough blocks to fill the GPU; the threads loop over the rest, so
// per-channel coefficients are computed once per thread, not once per vector.
inline int64_t elementwise_grid_y(int64_t rows, int by, int64_t grid_x, int sm_count) {
  const int64_t fill = ceil_div(static_cast<int64_t>(std::max(sm_count, 1)) * kElemBlocksPerSM, grid_x);
  return std::max<int64_t>(1, std::min({ceil_div(rows, by), fill, static_cast<int64_t>(kMaxGridY)}));
}

// Blocks of kThreads of a flat elementwise pass over numel values, v a thread: enough to
// fill the GPU; the threads loop over the rest.
inline unsigned flat_blocks(int64_t numel, int v, int sm_count) {
  const int64_t fill = static_cast<int64_t>(std::max(sm_count, 1)) * kElemBlocksPerSM;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(ceil_div(numel, v), kThreads), fill)));
}

// Planar elementwise block: x covers positions in a plane (V values a thread), y covers planes.
struct PlanarBlock {
  int bx, by;
  int64_t grid_x, grid_y;
  PlanarBlock(int64_t planes, int64_t S, int v, int sm_count) {
    bx = next_pow2(ceil_div(S, v));
    by = kThreads / bx;
    grid_x = ceil_div(ceil_div(S, v), bx);
    grid_y = elementwise_grid_y(planes, by, grid_x, sm_count);
  }
};

// Number of blocks each channel's reduction is split over (fills the GPU whatever C is).
inline int64_t reduce_splits(const Geometry& g, int sm_count, int64_t channel_groups) {
  const int64_t target = static_cast<int64_t>(std::max(sm_count, 1)) * kBlocksPerSM;
  int64_t splits = ceil_div(target, std::max<int64_t>(channel_groups, 1));
  splits = std::min(splits, ceil_div(g.count(), kMinPerBlock));
  return std::max<int64_t>(1, std::min<int64_t>(splits, kMaxGridY));
}

// Splits of a reduction over geometry g: planar kernels run C * splits blocks (one channel
// each); channels-last kernels run grid_x channel tiles * splits row groups, each block
// covering min(C, bx * vc) channels of its rows.
inline int64_t planar_splits(const Geometry& g, int sm_count) { return reduce_splits(g, sm_count, g.C); }
inline int64_t cl_splits(const Geometry& g, int sm_count, int vc) {
  const ClBlock blk(g.C, vc);
  const int64_t target = static_cast<int64_t>(std::max(sm_count, 1)) * kBlocksPerSM;
  int64_t splits = ceil_div(target, blk.grid_x);
  splits = std::min(splits, ceil_div(g.rows() * std::min<int64_t>(g.C, blk.bx * vc), kMinPerBlock));
  splits = std::min(splits, ceil_div(g.rows(), blk.by));
  return std::max<int64_t>(1, std::min<int64_t>(splits, kMaxGridY));
}

// The splits every reduction launcher uses (the statistics and the backward sums): channels-
// last with vc channels a thread (1, or the 16-byte vector width), or planar. The workspace
// bound (stats.cu reduce_workspace_bytes) is the largest of these over both vc choices.
inline int64_t reduction_splits(const Geometry& g, int sm_count, int vc) {
  return g.channels_last ? cl_splits(g, sm_count, vc) : planar_splits(g, sm_count);
}

// Finalize kernels (the fixed-order merge of a reduction's `splits` partials per channel):
// a warp per channel, kFinalizeChannels channels (warps) a block of dim3(32, kFinalizeChannels).
constexpr int kFinalizeChannels = kThreads / 32;
// Partials a finalize lane loads before merging them (independent loads in flight).
constexpr int kFinalizeBatch = 4;

// ---------------------------------------------------------------- reductions

template <class Acc> __device__ __forceinline__ WelfordState<Acc> shfl_down(const WelfordState<Acc>& s, int off) {
  WelfordState<Acc> o;
  o.n = __shfl_down_sync(0xffffffffu, static_cast<long long>(s.n), off);
  o.mean = __shfl_down_sync(0xffffffffu, s.mean, off);
  o.m2 = __shfl_down_sync(0xffffffffu, s.m2, off);
  return o;
}

// Flat thread index and count of a (1-D or 2-D) block; warps are consecutive flat indices.
__device__ __forceinline__ int flat_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int flat_threads() { return blockDim.x * blockDim.y; }

// Merge of a whole block's Welford states, in a fixed order. Result valid in flat thread 0.
// `shared` holds kThreads / 32 states.
template <class Acc> __device__ WelfordState<Acc> block_merge(WelfordState<Acc> s, WelfordState<Acc>* shared) {
  const int lane = flat_tid() % 32, warp = flat_tid() / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s = chan_merge(s, shfl_down(s, off));
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < flat_threads() / 32 ? shared[lane] : WelfordState<Acc>{0, Acc(0), Acc(0)};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s = chan_merge(s, shfl_down(s, off));
  }
  return s;
}

// Sum of two values over a whole block, fixed order. Result valid in flat thread 0.
template <class Acc> __device__ void block_sum2(Acc& a, Acc& b, Acc* shared) {
  const int lane = flat_tid() % 32, warp = flat_tid() / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  if (lane == 0) {
    shared[2 * warp] = a;
    shared[2 * warp + 1] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < flat_threads() / 32;
    a = has ? shared[2 * lane] : Acc(0);
    b = has ? shared[2 * lane + 1] : Acc(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// Planar reduction walk over channel c of an (N, C, S) tensor: its N * S values as N * (S / V)
// vectors of V values (S % V == 0), in tiles of kThreads * K vectors; the block of split
// `split` takes tiles split, split + splits, ... Thread t of a tile reads its vectors t,
// t + kThreads, ..., t + (K - 1) * kThreads, so each load of a warp reads 32 consecutive
// vectors of the channel (across plane boundaries) and a thread has K loads in flight,
// whatever the plane size. For a whole tile: load(k, off) for k = 0..K-1 (off: the element
// offset of vector k), then use(); for the channel's last, partial tile: part(off) for each
// of the thread's vectors in range. A 1-D block of kThreads threads.
template <int V, int K, class Load, class Use, class Part>
__device__ __forceinline__ void planar_tiles(int64_t N, int64_t C, int64_t S, int64_t c, int64_t split,
                                             int64_t splits, const Load& load, const Use& use, const Part& part) {
  const int64_t sv = S / V;     // vectors a plane
  const int64_t vecs = N * sv;  // vectors of the channel
  const int64_t tile = static_cast<int64_t>(kThreads) * K;
  const int64_t cs = C * S;
  // A thread's position: vector j = n * sv + s of the channel, at element offset o. Steps of
  // kThreads vectors (within a tile) and of splits * tile (to the next tile) as (vectors
  // within a plane, elements), so that the walk divides only here.
  struct Step {
    int64_t vecs, elems;
  };
  const auto make_step = [&](int64_t d) { return Step{d % sv, (d % sv) * V + (d / sv) * cs}; };
  const Step in_tile = make_step(kThreads), next_tile = make_step(splits * tile);
  const auto advance = [&](const Step& st, int64_t& s, int64_t& o) {
    s += st.vecs;
    o += st.elems;
    if (s >= sv) {  // into the next plane of the channel
      s -= sv;
      o += cs - S;
    }
  };
  const int64_t first = split * tile + flat_tid();
  int64_t s0 = first % sv;
  int64_t o0 = ((first / sv) * C + c) * S + s0 * V;
  for (int64_t t0 = split * tile; t0 < vecs; t0 += splits * tile) {
    const int64_t j0 = t0 + flat_tid();
    const bool whole = t0 + tile <= vecs;
    int64_t s = s0, o = o0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (whole) load(k, o);
      else if (j0 + static_cast<int64_t>(k) * kThreads < vecs) part(o);
      advance(in_tile, s, o);
    }
    advance(next_tile, s0, o0);
    if (whole) use();
  }
}

// Index of partial k (of `splits`) of channel c in a reduction workspace array: a channel's
// partials are consecutive, so that a finalize warp's loads of them coalesce.
__host__ __device__ __forceinline__ int64_t partial_index(int64_t k, int64_t c, int64_t splits) {
  return c * splits + k;
}

// Workspace layout of a reduction with `splits` partials per channel:
//   [double shift: C][int64 n: splits * C][Acc a: splits * C][Acc b: splits * C]
// (partials at partial_index; shift: the statistics' per-channel shift, which the partial
// kernels compute and the finalize adds back; the backward sums leave it unused).
template <class Acc> struct ReduceWorkspace {
  double* shift;
  int64_t* n;
  Acc* a;
  Acc* b;
  ReduceWorkspace(void* base, int64_t splits, int64_t C) {
    shift = static_cast<double*>(base);
    n = reinterpret_cast<int64_t*>(shift + C);
    a = reinterpret_cast<Acc*>(n + splits * C);
    b = a + splits * C;
  }
  static size_t bytes(int64_t splits, int64_t C) {
    return static_cast<size_t>(C) * sizeof(double) +
           static_cast<size_t>(splits * C) * (sizeof(int64_t) + 2 * sizeof(Acc));
  }
};

}  // namespace cuda
}  // namespace fastbn
