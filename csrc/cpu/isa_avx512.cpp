// CPU kernels compiled for AVX-512F/BW/VL (+ AVX2, FMA, F16C; chosen at run time when the CPU
// has them): 16 float lanes a vector, 32 vector registers. Everything after the target pragma lives
// in namespace isa_avx512, so no inline function compiled for AVX-512 can be picked by the
// linker for another unit's caller. bn_math.h's madd fuses here (FASTBN_HOST_FMA), as the
// vectors do.
//
// isa_avx512bf16.cpp compiles this file again with FASTBN_AVX512_BF16_UNIT defined: the same
// kernels with AVX512_BF16 and DQ added to the target (vec.h then rounds float -> bfloat16 with
// VCVTNEPS2BF16), in namespace isa_avx512bf16, with a bfloat16 table only.
#define FASTBN_HOST_FMA 1
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on their own undefined
// pass-through operands (a false positive); silenced for this unit only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#pragma GCC push_options
#if FASTBN_AVX512_BF16_UNIT
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define FASTBN_CPU_AVX512_BF16 1
#define FASTBN_ISA_NS isa_avx512bf16
#define FASTBN_ISA_GETTER avx512bf16_kernels
#define FASTBN_ISA_TYPES(X) X(bf16)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define FASTBN_ISA_NS isa_avx512
#define FASTBN_ISA_GETTER avx512_kernels
#endif
#define FASTBN_CPU_AVX2 0
#define FASTBN_CPU_AVX512 1
namespace fastbn {
namespace cpu {
namespace FASTBN_ISA_NS {
#include "vec.h"
#include "kernels_impl.h"
}  // namespace FASTBN_ISA_NS
}  // namespace cpu
}  // namespace fastbn

#include "isa_table.inc"
#pragma GCC pop_options
#pragma GCC diagnostic pop

#else  // not x86-64: the baseline tables serve (never selected)
namespace fastbn {
namespace cpu {
#if FASTBN_AVX512_BF16_UNIT
template <> const Kernels<bf16>& avx512bf16_kernels<bf16>() { return base_kernels<bf16>(); }
#else
#define FASTBN_AVX512_FALLBACK(T) \
  template <> const Kernels<T>& avx512_kernels<T>() { return base_kernels<T>(); }
FASTBN_AVX512_FALLBACK(float)
FASTBN_AVX512_FALLBACK(double)
FASTBN_AVX512_FALLBACK(f16)
FASTBN_AVX512_FALLBACK(bf16)
#endif
}  // namespace cpu
}  // namespace fastbn
#endif
