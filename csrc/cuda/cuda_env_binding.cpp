// The two facts the CUDA backend needs from PyTorch's CUDA runtime: the current stream and
// the device's multiprocessor count. Kept apart because only CUDA builds of PyTorch ship
// these headers (every other file of the backend compiles against any PyTorch).
#include <ATen/cuda/CUDAContext.h>

#include "cuda_env.h"

namespace fastbn {
namespace cuda {

LaunchEnv current_env() {
  LaunchEnv env;
  env.stream = at::cuda::getCurrentCUDAStream().stream();
  env.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return env;
}

}  // namespace cuda
}  // namespace fastbn
