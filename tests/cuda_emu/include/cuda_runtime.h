// Stand-in for the CUDA toolkit's cuda_runtime.h, so that .cu files compile with g++ (as C++)
// and run on the CPU under cuda_emu (cuda_emu.h). Device code sees __CUDACC__ and
// __CUDA_ARCH__ (900), so it takes the same #if branches and intrinsics as on an H100.
//
// Kernels must launch with FASTBN_LAUNCH and declare shared memory with FASTBN_SHARED_ARRAY /
// FASTBN_DYNAMIC_SHARED (csrc/cuda/common.cuh): g++ cannot parse <<<>>>, and a plain
// `__shared__` declaration is rejected here, since only the macros give each block its own,
// exactly sized, poisoned allocation.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ __shared___is_not_emulated_use_FASTBN_SHARED_ARRAY_or_FASTBN_DYNAMIC_SHARED
#define __constant__ __constant___is_not_emulated

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
constexpr int warpSize = 32;

// ---------------------------------------------------------------- launches and shared memory
#define FASTBN_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_emu::Launcher<__VA_ARGS__>(grid, block, smem, stream, __FILE__, __LINE__)
#define FASTBN_SHARED_ARRAY(name, count, ...)                                                              \
  __VA_ARGS__* const name = static_cast<__VA_ARGS__*>(::cuda_emu::static_shared(                           \
      sizeof(__VA_ARGS__) * static_cast<size_t>(count), alignof(__VA_ARGS__), __FILE__, __LINE__))
#define FASTBN_DYNAMIC_SHARED(name) unsigned char* const name = ::cuda_emu::dynamic_shared()

// ---------------------------------------------------------------- synchronisation
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::SyncwarpAt{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_sync(...) ::cuda_emu::warp_shuffle(::cuda_emu::WarpOp::idx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::warp_shuffle(::cuda_emu::WarpOp::up, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::warp_shuffle(::cuda_emu::WarpOp::down, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::warp_shuffle(::cuda_emu::WarpOp::bfly, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
  static_cast<unsigned>(::cuda_emu::warp_op(::cuda_emu::WarpOp::ballot, mask, (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) \
  static_cast<int>(::cuda_emu::warp_op(::cuda_emu::WarpOp::any, mask, (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, pred) \
  static_cast<int>(::cuda_emu::warp_op(::cuda_emu::WarpOp::all, mask, (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __activemask() \
  static_cast<unsigned>(::cuda_emu::warp_op(::cuda_emu::WarpOp::active, 0u, 0, 0, 32, __FILE__, __LINE__))

namespace cuda_emu {
struct SyncwarpAt {
  const char* file;
  int line;
  void operator()(unsigned mask = 0xffffffffu) const { warp_op(WarpOp::sync, mask, 0, 0, 32, file, line); }
};
}  // namespace cuda_emu

// Atomics (global or shared memory): sequentially consistent host atomics, so that
// ThreadSanitizer sees them as synchronisation.
template <class T> inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_floating_point<T>::value) {
    T old;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    T desired = old + v;
    while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) desired = old + v;
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <class T> inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicCAS(T* p, T compare, T v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
template <class T> inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <class T> inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------- arithmetic intrinsics
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, 8);
  return v;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
// fmaf / fma / sqrtf / sqrt come from <cmath>: correctly rounded, as on the GPU.
