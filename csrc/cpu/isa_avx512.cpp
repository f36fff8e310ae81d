// CPU kernels compiled for AVX-512F/BW/VL (+ AVX2, FMA, F16C; chosen at run time when the CPU
// has them): 16 float lanes a vector, 32 vector registers. Everything after the target pragma lives
// in namespace isa_avx512, so no inline function compiled for AVX-512 can be picked by the
// linker for another unit's caller. bn_math.h's madd fuses here (FASTBN_HOST_FMA), as the
// vectors do.
#define FASTBN_HOST_FMA 1
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on their own undefined
// pass-through operands (a false positive); silenced for this unit only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define FASTBN_CPU_AVX2 0
#define FASTBN_CPU_AVX512 1
namespace fastbn {
namespace cpu {
namespace isa_avx512 {
#include "vec.h"
#include "kernels_impl.h"
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fastbn

#define FASTBN_ISA_NS isa_avx512
#define FASTBN_ISA_GETTER avx512_kernels
#include "isa_table.inc"
#pragma GCC pop_options
#pragma GCC diagnostic pop

#else  // not x86-64: the baseline table serves as the "avx512" one (never selected)
namespace fastbn {
namespace cpu {
#define FASTBN_AVX512_FALLBACK(T) \
  template <> const Kernels<T>& avx512_kernels<T>() { return base_kernels<T>(); }
FASTBN_AVX512_FALLBACK(float)
FASTBN_AVX512_FALLBACK(double)
FASTBN_AVX512_FALLBACK(f16)
FASTBN_AVX512_FALLBACK(bf16)
}  // namespace cpu
}  // namespace fastbn
#endif
