// cuda_emu_selftest: the emulator's own tests, on small kernels written for nvcc.
//   (no argument)     warp-operation and conversion semantics as CUDA defines them, atomics,
//                     poisoned shared memory, schedule effects, and every fault the emulator
//                     must report (barrier divergence, exited threads, shuffle rules, launch
//                     limits). Prints PASS/FAIL per check; exit status 1 if any failed.
//   --clean           the race-free checks only (the ThreadSanitizer build must stay silent)
//   --shared-overflow, --dynamic-overflow
//                     write one element past a static / dynamic shared array (the
//                     AddressSanitizer build must abort with a heap-buffer-overflow report)
//   --race            a block reduction without its barrier (the ThreadSanitizer build must
//                     report a data race)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

int g_failed = 0;

void check(bool ok, const std::string& name, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  if (!ok) ++g_failed;
}

std::string faults() {
  std::string s;
  for (const auto& f : cuda_emu::take_faults()) s += f + "\n";
  return s;
}

// Expects the launch just made to have failed with a fault whose text contains `needle`.
void expect_fault(cudaError_t err, const std::string& name, const char* needle) {
  const std::string f = faults();
  check(err != cudaSuccess && f.find(needle) != std::string::npos, name, f.empty() ? "no fault reported" : f);
}

// ---------------------------------------------------------------- kernels
constexpr unsigned kFull = 0xffffffffu;

__global__ void shuffle_kernel(int* out, int width) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_down_sync(kFull, lane, 3, width);
  o[1] = __shfl_up_sync(kFull, lane, 5, width);
  o[2] = __shfl_xor_sync(kFull, lane, 6, width);
  o[3] = __shfl_sync(kFull, lane, 7, width);
  o[4] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  o[5] = __any_sync(kFull, lane == 31);
  o[6] = __all_sync(kFull, lane < 31);
  o[7] = static_cast<int>(__shfl_down_sync(kFull, static_cast<long long>(lane) << 33, 1) >> 33);
}

__global__ void sum_kernel(const float* in, float* out, int n) {
  FASTBN_SHARED_ARRAY(sh, 256, float);
  const int t = threadIdx.x;
  sh[t] = t < n ? in[blockIdx.x * n + t] : 0.0f;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (t < s) sh[t] += sh[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = sh[0];
}

__global__ void racy_sum_kernel(const float* in, float* out, int n) {
  FASTBN_SHARED_ARRAY(sh, 256, float);
  const int t = threadIdx.x;
  sh[t] = t < n ? in[blockIdx.x * n + t] : 0.0f;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (t < s) sh[t] += sh[t + s];  // no barrier between the steps
  }
  __syncthreads();
  if (t == 0) out[blockIdx.x] = sh[0];
}

__global__ void neighbour_kernel(int* out) {  // reads a neighbour's write without a barrier
  FASTBN_SHARED_ARRAY(sh, 64, int);
  sh[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = sh[(threadIdx.x + 1) % 64];
}

__global__ void poison_kernel(unsigned* out) {
  FASTBN_SHARED_ARRAY(sh, 32, unsigned);
  FASTBN_DYNAMIC_SHARED(dyn);
  out[threadIdx.x] = sh[threadIdx.x];
  out[32 + threadIdx.x] = reinterpret_cast<unsigned*>(dyn)[threadIdx.x];
}

__global__ void shared_overflow_kernel(float* out) {
  FASTBN_SHARED_ARRAY(sh, 64, float);
  sh[threadIdx.x] = 1.0f;  // launched with 65 threads
  __syncthreads();
  out[threadIdx.x] = sh[threadIdx.x];
}

__global__ void dynamic_overflow_kernel(float* out, int n) {
  FASTBN_DYNAMIC_SHARED(dyn);
  if (threadIdx.x == 0) {
    reinterpret_cast<float*>(dyn)[n] = 1.0f;  // one past the n floats launched
    out[0] = 0.0f;
  }
}

__global__ void atomic_kernel(unsigned long long* counter, float* fsum) {
  atomicAdd(counter, 1ull);
  atomicAdd(fsum, 0.5f);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit_kernel(int* out) {
  if (threadIdx.x >= 100) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(kFull, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_own_lane_missing_kernel(int* out) {
  if (threadIdx.x == 3) out[threadIdx.x] = __shfl_down_sync(0x1u, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_vs_barrier_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(kFull, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void syncwarp_kernel(int* out) {
  FASTBN_SHARED_ARRAY(sh, 32, int);
  sh[threadIdx.x] = static_cast<int>(threadIdx.x) * 2;
  __syncwarp();
  out[threadIdx.x] = sh[31 - threadIdx.x];
}

__global__ void conversion_kernel(const float* in, float* out, int n) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < n) out[i] = __half2float(__float2half_rn(in[i]));
}

void configure(cuda_emu::Schedule s, int workers, uint64_t seed = 0) {
  cuda_emu::Config c;
  c.schedule = s;
  c.workers = workers;
  c.seed = seed;
  cuda_emu::configure(c);
}

// ---------------------------------------------------------------- checks
void semantics(bool clean) {
  for (int width : {32, 16, 8}) {
    std::vector<int> out(64 * 8, -1);
    FASTBN_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(out.data(), width);
    bool ok = cudaGetLastError() == cudaSuccess;
    std::string bad;
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, seg = lane & ~(width - 1);
      unsigned ballot = 0;
      for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
      const int expect[8] = {lane + 3 < seg + width ? lane + 3 : lane, lane - 5 >= seg ? lane - 5 : lane,
                             (lane ^ 6) < seg + width ? lane ^ 6 : lane, seg + 7 % width, static_cast<int>(ballot), 1,
                             0, lane + 1 < 32 ? lane + 1 : lane};
      for (int k = 0; k < 8; ++k)
        if (out[t * 8 + k] != expect[k]) {
          ok = false;
          bad = "thread " + std::to_string(t) + " op " + std::to_string(k) + ": " + std::to_string(out[t * 8 + k]) +
                " != " + std::to_string(expect[k]);
        }
    }
    check(ok && faults().empty(), "shuffle/ballot/any/all results, width " + std::to_string(width), bad);
  }

  std::vector<float> in(4 * 200), out(4, -1.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7);
  for (auto s : {cuda_emu::Schedule::forward, cuda_emu::Schedule::reverse, cuda_emu::Schedule::random}) {
    configure(s, 2, 7);
    FASTBN_LAUNCH(4, 256, 0, nullptr, sum_kernel)(in.data(), out.data(), 200);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int b = 0; b < 4; ++b) {
      float e = 0;
      for (int i = 0; i < 200; ++i) e += in[b * 200 + i];
      ok = ok && out[b] == e;
    }
    check(ok && faults().empty(), "block reduction with barriers, schedule " + std::to_string(static_cast<int>(s)));
  }

  if (!clean) {
    std::vector<int> fwd(64), rev(64);
    configure(cuda_emu::Schedule::forward, 1);
    FASTBN_LAUNCH(1, 64, 0, nullptr, neighbour_kernel)(fwd.data());
    configure(cuda_emu::Schedule::reverse, 1);
    FASTBN_LAUNCH(1, 64, 0, nullptr, neighbour_kernel)(rev.data());
    check(fwd != rev, "a missing barrier makes the forward and reverse schedules disagree");
  }

  configure(cuda_emu::Schedule::forward, 1);
  std::vector<unsigned> p(64, 0);
  FASTBN_LAUNCH(1, 32, 128, nullptr, poison_kernel)(p.data());
  bool poisoned = cudaGetLastError() == cudaSuccess;
  for (unsigned v : p) poisoned = poisoned && v == 0xFFFFFFFFu;
  check(poisoned, "static and dynamic shared memory start as 0xFF bytes");

  configure(cuda_emu::Schedule::random, 2, 3);
  unsigned long long counter = 0;
  float fsum = 0;
  FASTBN_LAUNCH(dim3(3, 2, 2), dim3(16, 4, 2), 0, nullptr, atomic_kernel)(&counter, &fsum);
  check(cudaGetLastError() == cudaSuccess && counter == 12 * 128 && fsum == 12 * 128 * 0.5f,
        "atomics across threads, blocks and workers; 3-D grid and block");

  configure(cuda_emu::Schedule::reverse, 1);
  std::vector<int> sw(32);
  FASTBN_LAUNCH(1, 32, 0, nullptr, syncwarp_kernel)(sw.data());
  bool swok = cudaGetLastError() == cudaSuccess;
  for (int i = 0; i < 32; ++i) swok = swok && sw[i] == (31 - i) * 2;
  check(swok && faults().empty(), "__syncwarp orders a warp's shared-memory writes");

  const float vals[] = {1.0f, 1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65504.0f, 65520.0f, 0x1p-24f, 0x1p-25f,
                        -0.0f, INFINITY, 3.14159265f};
  const float expect[] = {1.0f, 1.0f, 1.0f + 0x1p-9f, 65504.0f, INFINITY, 0x1p-24f, 0.0f, -0.0f, INFINITY, 3.140625f};
  float conv[10];
  FASTBN_LAUNCH(1, 32, 0, nullptr, conversion_kernel)(vals, conv, 10);
  bool cok = true;
  for (int i = 0; i < 10; ++i) cok = cok && std::memcmp(&conv[i], &expect[i], 4) == 0;
  check(cok, "__float2half_rn rounds to nearest even, overflows to inf, keeps subnormals");
}

void faults_reported() {
  configure(cuda_emu::Schedule::forward, 1);
  std::vector<int> o(256);
  FASTBN_LAUNCH(1, 128, 0, nullptr, divergent_barrier_kernel)(o.data());
  expect_fault(cudaGetLastError(), "__syncthreads at two different sites", "divergent __syncthreads");
  FASTBN_LAUNCH(1, 128, 0, nullptr, barrier_after_exit_kernel)(o.data());
  // (reported when the barrier is reached after the exit, or the exit happens during the wait)
  expect_fault(cudaGetLastError(), "__syncthreads while some threads have exited", "exited");
  FASTBN_LAUNCH(1, 32, 0, nullptr, shuffle_after_exit_kernel)(o.data());
  expect_fault(cudaGetLastError(), "a lane of the mask exits before the shuffle", "exited without reaching it");
  FASTBN_LAUNCH(1, 32, 0, nullptr, shuffle_own_lane_missing_kernel)(o.data());
  expect_fault(cudaGetLastError(), "a shuffle mask without the calling lane", "does not include the calling lane");
  FASTBN_LAUNCH(1, 32, 0, nullptr, shuffle_outside_mask_kernel)(o.data());
  expect_fault(cudaGetLastError(), "a shuffle reading a lane outside the mask", "which is not in the mask");
  FASTBN_LAUNCH(1, 64, 0, nullptr, shuffle_vs_barrier_kernel)(o.data());
  expect_fault(cudaGetLastError(), "half a warp at a shuffle, half at a barrier", "went to __syncthreads");
  FASTBN_LAUNCH(1, 48, 0, nullptr, shuffle_kernel)(o.data(), 32);
  expect_fault(cudaGetLastError(), "a full mask in a partial warp", "lanes this block does not have");

  FASTBN_LAUNCH(1, dim3(32, 33), 0, nullptr, atomic_kernel)(nullptr, nullptr);
  cudaError_t e = cudaGetLastError();
  check(e == cudaErrorInvalidConfiguration && faults().find("1056 threads") != std::string::npos,
        "a block of 32 x 33 threads is refused");
  FASTBN_LAUNCH(1, 1025, 0, nullptr, atomic_kernel)(nullptr, nullptr);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration && !faults().empty(), "blockDim.x = 1025 is refused");
  FASTBN_LAUNCH(dim3(1, 65536), 32, 0, nullptr, atomic_kernel)(nullptr, nullptr);
  e = cudaGetLastError();
  check(e == cudaErrorInvalidConfiguration && !faults().empty(), "grid.y = 65536 is refused");
  FASTBN_LAUNCH(0, 32, 0, nullptr, atomic_kernel)(nullptr, nullptr);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration && !faults().empty(), "an empty grid is refused");
  std::vector<float> f(64);
  FASTBN_LAUNCH(1, 32, 48 * 1024 + 4, nullptr, dynamic_overflow_kernel)(f.data(), 0);
  e = cudaGetLastError();
  check(e == cudaErrorInvalidValue && faults().find("without cudaFuncSetAttribute") != std::string::npos,
        "more than 48 KB of dynamic shared memory needs the opt-in");
  cudaFuncSetAttribute(dynamic_overflow_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
  FASTBN_LAUNCH(1, 32, 48 * 1024 + 4, nullptr, dynamic_overflow_kernel)(f.data(), 12000);
  check(cudaGetLastError() == cudaSuccess && faults().empty(), "... and runs after cudaFuncSetAttribute");
  check(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets the error");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  std::vector<float> f(256 * 4, 1.0f), out(4);
  if (mode == "--shared-overflow") {
    FASTBN_LAUNCH(1, 65, 0, nullptr, shared_overflow_kernel)(f.data());
    std::printf("shared overflow not detected\n");
    return 0;
  }
  if (mode == "--dynamic-overflow") {
    FASTBN_LAUNCH(1, 1, 16 * sizeof(float), nullptr, dynamic_overflow_kernel)(f.data(), 16);
    std::printf("dynamic shared overflow not detected\n");
    return 0;
  }
  if (mode == "--race") {
    configure(cuda_emu::Schedule::forward, 1);
    FASTBN_LAUNCH(4, 256, 0, nullptr, racy_sum_kernel)(f.data(), out.data(), 256);
    std::printf("racy reduction ran\n");
    return 0;
  }
  semantics(mode == "--clean");
  if (mode != "--clean") faults_reported();
  std::printf("cuda_emu_selftest: %d failure(s)\n", g_failed);
  return g_failed ? 1 : 0;
}
