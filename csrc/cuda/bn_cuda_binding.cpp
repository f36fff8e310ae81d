// Registers the CUDA backend (cuda_backend.h) for every fastbn op on the CUDA dispatch key.
#include <torch/library.h>

#include "cuda_backend.h"

FASTBN_REGISTER_BACKEND(CUDA, ::fastbn::cuda::CudaBackend)
