// Launch environment of the current CUDA device (defined in cuda_env_binding.cpp).
#pragma once
#include "launch.h"

namespace fastbn {
namespace cuda {

// Current stream and multiprocessor count of the current device (set the device first).
LaunchEnv current_env();

}  // namespace cuda
}  // namespace fastbn
