// Device helpers shared by fastbn's CUDA kernels: vector access, the occupancy query, the
// reductions' walks (planar tiles, grouped runs) and their deterministic warp/block merges
// (launch shapes: plan.h). Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../bn_math.h"
#include "launch.h"
#include "plan.h"

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

// A kernel as a type (for resident_blocks' cache).
template <auto Kernel> using KernelC = std::integral_constant<decltype(Kernel), Kernel>;

// Blocks of `Kernel` (kThreads threads, at most `smem` bytes of dynamic shared memory) one SM
// of `device` holds at once: the occupancy the reduction splits are sized for (plan.h
// reduce_plan). Queried once per kernel and device.
template <auto Kernel> int resident_blocks(int device, size_t smem) {
  static std::array<std::atomic<int>, 64> cache{};
  const int n = cached_per_device(cache, device, [&] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return std::min(blocks, kMaxResident);
  });
  return n > 0 ? n : 1;  // a failed query is not fatal: size the split for one block an SM
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
  // The channel of the vector's last values (c where the vector stays in one plane).
  __device__ __forceinline__ int64_t next(int64_t C, int V) const { return rest >= V ? c : (c + 1 == C ? 0 : c + 1); }
};

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

// Grouped planar walk (plan.h Walk::grouped) of the block of channel group gi, split `split`:
// channels c0 = gi * G, ..., c0 + G - 1, whose planes of row n are one run of G * S values at
// (n * C + c0) * S, Q = G * S / V vectors of V values (16-byte aligned). Thread t < R * Q (R =
// kThreads / Q rows at once; the others idle) takes vector q = t % Q of rows t / Q + R * split,
// + R * splits, ...; its vector's first `lo` values (1..V) are channel j = q * V / S's of the
// group, the others channel j + 1's. A 1-D block of kThreads threads.
struct GroupedWalk {
  int Q, R, q, j, lo;
  bool active;
  int64_t row0, step;
  __device__ __forceinline__ GroupedWalk(int S, int G, int V, int64_t split, int64_t splits) {
    Q = G * S / V;
    R = kThreads / Q;
    const int t = threadIdx.x;
    q = t % Q;
    active = t < R * Q;
    row0 = t / Q + static_cast<int64_t>(R) * split;
    step = static_cast<int64_t>(R) * splits;
    j = q * V / S;
    lo = min(V, (j + 1) * S - q * V);
  }
  // For whole tiles of K rows: load(k, off) for each row k (off: the element offset of the
  // thread's vector), then use(); for the rows left: part(off).
  template <int K, class Load, class Use, class Part>
  __device__ __forceinline__ void rows(int64_t N, int64_t C, int64_t S, int64_t c0, int V, const Load& load,
                                       const Use& use, const Part& part) const {
    if (!active) return;
    const int64_t base = c0 * S + static_cast<int64_t>(q) * V, row = C * S;
    int64_t n = row0;
    for (; n + (K - 1) * step < N; n += K * step) {
#pragma unroll
      for (int k = 0; k < K; ++k) load(k, (n + k * step) * row + base);
      use();
    }
    for (; n < N; n += step) part(n * row + base);
  }
  // Merge, in a fixed order, of every thread's states: `first` of channel j, `second` of
  // channel j + 1 (empty where lo == V). Warp g < G merges channel g's: for rows r < R and the
  // vectors q that cover channel g, thread r * Q + q's first state if its vector starts in g,
  // else its second; lane l takes items l, l + 32, ..., then a shuffle tree. Result valid in
  // lane 0 of warps g < G (g = the returned channel). `shared`: 2 * kThreads states.
  template <class State, class Merge, class Shfl>
  __device__ __forceinline__ State merge(State first, State second, int S, int G, int V, State* shared,
                                         const Merge& merge_fn, const Shfl& shfl, int& g) const {
    const int t = threadIdx.x;
    shared[t] = first;
    shared[kThreads + t] = second;
    __syncthreads();
    g = t / 32;
    const int lane = t % 32;
    State s = State{};
    if (g < G) {
      const int qa = g * S / V, qb = ((g + 1) * S - 1) / V, nq = qb - qa + 1;
      for (int i = lane; i < nq * R; i += 32) {
        const int qq = qa + i % nq, tt = (i / nq) * Q + qq;
        s = merge_fn(s, qq * V >= g * S ? shared[tt] : shared[kThreads + tt]);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const State o = shfl(s, off);
        s = merge_fn(s, o);
      }
    }
    return s;
  }
};

// Index of partial k (of `splits`) of channel c in a reduction workspace array: a channel's
// partials are consecutive, so that a finalize lane group's loads of them coalesce.
__host__ __device__ __forceinline__ int64_t partial_index(int64_t k, int64_t c, int64_t splits) {
  return c * splits + k;
}

// A reduction's workspace (layout: plan.h reduce_workspace_bytes_for).
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
};

// ---------------------------------------------------------------- finalize (plan.h finalize_plan)

// Thread layout of a finalize block: kThreads threads, `lanes` a channel (a power of two).
struct FinalizeLane {
  int lanes, lane;
  int64_t c;  // the channel; >= C for the idle threads of the last block
  __device__ __forceinline__ explicit FinalizeLane(int lanes_) : lanes(lanes_) {
    lane = static_cast<int>(threadIdx.x) & (lanes - 1);
    c = static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  }
  // Walks partials k = lane, lane + lanes, ... (< splits) in that order, kFinalizeBatch at
  // once: load(k, j) fills slot j with partial k, then use(j) merges slot j, in order.
  template <class Load, class Use>
  __device__ __forceinline__ void walk(int64_t splits, const Load& load, const Use& use) const {
    for (int64_t k0 = lane; k0 < splits; k0 += static_cast<int64_t>(lanes) * kFinalizeBatch) {
#pragma unroll
      for (int j = 0; j < kFinalizeBatch; ++j) {
        const int64_t k = k0 + static_cast<int64_t>(lanes) * j;
        if (k < splits) load(k, j);
      }
#pragma unroll
      for (int j = 0; j < kFinalizeBatch; ++j)
        if (k0 + static_cast<int64_t>(lanes) * j < splits) use(j);
    }
  }
};

// Fixed-order tree over a channel's lanes: level off (lanes / 2, ..., 1) merges lane l + off
// into lane l < off; the result is in lane 0. Levels of 32 and more go through `shared`
// (kThreads states), the others through warp shuffles. Every thread of the block calls it.
template <class State, class Merge, class Shfl>
__device__ __forceinline__ State finalize_tree(State s, const FinalizeLane& fl, State* shared, const Merge& merge,
                                               const Shfl& shfl) {
  for (int off = fl.lanes / 2; off >= 32; off /= 2) {
    shared[threadIdx.x] = s;
    __syncthreads();
    if (fl.lane < off) s = merge(s, shared[threadIdx.x + off]);
    __syncthreads();
  }
  for (int off = fl.lanes < 32 ? fl.lanes / 2 : 16; off > 0; off /= 2) {
    const State o = shfl(s, off);
    if (fl.lane < off) s = merge(s, o);
  }
  return s;
}

}  // namespace cuda
}  // namespace fastbn
