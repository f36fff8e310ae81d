// cuda_emu: runs CUDA kernels written for nvcc as plain C++ on the CPU, one cooperative fiber
// per CUDA thread. This header is the emulator's own API (configuration, faults, coverage,
// the launch and device-side entry points); cuda_runtime.h / cuda_runtime_api.h /
// cuda_fp16.h / cuda_bf16.h in this directory stand in for the CUDA toolkit's headers on
// top of it. It checks logic, not speed: see tests/cuda_emu/README.md for what it catches
// and what it cannot.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- CUDA host types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMaxSharedMemoryPerBlock = 8,
                      cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace cuda_emu {

// ---------------------------------------------------------------- configuration
// Order in which a block's runnable threads are resumed (and blocks are started):
// forward = lowest index first, reverse = highest first, random = seeded pseudo-random.
enum class Schedule { forward, reverse, random };

struct Config {
  int workers = 1;               // OS threads running blocks of one launch concurrently
  Schedule schedule = Schedule::forward;
  uint64_t seed = 0;             // for Schedule::random
  int multiprocessor_count = 132;  // what cudaDeviceGetAttribute reports (an H100 SXM)
  int resident_blocks = 4;         // what cudaOccupancyMaxActiveBlocksPerMultiprocessor reports
};
void configure(const Config& c);
Config config();

// Faults found since the last call (barrier/shuffle divergence, launch-configuration errors,
// deadlocks), one line each with kernel, block, thread and file:line. Clears the list.
std::vector<std::string> take_faults();

// Launches per kernel instantiation (e.g. "fastbn::cuda::{anonymous}::stats_cl_kernel<float, 4>").
std::map<std::string, long> launch_counts();
void reset_launch_counts();

// ---------------------------------------------------------------- device side
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads(const char* file, int line);

enum class WarpOp { idx, up, down, bfly, ballot, any, all, sync, active };
// Rendezvous of the lanes of `mask` (all must arrive at the same call site with the same
// mask); returns this lane's result of `op` on the 64-bit values the lanes deposited.
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width, const char* file, int line);

// __shfl*_sync(mask, v, param[, width]) at file:line.
template <class T>
T warp_shuffle(WarpOp op, const char* file, int line, unsigned mask, T v, int param, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type the emulator can't move");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_op(op, mask, bits, param, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// This block's shared array declared at file:line (allocated, exactly `bytes` long and filled
// with 0xFF, by the first thread that gets there).
void* static_shared(size_t bytes, size_t align, const char* file, int line);
// This block's dynamic shared memory (exactly the launch's byte count, 16-aligned, 0xFF-filled).
unsigned char* dynamic_shared();

// ---------------------------------------------------------------- launches
struct LaunchSpec {
  dim3 grid, block;
  size_t dynamic_smem;
  cudaStream_t stream;
  const void* kernel;       // identity (for cudaFuncSetAttribute)
  const char* kernel_name;  // __PRETTY_FUNCTION__ of Launcher<K>::name()
  const char* file;
  int line;
};
struct KernelBody {
  virtual void run() = 0;  // one CUDA thread's execution of the kernel
 protected:
  ~KernelBody() = default;
};
cudaError_t launch(const LaunchSpec& spec, KernelBody& body);
void set_max_dynamic_smem(const void* kernel, int bytes);

template <class F> struct KernelArgs;
template <class... P> struct KernelArgs<void (*)(P...)> {
  using Tuple = std::tuple<std::decay_t<P>...>;
};

template <class F, class Tuple> struct Bound final : KernelBody {
  F fn;
  Tuple args;
  Bound(F f, Tuple a) : fn(f), args(std::move(a)) {}
  void run() override { std::apply(fn, args); }
};

// Launcher<kernel>(grid, block, smem, stream, file, line)(args...) runs the whole grid before
// returning (launches are synchronous), converting the arguments to the kernel's parameter
// types as a CUDA launch does.
template <auto K> struct Launcher {
  LaunchSpec spec;
  static const char* name() { return __PRETTY_FUNCTION__; }
  Launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* file, int line)
      : spec{grid, block, smem, stream, reinterpret_cast<const void*>(K), name(), file, line} {}
  template <class... A> void operator()(A&&... a) const {
    using Tuple = typename KernelArgs<decltype(K)>::Tuple;
    Bound<decltype(K), Tuple> body(K, Tuple(std::forward<A>(a)...));
    launch(spec, body);
  }
};

}  // namespace cuda_emu

// ---------------------------------------------------------------- host API (subset)
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* kernel, int block_size, size_t) {
  if (kernel == nullptr || block_size <= 0) return cudaErrorInvalidValue;
  *n = cuda_emu::config().resident_blocks;
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  cuda_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
