// CPU kernels compiled for AVX2 + FMA + F16C (chosen at run time when the CPU has them).
// Everything after the target pragma lives in namespace isa_avx2, so no inline function
// compiled for AVX2 can be picked by the linker for a baseline caller. bn_math.h's madd fuses
// here (FASTBN_HOST_FMA), as the vectors do.
#define FASTBN_HOST_FMA 1
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTBN_CPU_AVX2 1
#define FASTBN_CPU_AVX512 0
namespace fastbn {
namespace cpu {
namespace isa_avx2 {
#include "vec.h"
#include "kernels_impl.h"
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fastbn

#define FASTBN_ISA_NS isa_avx2
#define FASTBN_ISA_GETTER avx2_kernels
#include "isa_table.inc"
#pragma GCC pop_options

#else  // not x86-64: the baseline table serves as the "avx2" one (never selected)
namespace fastbn {
namespace cpu {
#define FASTBN_AVX2_FALLBACK(T) \
  template <> const Kernels<T>& avx2_kernels<T>() { return base_kernels<T>(); }
FASTBN_AVX2_FALLBACK(float)
FASTBN_AVX2_FALLBACK(double)
FASTBN_AVX2_FALLBACK(f16)
FASTBN_AVX2_FALLBACK(bf16)
}  // namespace cpu
}  // namespace fastbn
#endif
