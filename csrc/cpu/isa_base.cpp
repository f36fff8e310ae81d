// CPU kernels compiled for the baseline x86-64 / any-CPU instruction set.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"

#define FASTBN_CPU_AVX2 0
#define FASTBN_CPU_AVX512 0
namespace fastbn {
namespace cpu {
namespace isa_base {
#include "vec.h"
#include "kernels_impl.h"
}  // namespace isa_base
}  // namespace cpu
}  // namespace fastbn

#define FASTBN_ISA_NS isa_base
#define FASTBN_ISA_GETTER base_kernels
#include "isa_table.inc"
