// fastbn's launch environment under the emulator: the default stream and the multiprocessor
// count the emulator is configured to report (cuda_emu::Config::multiprocessor_count).
#include "cuda/cuda_env.h"

namespace fastbn {
namespace cuda {

LaunchEnv current_env() {
  LaunchEnv env;
  env.stream = nullptr;
  env.device = 0;
  cudaDeviceGetAttribute(&env.sm_count, cudaDevAttrMultiProcessorCount, 0);
  return env;
}

}  // namespace cuda
}  // namespace fastbn
