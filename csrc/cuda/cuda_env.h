// Launch environment of the current CUDA device (defined in cuda_env_binding.cpp; the CPU
// emulator defines its own in tests/cuda_emu/src/env.cpp).
#pragma once
#include "launch.h"

namespace fastbn {
namespace cuda {

// Current stream and multiprocessor count of the current device (set the device first).
LaunchEnv current_env();

}  // namespace cuda
}  // namespace fastbn
