// The two facts the CUDA backend needs from PyTorch's CUDA runtime: the current stream and
// the device's multiprocessor count. Kept apart because only CUDA builds of PyTorch ship
// c10/cuda (every other file of the backend compiles against any PyTorch). Includes only
// c10/cuda and the CUDA runtime API, so it builds against a runtime-only CUDA toolkit (no
// cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h would pull in).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

#include "cuda_env.h"

namespace fastbn {
namespace cuda {

namespace {

// Multiprocessor count of device `dev`, queried once per device (0 in the cache = not yet).
int multiprocessor_count(c10::DeviceIndex dev) {
  static std::array<std::atomic<int>, 64> cache{};
  return cached_per_device(cache, dev, [&] {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  });
}

}  // namespace

LaunchEnv current_env() {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  LaunchEnv env;
  env.stream = stream.stream();
  env.sm_count = multiprocessor_count(stream.device_index());
  env.device = stream.device_index();
  return env;
}

}  // namespace cuda
}  // namespace fastbn
