// Launch plans of fastbn's CUDA kernels: which kernel runs, its grid, block and shared memory,
// how a reduction is split and merged, decided from the geometry, the storage type's size,
// the pointers' alignment and the device (SM count, and how many blocks of the chosen kernel
// an SM holds at once). Plain C++ (no CUDA header): the launchers (stats.cu, normalize.cu,
// grad.cu) launch exactly what these functions return, and plan_binding.cpp describes the
// same plans on any machine (fastbn._C.cuda_launch_plan, `bench.py --plan`).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "../bn_types.h"

namespace fastbn {
namespace cuda {

constexpr int kThreads = 256;           // threads per block, every kernel
constexpr int kMaxGridY = 65535;
constexpr int kElemBlocksPerSM = 16;     // elementwise grids: enough blocks to fill each SM, then loop
constexpr int64_t kMinPerBlock = 4096;   // values one reduction block handles, at least
constexpr int kReduceWaves = 2;          // reduction grids: at least this many waves of resident blocks
constexpr int kMaxResident = 2048 / kThreads;  // blocks of kThreads an SM can hold (sm_80, sm_90)

// Finalize kernels (the fixed-order merge of a reduction's `splits` partials per channel):
// `lanes` threads a channel (a power of two, at most kThreads), each merging at most
// kFinalizePerLane partials in order until there are kThreads lanes (then more), then a fixed
// tree over the lanes.
constexpr int kFinalizePerLane = 8;
// Partials a finalize lane loads before merging them (independent loads in flight).
constexpr int kFinalizeBatch = 4;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// The smallest power of two >= v, at most kThreads.
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < kThreads) p <<= 1;
  return p;
}
inline int log2_pow2(int p) {
  int l = 0;
  while ((1 << l) < p) ++l;
  return l;
}

// Values per 16-byte vector of a storage type of elem_size bytes: float 4, double 2, f16/bf16 8.
constexpr int vec16(int elem_size) { return 16 / elem_size; }

// Largest power-of-two byte alignment (at most 16) every non-null pointer has.
inline int pointer_alignment(std::initializer_list<const void*> ptrs) {
  int a = 16;
  for (const void* p : ptrs)
    if (p != nullptr)
      while (reinterpret_cast<uintptr_t>(p) % a != 0) a /= 2;
  return a;
}

// ---------------------------------------------------------------- block shapes

// Channels-last thread block: x covers channel vectors (vc channels a thread), y covers rows.
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

// ---------------------------------------------------------------- elementwise passes

// How an elementwise pass (normalize, grad_input) walks the tensor:
//  planar: thread (tx, ty) takes positions tx of plane ty (one channel a plane), vec values
//  flat:   the (N, C, S) tensor as one run of vec-value vectors (planes not a multiple of the
//          16-byte width: a vector crosses at most one plane boundary, S >= vec)
//  channels_last: thread tx owns vec consecutive channels of its rows
enum class Walk { planar, flat, channels_last, grouped };

struct ElemPlan {
  Walk walk;
  int vec;  // values a thread loads at once
  unsigned grid_x, grid_y;
  int block_x, block_y;
};

// Channels-last elementwise vector width: 16 bytes for float and double; 8 bytes (4 values)
// for 16-bit types, whose 8 channels' coefficients a thread would otherwise hold (over 64
// registers in the backward).
constexpr int cl_elem_vec(int elem_size) { return elem_size == 2 ? 4 : vec16(elem_size); }

// align: pointer_alignment() of every tensor the pass reads or writes.
inline ElemPlan elementwise_plan(const Geometry& g, int elem_size, int align, int sm_count) {
  const int W = vec16(elem_size);
  ElemPlan p{};
  if (g.channels_last) {
    const int v = cl_elem_vec(elem_size);
    p.walk = Walk::channels_last;
    p.vec = g.C % v == 0 && align >= v * elem_size ? v : 1;
    const ClBlock blk(g.C, p.vec);
    p.block_x = blk.bx;
    p.block_y = blk.by;
    p.grid_x = static_cast<unsigned>(blk.grid_x);
    p.grid_y = static_cast<unsigned>(elementwise_grid_y(g.rows(), blk.by, blk.grid_x, sm_count));
    return p;
  }
  const int64_t numel = g.numel();
  if (g.S % W != 0 && g.S >= W && numel % W == 0 && align >= 16) {
    p.walk = Walk::flat;
    p.vec = W;
    const int64_t fill = static_cast<int64_t>(std::max(sm_count, 1)) * kElemBlocksPerSM;
    p.grid_x = static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(ceil_div(numel, W), kThreads), fill)));
    p.grid_y = 1;
    p.block_x = kThreads;
    p.block_y = 1;
    return p;
  }
  p.walk = Walk::planar;
  p.vec = g.S % W == 0 && align >= 16 ? W : 1;
  p.block_x = next_pow2(ceil_div(g.S, p.vec));
  p.block_y = kThreads / p.block_x;
  const int64_t gx = ceil_div(ceil_div(g.S, p.vec), p.block_x);
  p.grid_x = static_cast<unsigned>(gx);
  p.grid_y = static_cast<unsigned>(elementwise_grid_y(g.N * g.C, p.block_y, gx, sm_count));
  return p;
}

// ---------------------------------------------------------------- reductions

// The walk of a per-channel reduction (statistics, backward sums):
//  planar: block (c, split) takes tiles split, split + splits, ... of channel c's N * S values
//          seen as one run of vec-value vectors (common.cuh planar_tiles); vec: 16 bytes where
//          S and the pointers allow, else 8 bytes, else 1 value
//  channels_last: block (tile, split) takes rows split * by + ty, + splits * by, ... of vec
//          channels a thread (16-byte vectors where C and the pointers allow, else 1)
//  grouped: planes too odd for any vector (7x7): block (group, split) takes G = reduce_group(S, elem)
//          consecutive channels, whose N rows of G planes are each one 16-byte aligned run of
//          G * S values (common.cuh GroupedWalk); a thread keeps one vector position of the run
//          and the states of the (at most two) channels its vector covers
struct ReduceShape {
  Walk walk;
  int vec;
  int group = 1;  // grouped: channels a block
};

// Channels a grouped block takes: the fewest whose planes make whole 16-byte vectors.
inline int reduce_group(int64_t S, int elem_size) {
  int g = 1;
  while ((g * S * elem_size) % 16 != 0) g *= 2;
  return g;
}
// Vectors of a grouped block's run (G * S / vec), a thread each.
inline int64_t group_vectors(const ReduceShape& sh, int64_t S) { return sh.group * S / sh.vec; }

inline ReduceShape reduce_shape(const Geometry& g, int elem_size, int align) {
  const int W = vec16(elem_size);
  if (g.channels_last) return {Walk::channels_last, g.C % W == 0 && align >= 16 ? W : 1};
  if (g.S % W == 0 && align >= 16) return {Walk::planar, W};
  if (W >= 4 && g.S % (W / 2) == 0 && align >= 8) return {Walk::planar, W / 2};
  const int G = reduce_group(g.S, elem_size);
  if (g.S >= W && g.C % G == 0 && G * g.S / W <= kThreads && align >= 16) return {Walk::grouped, W, G};
  return {Walk::planar, 1};
}

struct ReducePlan {
  ReduceShape shape;
  int64_t splits;           // partials a channel
  unsigned grid_x, grid_y;  // planar / grouped: channel_tiles * splits blocks along x
  int block_x, block_y;
  int64_t channel_tiles;    // blocks along x (channels-last), or channel groups (C planar, C / G grouped)
};

// The split of a reduction over geometry g: enough blocks for kReduceWaves waves of `resident`
// blocks per SM (the partial kernel's occupancy), but no block under kMinPerBlock values and
// no channels-last thread without a row.
inline ReducePlan reduce_plan(const Geometry& g, ReduceShape shape, int sm_count, int resident) {
  ReducePlan p{};
  p.shape = shape;
  const int64_t target =
      static_cast<int64_t>(std::max(sm_count, 1)) * std::clamp(resident, 1, kMaxResident) * kReduceWaves;
  int64_t splits;
  if (shape.walk == Walk::channels_last) {
    const ClBlock blk(g.C, shape.vec);
    p.channel_tiles = blk.grid_x;
    p.block_x = blk.bx;
    p.block_y = blk.by;
    splits = ceil_div(target, blk.grid_x);
    splits = std::min(splits, ceil_div(g.rows() * std::min<int64_t>(g.C, static_cast<int64_t>(blk.bx) * shape.vec),
                                       kMinPerBlock));
    splits = std::min(splits, ceil_div(g.rows(), blk.by));
  } else if (shape.walk == Walk::grouped) {
    p.channel_tiles = g.C / shape.group;
    p.block_x = kThreads;
    p.block_y = 1;
    const int64_t rows_at_once = kThreads / group_vectors(shape, g.S);  // a block's rows of G planes at a time
    splits = std::min({ceil_div(target, p.channel_tiles), ceil_div(g.count() * shape.group, kMinPerBlock),
                       ceil_div(g.N, rows_at_once)});
  } else {
    p.channel_tiles = g.C;
    p.block_x = kThreads;
    p.block_y = 1;
    splits = std::min(ceil_div(target, std::max<int64_t>(g.C, 1)), ceil_div(g.count(), kMinPerBlock));
  }
  p.splits = std::max<int64_t>(1, std::min<int64_t>(splits, kMaxGridY));
  if (shape.walk == Walk::channels_last) {
    p.grid_x = static_cast<unsigned>(p.channel_tiles);
    p.grid_y = static_cast<unsigned>(p.splits);
  } else {
    p.grid_x = static_cast<unsigned>(p.channel_tiles * p.splits);
    p.grid_y = 1;
  }
  return p;
}

// Dynamic shared memory of a channels-last reduction block of bx x by threads, vc channels a
// thread: its tree over the rows of threads (two acc_size values a channel and row, plus an
// int64 count a row where `counts`: the statistics).
inline size_t cl_reduce_smem(int bx, int by, int vc, size_t acc_size, bool counts) {
  return static_cast<size_t>(by) * (static_cast<size_t>(bx) * vc * 2 * acc_size + (counts ? sizeof(int64_t) : 0));
}

// Lanes per channel, blocks and serial chain of a finalize over `splits` partials of C channels.
struct FinalizePlan {
  int lanes;      // threads a channel (power of two <= kThreads)
  int channels;   // channels a block (kThreads / lanes)
  unsigned blocks;
  int per_lane;   // partials a lane merges in order, at most
  int chain;      // longest serial chain of merges: per_lane + the tree's levels
};

inline FinalizePlan finalize_plan(int64_t C, int64_t splits) {
  FinalizePlan f{};
  f.lanes = next_pow2(ceil_div(splits, kFinalizePerLane));
  f.channels = kThreads / f.lanes;
  f.blocks = static_cast<unsigned>(ceil_div(C, f.channels));
  f.per_lane = static_cast<int>(ceil_div(splits, f.lanes));
  f.chain = f.per_lane + log2_pow2(f.lanes);
  return f;
}

// Workspace layout of a reduction with `splits` partials per channel:
//   [double shift: C][int64 n: splits * C][Acc a: splits * C][Acc b: splits * C]
// (partials at partial_index in common.cuh; shift: the statistics' per-channel shift, which
// the partial kernels compute and the finalize adds back; the backward sums leave it unused).
inline size_t reduce_workspace_bytes_for(int64_t splits, int64_t C, size_t acc_size) {
  return static_cast<size_t>(C) * sizeof(double) + static_cast<size_t>(splits * C) * (sizeof(int64_t) + 2 * acc_size);
}

// An upper bound of the workspace any reduction over g needs on a device of sm_count SMs
// (every shape, any occupancy up to kMaxResident; double partials).
inline size_t reduce_workspace_bound(const Geometry& g, int elem_size, int sm_count) {
  int64_t splits = 1;
  const int W = vec16(elem_size);
  for (int vec : {1, W / 2, W}) {  // W >= 2
    const Walk w = g.channels_last ? Walk::channels_last : Walk::planar;
    splits = std::max(splits, reduce_plan(g, ReduceShape{w, vec}, sm_count, kMaxResident).splits);
  }
  const ReduceShape grouped{Walk::grouped, W, reduce_group(g.S, elem_size)};
  if (!g.channels_last && g.C % grouped.group == 0 && g.S >= W && group_vectors(grouped, g.S) <= kThreads)
    splits = std::max(splits, reduce_plan(g, grouped, sm_count, kMaxResident).splits);
  return reduce_workspace_bytes_for(splits, g.C, sizeof(double));
}

// Blocks of `threads` threads using `regs` registers a thread and `smem` bytes of shared
// memory that one SM of compute capability 8.0 / 9.0 holds at once (the occupancy
// calculator's rules: registers allocated per warp in units of 256, warps in units of 4;
// smem_per_sm: 228 KB on sm_90, 164 KB on sm_80).
inline int blocks_per_sm(int regs, int threads, size_t smem, size_t smem_per_sm = 228 * 1024) {
  const int warps = (threads + 31) / 32;
  const int regs_per_warp = ((std::max(regs, 1) * 32 + 255) / 256) * 256;
  const int warps_by_regs = (65536 / regs_per_warp) / 4 * 4;
  int blocks = std::min({warps_by_regs / warps, 2048 / threads, 32});
  if (smem > 0) blocks = std::min<int>(blocks, static_cast<int>(smem_per_sm / (smem + 1024)));
  return std::max(blocks, 0);
}

}  // namespace cuda
}  // namespace fastbn
