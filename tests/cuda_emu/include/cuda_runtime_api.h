// Stand-in for the CUDA toolkit's cuda_runtime_api.h (host API only): see cuda_emu.h.
#pragma once
#include "cuda_emu.h"
